"""Self-contained HTML + JSON audit reports (no torch; PNGs via Pillow, plots as inline SVG).

A :class:`Report` is a list of sections; each section holds text, tables, image grids,
heatmaps and line plots. :meth:`Report.write` produces ``report.html`` (every image embedded
as base64 PNG, readable offline without Python) and ``report.json`` (the same numbers,
plus whatever was put into :attr:`Report.data`).

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.audit import Report
    >>> r = Report("demo")
    >>> s = r.section("Images", "Two random images and a heatmap.")
    >>> s.image_grid([np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8)], titles=["a", "b"])
    >>> s.heatmap(np.eye(8), title="eye")
    >>> s.line_plot({"y=x": ([0, 1, 2], [0, 1, 2])}, xlabel="x", ylabel="y")
    >>> s.table([{"k": 1, "acc": 0.5}])
    >>> sorted(p.name for p in r.write(tempfile.mkdtemp()))
    ['report.html', 'report.json']
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keepbits._fs import sibling_temp
from keepbits._json import jsonable
from keepbits.codec.images import encode_image

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:10px}.cell{text-align:center;font-size:.8em}
.cell img{image-rendering:pixelated;display:block;border:1px solid #ddd}.note{color:#555}
.colorbar{display:flex;align-items:center;gap:6px;font-size:.75em}
"""


