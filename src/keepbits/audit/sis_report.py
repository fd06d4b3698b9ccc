"""``keepbits audit sis``: SIS of a data set's images, as a self-contained HTML + JSON report.

Per image: the original, the SIS overlaid (red) and the SIS-only image the model still
classifies with ``f ≥ τ``; SIS size against τ (SIS Fig. 3 style), a pixel-location
frequency heatmap (Overinterpretation Fig. 2), sizes of correctly vs wrongly classified
images with 95% CIs (§4.4), and notes on images whose confidence is below τ (reported, not
errors). Orders are computed by :func:`keepbits.audit.sis_orders.compute_orders`
(sharded under ``torchrun``, resumable).

Example:
    >>> import tempfile, numpy as np, torch
    >>> from keepbits.audit.sis_report import sis_audit
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))
    >>> images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    >>> out = sis_audit(net, images, np.array([0, 1, 2]), tempfile.mkdtemp(), input_shape=(1, 6, 6), progress=False)
    >>> out["summary"]["images"], len(out["images"][0]["sis_size"])
    (3, 7)
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from keepbits.audit._base import load_model
from keepbits.report import Report, overlay, plural
from keepbits.audit.overinterpretation import location_frequency, sis_size_stats
from keepbits.audit.sis import find_sis
from keepbits.audit.sis_orders import compute_orders, read_orders
from keepbits.errors import InputError
from keepbits.training.distributed import all_gather, init_distributed, resolve_device

log = logging.getLogger("keepbits")

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: An image is BackSelected only when its float32 confidence reaches the smallest τ minus this
#: margin; below it the confidence that decides (float64, ``find_sis``) is below every τ, so the
#: image has no SIS at any of them (float32 softmax errors are of order 1e-6).
CONFIDENCE_SLACK = 1e-3


def sis_audit(model: Any, images: np.ndarray, labels: np.ndarray | None, out: str | Path, threshold: float = 0.9,
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS, method: str = "auto", k: int = 16, batch_size: int = 64,
              show: int = 12, progress: bool = True, device: str = "cpu", partial: bool = False,
              meta: dict[str, Any] | None = None, image_names: Sequence[str] | None = None, **model_kwargs: Any) -> dict[str, Any]:
    """Compute SIS (at ``threshold`` for the figures, at every ``thresholds`` for the curves) of uint8
    N×H×W×C ``images`` and write ``out/report.html`` + ``out/report.json`` (rank 0 under
    ``torchrun``); returns the JSON data. ``method``: ``auto``/``incremental``/``plain`` (exact)
    or ``gradient`` (``k`` pixels per iteration); ``device``: ``auto``/``cpu``/``cuda``, where
    BackSelect runs (:func:`keepbits.audit.sis_orders.compute_orders`).

    Only images whose confidence reaches the smallest τ asked for are BackSelected (SIS §3: SIS
    exist only where f(x) ≥ τ): an image below every τ would spend a whole BackSelect on no SIS.
    Its row reports the confidence and class of one float32 forward pass and no SIS; the report
    is the same as BackSelecting every image (``backselect_runs`` counts the runs).

    ``meta``: provenance the report records (the data, its split, the sample's seed, the command);
    ``image_names``: each image's index in its data set or its file, in the rows and the figures.

    ``partial=True`` computes no BackSelect: it reports on the runs an audit with the same
    arguments has already saved in ``out/orders`` (running or stopped; chunks are computed in a
    seeded random order, so these are a random sample of the images that need a run) and writes
    ``out/report_partial.html`` + ``.json``; images still waiting for their run are counted
    (``backselect_runs_done`` of ``backselect_runs``, per class) and left out of the SIS statistics.
    """
    started = time.time()
    device = resolve_device(device)  # refused here, not only once an image needs BackSelect
    adapter = load_model(model, **model_kwargs)
    x = adapter.prepare(images)
    images = adapter.denormalize(x) if np.asarray(images).dtype != np.uint8 else np.asarray(images)
    taus = sorted(set(float(t) for t in thresholds) | {float(threshold)})
    probabilities = adapter.probabilities(x, batch_size)
    # rank 0's choice for every rank (under torchrun each computes it; ranks on other devices could round differently)
    run = np.asarray(all_gather(init_distributed(use_cuda=False), np.flatnonzero(probabilities.max(1) >= taus[0] - CONFIDENCE_SLACK))[0])
    folder = Path(out) / "orders"
    if partial:
        if not folder.is_dir():
            raise InputError(f"{out}: no audit to report on (no orders/ folder; start the audit with the same --out first)")
        computed = read_orders(adapter, x[run], folder, method, k)
        saved = len(list(folder.glob("chunk_*.json")))
        if saved and len(run) and all(r is None for r in computed):  # not "none finished yet": none is this audit's
            log.warning("%s holds %s, none made with these arguments (model, data, sample, --method, --k): give the "
                        "audit's own command with --partial", folder, plural(saved, "chunk file"))
    else:
        computed = compute_orders(adapter, x[run], folder, method, k, batch_size=batch_size, progress=progress,
                                  device=device) if len(run) else []
    pending = {int(i) for i, r in zip(run, computed) if r is None}
    run = np.array([i for i in run if int(i) not in pending], np.int64)
    computed = [r for r in computed if r is not None]
    orders: list[Any] = [None] * len(x)
    for i, r in zip(run, computed):
        orders[i] = r
    predicted = [int(probabilities[i].argmax()) if r is None else r.target for i, r in enumerate(orders)]
    labelled = labels is not None
    labels = np.asarray(labels) if labelled else np.array(predicted)  # unlabelled footage: sizes by predicted class
    per_image, below = [], []
    for i, r in enumerate(orders):
        sizes = {str(t): (None if r is None or (s := find_sis(r, t)) is None else int(len(s))) for t in taus}
        sis = None if r is None else find_sis(r, threshold)
        row = {"image": i, **({"name": str(image_names[i])} if image_names is not None else {}),
               "label": int(labels[i]) if labelled else None, "predicted": predicted[i],
               "confidence": float(probabilities[i].max() if r is None else r.scores[0]),
               "correct": bool(predicted[i] == labels[i]) if labelled else None, "sis_size": sizes, "sis": None if sis is None else sis.tolist(),
               "backselect": r is not None, "seconds": 0.0 if r is None else r.seconds}
        if partial:
            row["pending"] = i in pending
        per_image.append(row)
        if sis is None and i not in pending:
            below.append(row)
    stats = sis_size_stats(computed, labels[run], taus)
    for s in stats:
        s["images"] = len(run) if partial else len(x)
    h, w = x.shape[2:]
    heat = location_frequency(computed, threshold) if computed else np.zeros((h, w))
    backselect = computed[0].method if computed else ("none finished yet" if pending else "none (every image below τ)")
    at_threshold = next(s for s in stats if s["threshold"] == float(threshold))
    summary = {"images": len(x), "below_threshold": len(below), "threshold": threshold, "method": backselect,
               "backselect_runs": len(run) + len(pending), **({"backselect_runs_done": len(run)} if partial else {}),
               "accuracy": float(np.mean([r["correct"] for r in per_image])) if labelled else None,
               # fraction of pixels at τ over the images reaching it (None where none does, or one: no CI)
               **{f"sis_size_{k}": (v if math.isfinite(v) else None) for k, v in at_threshold["size"].items() if k != "n"},
               "wall_time_s": round(time.time() - started, 1)}

    report = Report("SIS audit (partial)" if partial else "SIS audit",
                    meta={"model": adapter.source if not hasattr(model, "forward") else type(model).__name__,
                          "images": len(x), "threshold τ": threshold, "BackSelect": backselect,
                          "mask value": "0 in normalised space (per-channel mean)",
                          "normalisation": f"mean {[round(float(v), 4) for v in adapter.mean]}, std {[round(float(v), 4) for v in adapter.std]}",
                          **(meta or {})})
    if backselect.startswith("gradient") and adapter.torch_module is None:
        report.meta["gradients"] = "through the ONNX graph's torch twin; every f from ONNX Runtime"
    how = ("exact BackSelect (one pixel per step, the one whose masking keeps f highest)" if not backselect.startswith("gradient")
           else f"batched gradient BackSelect ({backselect}: several pixels per step, those whose masking the gradient "
                "predicts keeps f highest; Overinterpretation §3.2), an approximation of exact BackSelect whose subsets may "
                "differ from the exact ones (each subset's f is still a forward pass)")
    ran = plural(len(run), "image")
    sec = report.section("Summary", "Sufficient input subsets (Carter et al. 2019): pixel subsets that alone (all other pixels "
                                    "masked) keep the predicted class's confidence f ≥ τ. Each is the shortest suffix reaching τ "
                                    f"(FindSIS) of the greedy removal order of {how}: small, not proven the smallest. "
                                    f"BackSelect ran on the {ran} whose confidence reaches the smallest τ "
                                    f"({taus[0]}); the others have no SIS at any τ.")
    sec.table([summary])
    coverage = _coverage(per_image, labelled) if partial else None
    if partial:
        _partial_section(report, coverage, adapter)
    sec = report.section("Examples", "Original | SIS (red) over the dimmed image | SIS only (everything else masked).")
    tiles, titles = [], []
    for row in [r for r in per_image if not r.get("pending")][:show]:
        img = images[row["image"]]
        tag = row.get("name", f"#{row['image']}")  # the image's index in its data set or its file, where known
        if row["sis"] is None:
            tiles += [img]
            titles += [f"{tag} f={row['confidence']:.2f} < τ"]
            continue
        keep = np.zeros(h * w, bool)
        keep[row["sis"]] = True
        keep = keep.reshape(h, w)
        only = adapter.denormalize(np.where(keep[None, None], x[row["image"] : row["image"] + 1], 0.0))[0]
        tiles += [img, overlay(img, keep), only]
        titles += [f"{tag} {adapter.class_name(row['predicted'])} f={row['confidence']:.2f}", f"SIS {len(row['sis'])} px", "SIS only"]
    sec.image_grid(tiles, titles)
    sec = report.section("SIS size vs threshold", "Mean SIS size (fraction of pixels) over images reaching τ, with 95% CI; "
                                                  "correctly vs wrongly classified images (Overinterpretation §4.4)."
                         + (" Partial report: over the images whose BackSelect has finished." if partial else ""))
    sec.line_plot({"all": (taus, [s["size"]["mean"] for s in stats]), "correct": (taus, [s["size_correct"]["mean"] for s in stats]),
                   "wrong": (taus, [s["size_wrong"]["mean"] for s in stats])}, xlabel="threshold τ", ylabel="SIS size (fraction)",
                  errors={"all": [s["size"]["ci95"] for s in stats], "correct": [s["size_correct"]["ci95"] for s in stats],
                          "wrong": [s["size_wrong"]["ci95"] for s in stats]})
    sec.table([{"τ": s["threshold"], "images ≥ τ": f"{s['images_at_threshold']}/{s['images']}", "size": s["size"]["mean"],
                "±95%": s["size"]["ci95"], "correct": s["size_correct"]["mean"], "n correct": s["size_correct"]["n"],
                "wrong": s["size_wrong"]["mean"], "n wrong": s["size_wrong"]["n"]} for s in stats])
    sec = report.section("Where SIS pixels lie", f"Fraction of images (f ≥ τ = {threshold}) whose SIS holds each pixel.")
    if any(r["sis"] is not None for r in per_image):
        sec.heatmap(heat, title=f"SIS location frequency, τ = {threshold}", cmap="magma")
    else:
        sec.text(f"No image reaches τ = {threshold}: no SIS to locate.", note=True)
    sec = report.section("Images below the threshold", "These images have f < τ on the full image, so they have no SIS at this τ. "
                                                        "They are reported, not errors.")
    if below:
        sec.table([{"image": r["image"], "label": None if r["label"] is None else _label(adapter, r["label"]),
                    "predicted": _label(adapter, r["predicted"]), "confidence": r["confidence"]} for r in below])
    else:
        sec.text("None: every image reaches τ.", note=True)
    report.data = {"summary": summary, "thresholds": taus, "size_stats": stats, "heatmap": heat, "images": per_image,
                   **({"coverage": coverage} if partial else {})}
    if init_distributed(use_cuda=False).main:  # under torchrun every rank holds the merged orders; one writes
        report.write(out, "report_partial" if partial else "report")
    return report.data


def _coverage(per_image: list[dict[str, Any]], labelled: bool) -> list[dict[str, int]]:
    """Per class (the label where the data has one, else the predicted class): BackSelect runs the
    audit needs and how many have finished."""
    key = "label" if labelled else "predicted"
    needing = [r for r in per_image if r["backselect"] or r["pending"]]
    return [{"class": c, "needed": sum(r[key] == c for r in needing), "done": sum(r[key] == c and not r["pending"] for r in needing)}
            for c in sorted({r[key] for r in needing})]


def _partial_section(report: Report, coverage: list[dict[str, int]], adapter: Any) -> None:
    """How far a running audit has come: BackSelect runs finished and still waiting, per class."""
    done, needed = sum(c["done"] for c in coverage), sum(c["needed"] for c in coverage)
    sec = report.section("Partial report", f"{done} of {plural(needed, 'BackSelect run')} finished; the SIS figures "
                                           "below are over those images only. The audit computes its images in a seeded random "
                                           "order, so the finished ones are a random sample of those that need a run; "
                                           "the table shows how each class is covered so far.")
    sec.table([{"class": _label(adapter, c["class"]), "runs needed": c["needed"], "finished": c["done"]} for c in coverage])


def _label(adapter: Any, cls: int) -> str:
    """A class as a table shows it: its index and, where the model has them, its name."""
    name = adapter.class_name(cls)
    return name if name == str(cls) else f"{cls} {name}"
