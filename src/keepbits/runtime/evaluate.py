"""Rate–accuracy of a bundle on the user's images through the real payload (``keepbits eval``).

Protocol. Each image is brought to the model size by the bundle's resize policy and classified
as a whole (the *full frame* prediction). At every operating point, the frame and its mask ẑ are packed by
:func:`keepbits.codec.encode` (hard mask ẑ > threshold, b×b block means; mode ``blocks``: kept
blocks in the foreground codec at its quality, mode ``mixed``: x̃ as one image in that codec;
NICE Eqs. 11–12), the bytes are counted, :func:`keepbits.codec.decode`
rebuilds x̃, and the bundle classifies the decoded x̃ as it is (a model-size image: no second
resize; a SimpleBits bundle: the simplified image in that codec). Baselines: the same model-size frame as one PNG, JPEG or WebP file at each quality,
decoded and classified the same way. With labels: top-1 accuracy of each point and of the full
frame; always: agreement with the full-frame prediction (the metric for unlabelled images).

Operating points: modes × thresholds × block sizes × (codec, quality); the codec accepts any
block size, whatever the bundle was trained with. The bundle classifies what it is given the
way it always does: one with ``classify_on: "mixed"`` classifies its own x̃ of the decoded x̃,
a SimpleBits bundle its simplification of the decoded simplified image.

Everything runs in batches: memory holds one batch of frames, masks and decoded images.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.runtime import Pipeline
    >>> from keepbits.runtime.evaluate import rate_accuracy
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b", size=16))
    >>> frames = [np.full((16, 16, 3), v, np.uint8) for v in (20, 240)]
    >>> result = rate_accuracy(pipe, frames, np.array([0, 1]), codecs=["png"], baselines=["png"])
    >>> result["full_frame"]["accuracy"], [p["agreement"] for p in result["payload"]]
    (1.0, [1.0])
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from keepbits.codec import decode, decode_image, encode, encode_image
from keepbits.codec.images import FORMATS, check_webp_method
from keepbits.errors import InputError
from keepbits.report import Report, plot_png
from keepbits.runtime.explain import Look

log = logging.getLogger(__name__)
from keepbits.runtime.pipeline import Pipeline, Result

#: The lossy ones of the image formats (:data:`keepbits.codec.images.FORMATS`): swept over qualities.
LOSSY = ("jpeg", "webp")


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """One payload setting: ``mode`` (``blocks``, ``mixed`` or ``simplified``), hard-mask
    ``threshold`` and ``block`` (None for simplified), ``codec`` (of the kept blocks, x̃ or the
    simplified image) and its ``quality`` (None for PNG), and the ``background`` codec of the
    block means in blocks mode (``auto``, ``raw``, ``png`` lossless; a lossy one at ``quality``; None in mixed mode,
    where x̃ carries them), and the libwebp ``webp_method`` (None: OpenCV's encoder)."""

    mode: str
    threshold: float | None
    block: int | None
    codec: str
    quality: int | None
    background: str | None = "auto"
    webp_method: int | None = None

    @property
    def series(self) -> str:
        """The curve this point belongs to (points of one curve differ in quality only)."""
        if self.mode == "simplified":
            return f"simplified {self.codec}"
        if self.mode == "mixed":
            return f"payload mixed {self.codec} t={self.threshold:g} b={self.block}"
        return f"payload {self.codec} t={self.threshold:g} b={self.block}" + ("" if self.background == "auto" else f" bg={self.background}")

    def encode(self, result: Result) -> bytes:
        """The payload of ``result`` at this point."""
        quality = {"quality": self.quality} if self.quality is not None else {}
        if self.mode == "simplified":
            return encode(result.simplified, result.frame_record(), mode="simplified", codec=self.codec,
                          webp_method=self.webp_method, **quality)
        background = {"background": self.background} if self.background is not None else {}
        return encode(result.image, result.frame_record(), mode=self.mode, threshold=self.threshold, block=self.block,
                      codec=self.codec, webp_method=self.webp_method, **background, **quality)


def operating_points(pipeline: Pipeline, thresholds: Sequence[float] | None = None, block_sizes: Sequence[int] | None = None,
                     codecs: Sequence[str] = FORMATS, qualities: Sequence[int] = (50, 75, 90),
                     backgrounds: Sequence[str] = ("auto",), modes: Sequence[str] = ("blocks",),
                     webp_method: int | None = None) -> list[OperatingPoint]:
    """Every combination; thresholds and block sizes default to the bundle's (a SimpleBits bundle
    has neither, and one mode: simplified). PNG is lossless: one point per threshold and block, no quality. WebP needs
    colour frames: it is left out for grey bundles. ``backgrounds``: codecs of the block means in
    blocks mode (``auto``, ``raw``, ``png``, ``jpeg``, ``webp``; a lossy one takes the point's quality, and is paired
    with lossy foregrounds only). ``modes``: ``blocks`` and/or ``mixed``; ``webp_method``: libwebp's
    effort for WebP sections (:func:`keepbits.codec.encode`).

    Example:
        >>> import tempfile
        >>> from keepbits.runtime import Pipeline
        >>> from keepbits.runtime.evaluate import operating_points
        >>> from keepbits.runtime.synthetic import toy_bundle
        >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b"))
        >>> [p.series for p in operating_points(pipe, codecs=["png", "webp"], qualities=[50])]
        ['payload png t=0.5 b=4', 'payload webp t=0.5 b=4']
        >>> [p.series for p in operating_points(pipe, codecs=["webp"], qualities=[50], modes=["mixed"])]
        ['payload mixed webp t=0.5 b=4']
    """
    _check_formats(codecs, qualities)
    if pipeline.channels == 1:
        codecs = [c for c in codecs if c != "webp"]
        if not codecs:
            raise InputError("webp needs 3-channel frames and this bundle's input is grey; use png or jpeg")
    coded = [(c, None) for c in codecs if c == "png"] + [(c, q) for c in codecs if c in LOSSY for q in qualities]
    check_webp_method(webp_method)
    if pipeline.explain == "simplify":
        return [OperatingPoint("simplified", None, None, c, q, webp_method=webp_method) for c, q in coded]
    thresholds = [pipeline.threshold] if thresholds is None else list(thresholds)
    block_sizes = [pipeline.block] if block_sizes is None else list(block_sizes)
    if any(not 0.0 <= t < 1.0 for t in thresholds):
        raise InputError(f"mask thresholds must be in [0, 1), got {thresholds}")
    if any(b < 1 for b in block_sizes):
        raise InputError(f"block sizes must be >= 1, got {block_sizes}")
    if not modes or set(modes) - {"blocks", "mixed"}:
        raise InputError(f"payload modes must be blocks and/or mixed, got {list(modes)}")
    backgrounds_of = {"blocks": list(backgrounds), "mixed": [None]}
    return [OperatingPoint(mode, float(t), int(b), c, q, bg, webp_method) for mode in modes for t in thresholds for b in block_sizes
            for c, q in coded for bg in backgrounds_of[mode] if bg in (None, "auto", "raw", "png") or q is not None]


def map_labels(labels: np.ndarray, data_classes: Sequence[str], model_classes: Sequence[str]) -> tuple[np.ndarray, str]:
    """Data-set labels as indices into the model's classes: by name when every data class is a
    model class, else by index when both have as many classes; :class:`InputError` otherwise.
    Returns the labels and how they were matched.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.evaluate import map_labels
        >>> map_labels(np.array([0, 1]), ["cat", "dog"], ["dog", "cat"])
        (array([1, 0]), 'by name')
    """
    position = {name: k for k, name in enumerate(model_classes)}
    if all(name in position for name in data_classes):
        return np.array([position[data_classes[k]] for k in labels], np.int64).reshape(np.shape(labels)), "by name"
    if len(data_classes) == len(model_classes):
        return np.asarray(labels, np.int64), "by index (class names differ)"
    raise InputError(f"the data has {len(data_classes)} classes {list(data_classes)[:5]}…, the model {len(model_classes)} "
                     f"{list(model_classes)[:5]}…: neither names nor counts match")


def labels_for_model(labels: np.ndarray | None, data_classes: Sequence[str], model_classes: Sequence[str],
                     where: str) -> tuple[np.ndarray | None, str | None]:
    """:func:`map_labels`, or None (the data scored as unlabelled) with a warning naming ``where``
    when its classes are not the model's: camera folders (``day1/cam0``, ``day1/cam1``) read as
    class folders. Returns the labels and how they were matched (``"not used: …"``), None for none.

    Example:
        >>> import numpy as np
        >>> from keepbits.runtime.evaluate import labels_for_model
        >>> labels_for_model(np.array([0, 1]), ["cam0", "cam1"], ["cat", "dog", "fox"], "footage")[0] is None
        True
    """
    if labels is None:
        return None, None
    try:
        return map_labels(labels, data_classes, model_classes)
    except InputError as exc:
        log.warning("%s: its folders are not the model's classes (%s); treated as unlabelled", where, exc)
        return None, f"not used: {exc}"


def _check_formats(formats: Sequence[str], qualities: Sequence[int]) -> None:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise InputError(f"image formats must be among {FORMATS}, got {list(formats)}")
    if any(not 1 <= q <= 100 for q in qualities):
        raise InputError(f"qualities must be 1..100, got {list(qualities)}")


def whole_frame(image: np.ndarray, fmt: str, quality: int | None) -> tuple[int, np.ndarray]:
    """Bytes of ``image`` (uint8 H×W×C, RGB or grey) as one ``fmt`` file and its decoded pixels,
    by the codec's image encoder (:func:`keepbits.codec.encode_image`, as the runtime's reference
    sizes and the NICE benchmark; PNG with its default writer), decoded with as many channels."""
    data = encode_image(image, fmt, quality or 90)
    return len(data), decode_image(data, fmt, channels=image.shape[2] if image.ndim == 3 else 1)


class _Tally:
    """Running sums of one row: bytes, correct, agreeing, kept fraction, images; with labels also
    the images the row gets right and the full frame wrong (``gained``) and the reverse (``lost``),
    the discordant pairs of a paired comparison with the full frame."""

    def __init__(self, **key: Any):
        self.key, self.n, self.bytes, self.correct, self.agree, self.kept = key, 0, 0, 0, 0, 0.0
        self.gained = self.lost = 0

    def add(self, sizes: Sequence[int], predicted: np.ndarray, full: np.ndarray, labels: np.ndarray | None,
            kept: Sequence[float] = ()) -> None:
        self.n += len(sizes)
        self.bytes += int(sum(sizes))
        self.agree += int((predicted == full).sum())
        self.kept += float(sum(kept))
        if labels is not None:
            right, full_right = predicted == labels, full == labels
            self.correct += int(right.sum())
            self.gained += int((right & ~full_right).sum())
            self.lost += int((full_right & ~right).sum())

    def row(self, labelled: bool, kept: bool = False) -> dict[str, Any]:
        row = {**self.key, "bytes_per_image": self.bytes / max(self.n, 1), "agreement": self.agree / max(self.n, 1),
               "accuracy": self.correct / max(self.n, 1) if labelled else None}
        if labelled:
            row.update(gained=self.gained, lost=self.lost)
        if kept:
            row["kept_fraction"] = self.kept / max(self.n, 1)
        return row


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _classify(pipeline: Pipeline, images: Sequence[np.ndarray]) -> np.ndarray:
    """The bundle's classes of model-size ``images`` (decoded payloads and files), fed as they are."""
    return np.array([r.checked().label_index for r in pipeline.predict(list(images), fitted=True)], np.int64)


def rate_accuracy(
    pipeline: Pipeline,
    images: Sequence[np.ndarray],
    labels: np.ndarray | None = None,
    *,
    thresholds: Sequence[float] | None = None,
    block_sizes: Sequence[int] | None = None,
    codecs: Sequence[str] = FORMATS,
    qualities: Sequence[int] = (50, 75, 90),
    baselines: Sequence[str] = FORMATS,
    baseline_qualities: Sequence[int] = (10, 30, 50, 75, 90),
    batch_size: int = 32,
    backgrounds: Sequence[str] = ("auto",),
    modes: Sequence[str] = ("blocks",),
    webp_method: int | None = None,
) -> dict[str, Any]:
    """The protocol of the module docstring on ``images`` (uint8 H×W×C RGB or grey, any size);
    ``labels`` are indices into the bundle's classes, or None. Returns ``full_frame``,
    ``payload`` (one row per :class:`OperatingPoint`) and ``baselines`` rows with bytes per
    image, agreement with the full-frame prediction, accuracy (None without labels; with labels
    also ``gained`` / ``lost``: the images right here and wrong on the full frame, and the
    reverse) and, for payloads with a mask, the kept fraction."""
    if not len(images):
        raise InputError("no images to evaluate")
    if labels is not None and len(labels) != len(images):
        raise InputError(f"{len(labels)} labels for {len(images)} images")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    _check_formats(baselines or ["png"], baseline_qualities)
    points = operating_points(pipeline, thresholds, block_sizes, codecs, qualities, backgrounds, modes, webp_method)
    plain = [(f, None) for f in baselines if f == "png"] + [(f, q) for f in baselines if f in LOSSY for q in baseline_qualities]
    full = _Tally()
    payload_rows = [_Tally(**dataclasses.asdict(p), series=p.series) for p in points]
    baseline_rows = [_Tally(format=f, quality=q, series=f"whole frame {f}") for f, q in plain]
    for part in _batches(len(images), batch_size):
        results = pipeline.predict(list(images[part]))
        predicted = np.array([r.checked().label_index for r in results], np.int64)
        truth = None if labels is None else np.asarray(labels[part], np.int64)
        full.add([0] * len(results), predicted, predicted, truth)
        for point, tally in zip(points, payload_rows):
            decoded, sizes, kept = [], [], []
            for r in results:
                data = point.encode(r)
                image, mask, _ = decode(data)
                decoded.append(image)
                sizes.append(len(data))
                kept.append(0.0 if mask is None else float(mask.mean()))
            tally.add(sizes, _classify(pipeline, decoded), predicted, truth, kept)
        for (fmt, quality), tally in zip(plain, baseline_rows):
            coded = [whole_frame(r.image, fmt, quality) for r in results]
            tally.add([c[0] for c in coded], _classify(pipeline, [c[1] for c in coded]), predicted, truth)
    labelled = labels is not None
    return {
        "num_images": len(images),
        "labelled": labelled,
        "full_frame": {"accuracy": full.correct / full.n if labelled else None, "agreement": 1.0},
        "payload": [t.row(labelled, kept=pipeline.explain != "simplify") for t in payload_rows],
        "baselines": [t.row(labelled) for t in baseline_rows],
        "pipeline": pipeline.describe(),
    }


def smallest_within(result: dict[str, Any], tolerance: float = 0.01) -> dict[str, Any]:
    """The smallest payload point and the smallest baseline whose score (accuracy when labelled,
    else agreement) is within ``tolerance`` of the full frame's, and their byte ratio.

    Example:
        >>> from keepbits.runtime.evaluate import smallest_within
        >>> r = {"labelled": False, "full_frame": {"agreement": 1.0},
        ...      "payload": [{"bytes_per_image": 100, "agreement": 1.0}], "baselines": [{"bytes_per_image": 300, "agreement": 0.995}]}
        >>> smallest_within(r)["baseline_over_payload"]
        3.0
    """
    metric = "accuracy" if result["labelled"] else "agreement"
    target = result["full_frame"][metric] - tolerance

    def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        ok = [r for r in rows if r[metric] is not None and r[metric] >= target]
        return min(ok, key=lambda r: r["bytes_per_image"]) if ok else None

    payload, baseline = best(result["payload"]), best(result["baselines"])
    ratio = baseline["bytes_per_image"] / payload["bytes_per_image"] if payload and baseline and payload["bytes_per_image"] else None
    return {"metric": metric, "tolerance": tolerance, "target": target, "payload": payload, "baseline": baseline,
            "baseline_over_payload": ratio}


def matched_baselines(result: dict[str, Any], row: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Per whole-frame format, the smallest baseline row that scores at least as well as the
    payload ``row`` (accuracy when labelled, else agreement with the full-frame prediction): the
    comparison at matched prediction quality. None where no quality of that format reaches it.

    Example:
        >>> from keepbits.runtime.evaluate import matched_baselines
        >>> r = {"labelled": False, "baselines": [{"format": "jpeg", "bytes_per_image": 900, "agreement": 0.97},
        ...                                      {"format": "jpeg", "bytes_per_image": 500, "agreement": 0.9}]}
        >>> matched_baselines(r, {"agreement": 0.95})["jpeg"]["bytes_per_image"]
        900
    """
    metric = "accuracy" if result["labelled"] else "agreement"
    found: dict[str, dict[str, Any] | None] = {}
    for base in result["baselines"]:
        current = found.get(base["format"])
        if base[metric] is not None and base[metric] >= row[metric] and (current is None or base["bytes_per_image"] < current["bytes_per_image"]):
            found[base["format"]] = base
        else:
            found.setdefault(base["format"], None)
    return found


def curves(result: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """``{series: (bytes per image, score)}`` of the payload and baseline rows, sorted by bytes,
    and the full frame's score as a flat line across them."""
    metric = "accuracy" if result["labelled"] else "agreement"
    series: dict[str, list[tuple[float, float]]] = {}
    rows = result["payload"] + result["baselines"]
    for row in rows:
        series.setdefault(row["series"], []).append((row["bytes_per_image"], row[metric]))
    sizes = [row["bytes_per_image"] for row in rows]
    series["full frame (reference)"] = [(min(sizes), result["full_frame"][metric]), (max(sizes), result["full_frame"][metric])]
    return {name: ([x for x, _ in sorted(pts)], [y for _, y in sorted(pts)]) for name, pts in series.items()}


def write_report(result: dict[str, Any], out: str | Path, *, title: str, meta: dict[str, Any] | None = None,
                 examples: Sequence[Look] = (), tolerance: float = 0.01) -> dict[str, Any]:
    """Write ``out/rate_accuracy.png`` (the curves), ``out/eval.html`` (self-contained: plot,
    tables, example images) and ``out/eval.json`` (its ``data``: ``result`` plus
    :func:`smallest_within`, which is returned)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = "accuracy" if result["labelled"] else "agreement with the full-frame prediction"
    plot = plot_png(curves(result), "bytes per image (log scale)", metric, title, width=760, height=440, log_x=True)
    (out / "rate_accuracy.png").write_bytes(plot)
    best = smallest_within(result, tolerance)
    report = Report(title, meta)
    full = result["full_frame"]
    accuracy = "n/a (unlabelled)" if full["accuracy"] is None else f"{full['accuracy']:.4f}"
    s = report.section("Rate and accuracy", f"{result['num_images']} images; full frame: accuracy {accuracy}, agreement 1 by "
                       "definition. Every payload point is encoded, decoded and classified (keepbits.codec).")
    s.figure(plot, "bytes per image against " + metric)
    columns = ["series", "quality", "bytes_per_image", "accuracy", "agreement"]
    s.table(result["payload"], columns + ["kept_fraction"], caption="payload operating points")
    s.table(result["baselines"], columns, caption="whole frame as one image file")
    s = report.section("Smallest within tolerance", f"smallest bytes per image whose {best['metric']} is at least "
                       f"{best['target']:.4f} (full frame − {tolerance})")
    s.table([{"kind": k, **(best[k] or {"series": "none reaches it"})} for k in ("payload", "baseline")], ["kind", *columns])
    s.text(f"baseline bytes / payload bytes: {best['baseline_over_payload']}")
    if examples:
        s = report.section("Examples", "per image: the frame, the kept pixels (ẑ > threshold) tinted, x̃ as decoded from its payload")
        panels = [(e.frame, e.panels()) for e in examples]
        s.image_grid([img for frame, p in panels for img in (frame, *p.values())], cols=1 + len(panels[0][1]),
                     titles=[t for e in examples for t in (f"{e.name}: {e.label} {e.score:.2f}", *e.panels())])
    report.data = {**result, "smallest_within": best}
    report.write(out, "eval")
    return report.data


__all__ = ["OperatingPoint", "curves", "map_labels", "matched_baselines", "operating_points", "rate_accuracy", "smallest_within",
           "whole_frame", "write_report"]