def to_png(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes (:func:`keepbits.codec.encode_image`, zlib level 9) of a uint8 H×W, H×W×1 or H×W×3
    image (float images in [0, 1] are scaled), enlarged ``scale``×."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(np.nan_to_num(img.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
    return encode_image(img, "png", png_level=9)


#: Colour maps as 17 evenly spaced anchors (matplotlib's viridis and magma), linearly interpolated.
COLORMAPS = {
    "viridis": ("440154 48186a 472d7b 424086 3b528b 33638d 2c728e 26828e 21918c 1fa088 28ae80 3fbc73 5ec962 84d44b "
                "addc30 d8e219 fde725"),
    "magma": ("000004 0a0822 1d1147 36106b 51127c 6a1c81 832681 9c2e7f b73779 d0416f e75263 f56b5c fc8961 fea772 "
              "fec488 fde2a3 fcfdbf"),
}


def colorize(values: np.ndarray, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Map a 2-D array to uint8 RGB with a colour map of :data:`COLORMAPS` (NaN → white).

    Example:
        >>> import numpy as np
        >>> from keepbits.audit import colorize
        >>> colorize(np.array([[0.0, 1.0, np.nan]])).tolist()
        [[[68, 1, 84], [253, 231, 37], [255, 255, 255]]]
    """
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in COLORMAPS[cmap].split()], np.float64)
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    scaled = np.clip(np.nan_to_num((v - lo) / (hi - lo)) if hi > lo else np.zeros_like(v), 0.0, 1.0)
    position = scaled * (len(anchors) - 1)
    rgb = np.stack([np.interp(position, np.arange(len(anchors)), anchors[:, k]) for k in range(3)], -1)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[~np.isfinite(v)] = 255
    return rgb


def overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = (255, 0, 0), alpha: float = 0.6, dim: float = 0.35) -> np.ndarray:
    """``image`` (uint8 H×W×C) with ``mask`` (H×W bool) pixels tinted ``color`` and the rest dimmed."""
    img = np.asarray(image, dtype=np.float64)
    img = np.repeat(img, 3, axis=-1) if img.ndim == 3 and img.shape[-1] == 1 else (img[..., None].repeat(3, -1) if img.ndim == 2 else img)
    m = np.asarray(mask, dtype=bool)[..., None]
    tinted = (1 - alpha) * img + alpha * np.asarray(color, dtype=np.float64)
    return np.clip(np.rint(np.where(m, tinted, img * dim)), 0, 255).astype(np.uint8)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


class Section:
    """One titled part of a report; add blocks in display order."""

    def __init__(self, title: str, text: str = ""):
        self.title = title
        self.blocks: list[str] = []
        self.record: dict[str, Any] = {"title": title, "text": text, "tables": [], "plots": [], "figures": []}
        if text:
            self.text(text, record=False)

    def text(self, text: str, note: bool = False, record: bool = True) -> None:
        """A paragraph (plain text, escaped); ``note=True`` greys it."""
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")
        if record:
            self.record.setdefault("notes", []).append(text)

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str = "") -> None:
        """A table of dict rows; ``columns`` picks and orders the keys (default: first row's)."""
        rows = list(rows)
        columns = list(columns or (rows[0].keys() if rows else []))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        self.record["tables"].append({"caption": caption, "columns": columns, "rows": jsonable(rows)})

    def image_grid(self, images: Sequence[np.ndarray], titles: Sequence[str] | None = None, cols: int | None = None,
                   scale: int | None = None, caption: str = "") -> None:
        """Images (uint8 H×W[×C] or float in [0, 1]) in rows of ``cols``; small images are enlarged."""
        cells = []
        for i, img in enumerate(images):
            h = np.asarray(img).shape[0]
            s = scale or max(1, 96 // max(h, 1))
            title = html.escape(titles[i]) if titles is not None and i < len(titles) else ""
            cells.append(f'<div class="cell"><img src="{_data_uri(to_png(img, s))}" alt="{title}"><span>{title}</span></div>')
        style = f' style="display:grid;grid-template-columns:repeat({cols},max-content);gap:10px"' if cols else ' class="grid"'
        cap = f'<p class="note">{html.escape(caption)}</p>' if caption else ""
        self.blocks.append(f"<div{style}>{''.join(cells)}</div>{cap}")
        self.record["figures"].append({"kind": "image_grid", "caption": caption, "titles": list(titles or [])})

    def heatmap(self, values: np.ndarray, title: str = "", cmap: str = "viridis", scale: int | None = None,
                vmin: float | None = None, vmax: float | None = None, caption: str = "") -> None:
        """A 2-D array as a colour image with a colour bar (values also go to the JSON)."""
        v = np.asarray(values, dtype=np.float64)
        finite = v[np.isfinite(v)]
        lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        s = scale or max(1, 192 // max(v.shape[0], 1))
        bar = colorize(np.linspace(lo, hi, 128)[None, :].repeat(8, 0), cmap, lo, hi)
        self.blocks.append(
            f'<div class="cell" style="display:inline-block;margin-right:16px"><img src="{_data_uri(to_png(colorize(v, cmap, lo, hi), s))}" alt="{html.escape(title)}">'
            f'<div class="colorbar">{_fmt(lo)}<img src="{_data_uri(to_png(bar))}" style="border:0">{_fmt(hi)}</div>'
            f"<span>{html.escape(title)}</span></div>" + (f'<p class="note">{html.escape(caption)}</p>' if caption else "")
        )
        self.record["figures"].append({"kind": "heatmap", "title": title, "caption": caption, "values": jsonable(v)})

    def line_plot(self, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = "", ylabel: str = "",
                  title: str = "", width: int = 520, height: int = 300, errors: Mapping[str, Sequence[float]] | None = None,
                  log_x: bool = False) -> None:
        """Inline SVG line plot of ``{name: (xs, ys)}``; ``errors`` adds ±bars per point."""
        self.blocks.append(_svg_plot(series, xlabel, ylabel, title, width, height, errors or {}, log_x))
        self.record["plots"].append({"title": title, "xlabel": xlabel, "ylabel": ylabel,
                                     "series": {k: {"x": jsonable(list(x)), "y": jsonable(list(y))} for k, (x, y) in series.items()},
                                     "errors": jsonable(dict(errors or {}))})

    def html(self) -> str:
        return f"<h2>{html.escape(self.title)}</h2>\n" + "\n".join(self.blocks)


def _svg_plot(series, xlabel, ylabel, title, width, height, errors, log_x) -> str:
    left, right, top, bottom = 60, 130, 28, 42
    pts = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(float(y))]
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    if not pts:
        return f"<p class='note'>{html.escape(title)}: no data</p>"
    xs = [tx(p[0]) for p in pts]
    ys = [p[1] for p in pts]
    for name, (sx, sy) in series.items():
        for y, e in zip(sy, errors.get(name, ())):
            if math.isfinite(float(y)) and math.isfinite(float(e)):
                ys += [float(y) - float(e), float(y) + float(e)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + (tx(v) - x0) / (x1 - x0) * pw

    def py(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" font-family="sans-serif">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
           f'<text x="{left + pw / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">{html.escape(ylabel)}</text>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        xv = x0 + (x1 - x0) * i / 4
        xlabel_v = 10 ** xv if log_x else xv
        out.append(f'<text x="{left - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{_fmt(yv)}</text>')
        out.append(f'<text x="{left + (xv - x0) / (x1 - x0) * pw:.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(xlabel_v)}</text>')
    for k, (name, (xs_, ys_)) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        good = [(float(x), float(y)) for x, y in zip(xs_, ys_) if math.isfinite(float(y))]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(good))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for (x, y), e in zip(good, errors.get(name, [0] * len(good))):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>')
            if e and math.isfinite(float(e)):
                out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(y - float(e)):.1f}" y2="{py(y + float(e)):.1f}" stroke="{color}"/>')
        out.append(f'<rect x="{width - right + 10}" y="{top + 16 * k}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{width - right + 24}" y="{top + 16 * k + 9}">{html.escape(str(name))}</text>')
    out.append("</svg>")
    return "".join(out)


class Report:
    """An audit report: ``section()`` adds parts, ``data`` holds extra JSON, ``write()`` saves both files."""

    def __init__(self, title: str, meta: Mapping[str, Any] | None = None):
        self.title = title
        self.meta = dict(meta or {})
        self.sections: list[Section] = []
        self.data: dict[str, Any] = {}

    def section(self, title: str, text: str = "") -> Section:
        sec = Section(title, text)
        self.sections.append(sec)
        return sec

    def html(self) -> str:
        meta = "".join(f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{_fmt(v)}</td></tr>" for k, v in self.meta.items())
        body = "\n".join(s.html() for s in self.sections)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<table>{meta}</table>\n{body}\n</body></html>\n")

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "meta": jsonable(self.meta), "sections": [s.record for s in self.sections], "data": jsonable(self.data)}

    def write(self, out_dir: str | Path, name: str = "report") -> list[Path]:
        """Write ``<name>.html`` and ``<name>.json`` into ``out_dir`` atomically; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for suffix, text in ((".html", self.html()), (".json", json.dumps(self.to_json(), indent=1, allow_nan=True) + "\n")):
            path = out / f"{name}{suffix}"
            tmp = sibling_temp(path)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            paths.append(path)
        return paths
