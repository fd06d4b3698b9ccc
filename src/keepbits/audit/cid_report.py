"""Layer-wise CID analysis (Ma, Zhang et al. ICML 2022, Fig. 5): CID, RU and concentration
per layer of one or several networks, and the HTML + JSON report.

Example:
    >>> import tempfile, torch
    >>> from keepbits.audit.cid import CIDConfig
    >>> from keepbits.audit.cid_report import cid_report, layerwise_cid
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3, padding=1))
    >>> run = layerwise_cid(net, torch.randn(2, 1, 8, 8), ["1", "2"], CIDConfig(max_steps=40), input_shape=(1, 8, 8))
    >>> [round(float(v), 1) > -9 for v in run["summary"]["cid_mean"]]
    [True, True]
    >>> sorted(p.name for p in cid_report([run], tempfile.mkdtemp()))
    ['report.html', 'report.json']
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keepbits.report import Report, colorize, plural
from keepbits.audit.cid import CIDConfig, CIDExplainer, concentration
from keepbits.audit.cid_ru import DecoderConfig, reconstruction_uncertainty, train_decoder
from keepbits.errors import InputError

#: How many images of each network the report shows as heatmap rows.
SHOWN_IMAGES = 4


def layerwise_cid(model: Any, inputs: Any, layers: Sequence[str] | None = None, config: Any = None, *, name: str = "",
                  foreground: Mapping[int, Any] | None = None, ru_images: Any = None, ru_layers: Sequence[str] | None = None,
                  decoder: DecoderConfig | None = None,
                  cache_dir: str | Path | None = "default", batch_size: int = 16, progress: bool = False,
                  **model_kwargs: Any) -> dict[str, Any]:
    """CID maps of ``inputs`` at every layer, plus RU (when ``ru_images``, the decoder's
    training images, are given; at ``ru_layers`` only, default all) and concentration (Eq. 5, for images with an entry in
    ``foreground``: an H×W mask or a box ``(x0, y0, x1, y1)``). ``progress``: a progress bar of the
    maps being fitted (step, maps still fitting) on stderr.

    Returns ``{"name", "layers", "images" (uint8 N×H×W×C), "entropy" (N×L×H×W), "ru"
    (N×L×H×W or None), "per_image" (list of per-layer dicts), "summary" (per-layer means),
    "decoders" (training info), "seconds"}``.
    """
    start = time.perf_counter()
    cid = CIDExplainer(model, layers, config or CIDConfig(), progress, **model_kwargs)
    adapter = cid.model
    x = adapter.prepare(inputs)
    maps = cid.explain(x, batch_size=batch_size)
    entropy = np.stack([m.entropy for m in maps])
    nl = len(cid.layers)
    ru, ru_floor, ru_spread, decoders = None, None, None, {}
    if ru_images is not None:
        train_x = adapter.prepare(ru_images)
        ru, ru_floor, ru_spread = (np.full_like(entropy, np.nan) for _ in range(3))
        unknown = sorted(set(ru_layers or []) - set(cid.layers))
        if unknown:
            raise InputError(f"RU layers {unknown} are not among the audited layers {cid.layers}")
        for l, layer in enumerate(cid.layers):
            if ru_layers is not None and layer not in ru_layers:
                continue
            dec, info = train_decoder(cid.module, layer, train_x, decoder, cache_dir, cid.config.device)
            decoders[layer] = info
            ru[:, l], fit = reconstruction_uncertainty(cid.module, layer, dec, x, cid.config, batch_size)
            ru_floor[:, l], ru_spread[:, l] = fit["floor"], fit["spread"]
            info["ru_ratio_over_beta"] = (fit["ratio"] / cid.config.beta).tolist()
            info["ru_steps"] = fit["steps"].tolist()
            info["ru_converged"] = int(fit["converged"].sum())
            info["ru_trace"] = {k[6:]: _nanmean_rows(fit[k]) for k in fit if k.startswith("trace_")}
    conc = np.full((len(x), nl), np.nan)
    for i, fg in (foreground or {}).items():
        if not 0 <= int(i) < len(x):
            raise InputError(f"foreground given for image {i}, but there are {len(x)} images")
        conc[int(i)] = [concentration(entropy[int(i), l], fg) for l in range(nl)]
    per_image = []
    for i, m in enumerate(maps):
        rows = m.to_dict()
        rows["concentration"] = conc[i].tolist()
        if ru is not None:
            rows["ru_mean"] = [float(v) if np.isfinite(v) else None for v in ru[i].reshape(nl, -1).mean(1)]
            rows["ru_floor_mean"] = [float(v) if np.isfinite(v) else None for v in ru_floor[i].reshape(nl, -1).mean(1)]
            rows["ru_spread_mean"] = [float(v) if np.isfinite(v) else None for v in ru_spread[i].reshape(nl, -1).mean(1)]
        per_image.append(rows)
    summary = {
        "layer": list(cid.layers),
        "cid_mean": [float(np.mean([m.mean[l] for m in maps])) for l in range(nl)],
        "cid_mean_std": [float(np.std([m.mean[l] for m in maps])) for l in range(nl)],
        "cid_sum": [float(np.mean([m.cid[l] for m in maps])) for l in range(nl)],
        "ratio_over_beta": [float(np.mean([m.ratio[l] for m in maps]) / cid.config.beta) for l in range(nl)],
        "reached": [int(sum(bool(m.reached[l]) for m in maps)) for l in range(nl)],
        "steps_mean": [float(np.mean([m.steps[l] for m in maps])) for l in range(nl)],
        "converged": [int(sum(bool(m.converged[l]) for m in maps)) for l in range(nl)],
        "trace": [{k: _nanmean_rows(np.stack([m.trace[k][l] for m in maps])) for k in maps[0].trace} for l in range(nl)],
        "saturated": [float(np.mean([m.saturated[l] for m in maps])) for l in range(nl)],
        "ru_mean": [float(ru[:, l].mean()) if np.isfinite(ru[:, l]).all() else None for l in range(nl)] if ru is not None else None,
        "ru_mean_std": [float(ru[:, l].reshape(len(x), -1).mean(1).std()) if np.isfinite(ru[:, l]).all() else None for l in range(nl)] if ru is not None else None,
        "ru_floor_mean": [float(ru_floor[:, l].mean()) if np.isfinite(ru_floor[:, l]).all() else None for l in range(nl)] if ru is not None else None,
        "ru_spread_mean": [float(ru_spread[:, l].mean()) if np.isfinite(ru_spread[:, l]).all() else None for l in range(nl)] if ru is not None else None,
        "concentration": [float(np.nanmean(conc[:, l])) if np.isfinite(conc[:, l]).any() else None for l in range(nl)],
        "images": len(x),
    }
    return {
        "name": name or Path(str(adapter.source)).stem, "source": str(adapter.source), "layers": list(cid.layers),
        "images": adapter.denormalize(x), "entropy": entropy, "ru": ru, "per_image": per_image, "summary": summary,
        "decoders": decoders, "config": asdict(cid.config),
        "seconds": time.perf_counter() - start,
    }


def _nanmean_rows(rows: np.ndarray) -> list[float | None]:
    """Column means of a 2-D array over its finite entries (None where a column has none):
    the mean trace over images, each trace NaN after its map stopped."""
    rows = np.asarray(rows, dtype=np.float64)
    out = []
    for col in rows.T:
        finite = col[np.isfinite(col)]
        out.append(float(finite.mean()) if finite.size else None)
    return out


def _heatmap_rows(images: np.ndarray, maps: np.ndarray, layers: list[str], normalise: bool) -> tuple[list[np.ndarray], list[str]]:
    """One row per image: the image, then its map at every layer (per-map or shared colour scale)."""
    finite = maps[np.isfinite(maps)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cells, titles = [], []
    for i in range(min(SHOWN_IMAGES, len(images))):
        cells.append(images[i])
        titles.append(f"image {i}")
        for l, layer in enumerate(layers):
            cells.append(colorize(maps[i, l]) if normalise else colorize(maps[i, l], vmin=lo, vmax=hi))
            titles.append(layer)
    return cells, titles


def cid_report(runs: Sequence[Mapping[str, Any]], out_dir: str | Path, meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``report.html`` / ``report.json`` for runs of :func:`layerwise_cid` (one per network)."""
    if not runs:
        raise InputError("no CID runs to report")
    beta = runs[0]["config"].get("beta")
    report = Report("CID audit: layer-wise and pixel-wise information discarding", meta={
        "method": "Ma, Zhang et al., ICML 2022 (Eq. 3-7)", "beta": beta, "block": runs[0]["config"].get("block"),
        "networks": ", ".join(r["name"] for r in runs), **(meta or {}),
    })
    head = report.section("Layer-wise curves (Fig. 5)", (
        "CID of a layer: mean over pixels and images of H_i = log σ_i + ½ log(2πe) (nats per channel value, on the "
        "classifier's normalised input scale), where σ is the largest input noise keeping E‖f'−f‖² = β δ_f². Higher "
        "means the layer has discarded more of the input. RU (Eq. 6-7): ½ log(2πe E[(g(h(x')) − x)²]) per pixel, with g a "
        "decoder trained to rebuild the input from the layer's feature and x' = x + σ∘δ with σ chosen to maximise this entropy "
        "under the same feature constraint (E‖h(x')−f‖² = β δ_f²); 'RU floor' is the same at σ = 0 (the decoder's own error); 'RU spread' is ½ log(2πe Var[g(h(x'))]) from the same draws, "
        "centred on the reconstructions' own mean (μ_rec read as their mean: the decoder's bias cancels). "
        "Concentration (Eq. 5): mean H outside the foreground minus mean H inside."))
    for key, label in (("cid_mean", "CID per pixel (nats)"), ("ru_mean", "RU per pixel (nats)"), ("concentration", "concentration (nats)")):
        series, errors = {}, {}
        for r in runs:
            ys = r["summary"].get(key)
            if ys is None or all(v is None for v in ys):
                continue
            series[r["name"]] = (list(range(1, len(ys) + 1)), [math.nan if v is None else v for v in ys])
            if key == "cid_mean":
                errors[r["name"]] = r["summary"]["cid_mean_std"]
        if series:
            head.line_plot(series, xlabel="layer (1 = first audited)", ylabel=label, title=label, errors=errors)
    head.text("Error bars: standard deviation over images.", note=True)
    for r in runs:
        s = r["summary"]
        sec = report.section(f"{r['name']}", f"{plural(s['images'], 'image')}, {plural(len(r['layers']), 'layer')}, {r['seconds']:.0f} s.")
        rows = []
        for l, layer in enumerate(r["layers"]):
            row = {"layer": layer, "CID/pixel": s["cid_mean"][l], "± (images)": s["cid_mean_std"][l] if s["images"] > 1 else None, "CID (sum)": s["cid_sum"][l],
                   "ratio/β": s["ratio_over_beta"][l], "reached": f"{s['reached'][l]}/{s['images']}",
                   "converged": f"{s['converged'][l]}/{s['images']}", "steps": s["steps_mean"][l],
                   "σ at cap": s["saturated"][l]}
            if s["ru_mean"] is not None and s["ru_mean"][l] is not None:
                row["RU/pixel"] = s["ru_mean"][l]
                row["RU floor"] = s["ru_floor_mean"][l]
                row["RU spread"] = s["ru_spread_mean"][l]
                row["decoder R²"] = r["decoders"][layer]["val_r2"]
            if s["concentration"][l] is not None:
                row["concentration"] = s["concentration"][l]
            rows.append(row)
        sec.table(rows, caption="Per layer: means over images")
        missed = [(i, layer) for i, p in enumerate(r["per_image"]) for l, layer in enumerate(r["layers"]) if not p["reached"][l]]
        if missed:
            sec.text(f"{len(missed)} map(s) did not reach E‖f'−f‖²/δ_f² within the tolerance of β: "
                     + ", ".join(f"image {i} / {layer}" for i, layer in missed[:20]), note=True)
        moving = [(i, layer) for i, p in enumerate(r["per_image"]) for l, layer in enumerate(r["layers"]) if not p["converged"][l]]
        if moving:
            sec.text(f"{len(moving)} map(s) were still moving at the step budget (no plateau at the smallest lr): "
                     + ", ".join(f"image {i} / {layer}" for i, layer in moving[:20]), note=True)
        for title, maps in (("CID", r["entropy"]), ("RU", r["ru"])):
            if maps is None:
                continue
            for normalise in (True, False):
                cells, titles = _heatmap_rows(r["images"], maps, r["layers"], normalise)
                scale = "each map min–max" if normalise else "one colour scale for all maps of this network"
                sec.image_grid(cells, titles, cols=len(r["layers"]) + 1, caption=f"{title} maps ({scale}; bright = more discarded)")
        report.data[r["name"]] = {k: r[k] for k in ("source", "layers", "summary", "per_image", "decoders", "config", "seconds")}
    return report.write(out_dir)
