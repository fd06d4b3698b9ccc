"""The single-image look (``keepbits explain``): what the bundle predicts on an image, which
pixels it keeps and what the receiver rebuilds from the payload.

:func:`look` runs the bundle on one frame and decodes its own payload. :meth:`Look.write`
saves, at the source frame's size (small frames enlarged by whole factors to ``min_side``, the
long side within :data:`keepbits.runtime.sinks.MAX_SIDE`):
``<name>_overlay.png`` (kept pixels, ẑ > threshold, tinted; dropped ones dimmed),
``<name>_mask.png`` (ẑ in the viridis colour map), ``<name>_mixed.png`` (x̃ as the receiver
decodes it; a SimpleBits bundle: the simplified image). :func:`explain_images` does it for many
images and writes ``explain.json`` (label, score, top classes, kept fraction, payload bytes).

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.runtime import Pipeline
    >>> from keepbits.runtime.explain import look
    >>> from keepbits.runtime.synthetic import toy_bundle
    >>> pipe = Pipeline.from_bundle(toy_bundle(tempfile.mkdtemp() + "/b", size=16))
    >>> frame = np.zeros((16, 24, 3), np.uint8); frame[4:10, 4:10] = 250
    >>> seen = look(pipe, frame, "a")
    >>> seen.label, seen.mixed.shape, 0 < seen.kept_fraction < 1
    ('dark', (16, 24, 3), True)
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from keepbits.codec import decode
from keepbits.report import colorize, overlay, to_png
from keepbits.runtime.pipeline import Pipeline
from keepbits.runtime.sinks import enlargement
from keepbits.runtime.sources import as_rgb


@dataclass
class Look:
    """One image seen by a bundle, at the source frame's size: ``frame`` (RGB or grey),
    ``mask`` ẑ (None for SimpleBits), ``keep`` (ẑ > threshold), ``mixed`` (decoded payload)."""

    name: str
    label: str
    label_index: int
    score: float
    top: list[dict[str, Any]]
    kept_fraction: float | None
    payload_bytes: int
    frame: np.ndarray
    mask: np.ndarray | None
    keep: np.ndarray | None
    mixed: np.ndarray

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "label_index": self.label_index, "score": self.score, "top": self.top,
                "kept_fraction": self.kept_fraction, "payload_bytes": self.payload_bytes,
                "size": [int(self.frame.shape[1]), int(self.frame.shape[0])]}

    def panels(self) -> dict[str, np.ndarray]:
        """The pictures, uint8 RGB or grey: overlay and mask (NICE bundles), mixed."""
        out = {}
        if self.keep is not None:
            out["overlay"] = overlay(self.frame, self.keep, color=(0, 255, 0), alpha=0.25)  # large regions: the object stays visible
            out["mask"] = colorize(self.mask, "viridis", 0.0, 1.0)
        out["mixed"] = self.mixed
        return out

    def write(self, out: str | Path, min_side: int = 224) -> dict[str, str]:
        """Write the :meth:`panels` as ``<name>_<panel>.png`` into ``out``, small frames enlarged to
        ``min_side`` within :data:`keepbits.runtime.sinks.MAX_SIDE` (:func:`enlargement`); returns
        panel -> file name."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        scale = enlargement(*self.frame.shape[:2], min_side)
        files = {}
        for panel, image in self.panels().items():
            files[panel] = f"{self.name}_{panel}.png"
            (out / files[panel]).write_bytes(to_png(image, scale))
        return files


def look(pipeline: Pipeline, image: Any, name: str = "image", top: int = 3) -> Look:
    """Run ``pipeline`` (with its codec settings) on one frame and decode the payload it made."""
    frame = as_rgb(image)
    result = pipeline.compress(pipeline.predict([frame])[0])
    decoded, _, meta = decode(result.payload)
    box = result.fit
    order = np.argsort(result.probabilities)[::-1][:top]
    names = pipeline.class_names
    mask = keep = None
    if result.mask is not None:
        mask = box.mask_to_source(result.mask)
        keep = mask > result.threshold
    mixed = box.image_to_source(decoded)
    frame, mixed = (a[:, :, None] if a.ndim == 2 else a for a in (frame, mixed))
    return Look(
        name=name, label=result.label, label_index=result.label_index, score=result.score,
        top=[{"label": names[k] if k < len(names) else str(k), "index": int(k), "probability": float(result.probabilities[k])}
             for k in order],
        kept_fraction=None if result.kept_fraction is None else float(result.kept_fraction), payload_bytes=meta.total_bytes, frame=frame, mask=mask, keep=keep,
        mixed=mixed,
    )


def _file_stem(name: str) -> str:
    """A flat file stem for an image's name: its folders and frame or index kept, its picture
    suffix dropped (``day1/cam0/a.png`` → ``day1_cam0_a``, ``clip.mp4#frame10`` → ``clip.mp4_frame10``)."""
    path = Path(name)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        path = path.with_suffix("")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.as_posix()).strip("_.") or "image"


def explain_images(pipeline: Pipeline, images: Sequence[np.ndarray], names: Sequence[str], out: str | Path,
                   min_side: int = 224, data: str = "") -> dict[str, Any]:
    """:func:`look` at every image, its PNGs written into ``out`` and ``out/explain.json`` (the
    bundle's description, ``data`` (where the images came from) and one record per image, with
    its file names); returns that JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, used = [], set()

    def taken(stem: str) -> bool:  # by another image of this run (a.png, a.jpg), or a file already in out: never overwritten
        return stem in used or any((out / f"{stem}_{panel}.png").exists() for panel in ("overlay", "mask", "mixed"))

    for image, name in zip(images, names):
        stem = _file_stem(name)
        stem = next(s for s in itertools.chain([stem], (f"{stem}-{k}" for k in itertools.count(1))) if not taken(s))
        used.add(stem)
        seen = look(pipeline, image, stem)
        records.append({**seen.record(), "files": seen.write(out, min_side)})
    report = {"pipeline": pipeline.describe(), "data": data, "images": records, "out": str(out)}
    (out / "explain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


__all__ = ["Look", "explain_images", "look"]
