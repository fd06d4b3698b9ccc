"""Self-contained HTML + JSON reports (no torch, no matplotlib; PNGs via Pillow, plots as inline
SVG or as PNG files): the audits' reports and ``keepbits eval``'s rate–accuracy report.

A :class:`Report` is a list of sections; each section holds text, tables, image grids,
heatmaps, line plots and PNG figures. :meth:`Report.write` produces ``report.html`` (every image
embedded as base64 PNG, readable offline without Python) and ``report.json`` (the same numbers,
plus whatever was put into :attr:`Report.data`). :func:`plot_png` draws a line plot as a PNG file.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbits.report import Report
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
import importlib.metadata
import json
import math
import os
import platform
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
        >>> from keepbits.report import colorize
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


def _generated_by() -> dict[str, Any]:
    """keepbits' and Python's versions, the platform and the CPU model (Linux), for a report's JSON."""
    from keepbits._version import __version__

    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "onnxruntime", "torch", "onnx"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"keepbits": __version__, "python": platform.python_version(), **versions, "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count()}


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plural(count: int, noun: str) -> str:
    """``count noun`` with an s unless ``count`` is 1.

    Example:
        >>> plural(1, "image"), plural(3, "layer")
        ('1 image', '3 layers')
    """
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits; no value (None, NaN: a mean over no images) as a dash."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
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

    def figure(self, png: bytes, caption: str = "") -> None:
        """A ready PNG (e.g. :func:`plot_png`) embedded as it is."""
        cap = f'<p class="note">{html.escape(caption)}</p>' if caption else ""
        self.blocks.append(f'<div class="cell"><img src="{_data_uri(png)}" alt="{html.escape(caption)}"></div>{cap}')
        self.record["figures"].append({"kind": "png", "caption": caption})

    def html(self) -> str:
        return f"<h2>{html.escape(self.title)}</h2>\n" + "\n".join(self.blocks)


class _PlotFrame:
    """Axis ranges, ticks and the data → pixel mapping of one line plot (shared by the SVG and PNG
    drawers): the finite points of every series and their ± error bars fit the plot area."""

    left, right, top, bottom = 64, 170, 28, 42

    def __init__(self, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], width: int, height: int,
                 errors: Mapping[str, Sequence[float]], log_x: bool):
        self.width, self.height, self.log_x = width, height, log_x
        self.curves = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
                       for name, (xs, ys) in series.items()}
        self.errors = {name: [float(e) for y, e in zip(series[name][1], errors.get(name, ())) if math.isfinite(float(y))]
                       for name in series}
        pts = [p for curve in self.curves.values() for p in curve]
        self.empty = not pts
        xs = [self._tx(x) for x, _ in pts] or [0.0]
        ys = [y for _, y in pts] or [0.0]
        for name, curve in self.curves.items():
            ys += [y + s * e for (_, y), e in zip(curve, self.errors[name]) if math.isfinite(e) for s in (-1, 1)]
        self.x0, self.y0 = min(xs), min(ys)
        self.x1 = max(xs) if max(xs) > self.x0 else self.x0 + 1
        self.y1 = max(ys) if max(ys) > self.y0 else self.y0 + 1
        self.pw, self.ph = width - self.left - self.right, height - self.top - self.bottom

    def _tx(self, v: float) -> float:
        return math.log10(v) if self.log_x else v

    def px(self, v: float) -> float:
        return self.left + (self._tx(v) - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, v: float) -> float:
        return self.top + (1 - (v - self.y0) / (self.y1 - self.y0)) * self.ph

    def ticks(self, n: int = 5) -> list[tuple[float, float, str, str]]:
        """``n`` ticks per axis: (x pixel, y pixel, x label, y label)."""
        out = []
        for i in range(n):
            xv = self.x0 + (self.x1 - self.x0) * i / (n - 1)
            yv = self.y0 + (self.y1 - self.y0) * i / (n - 1)
            out.append((self.left + (xv - self.x0) / (self.x1 - self.x0) * self.pw, self.py(yv),
                        _fmt(10 ** xv if self.log_x else xv), _fmt(yv)))
        return out


def _svg_plot(series, xlabel, ylabel, title, width, height, errors, log_x) -> str:
    f = _PlotFrame(series, width, height, errors, log_x)
    if f.empty:
        return f"<p class='note'>{html.escape(title + ': no data' if title else 'No data to plot.')}</p>"
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" font-family="sans-serif">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>',
           f'<text x="{left + pw / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">{html.escape(ylabel)}</text>']
    for x, y, xl, yl in f.ticks():
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{yl}</text>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{xl}</text>')
    for k, (name, good) in enumerate(f.curves.items()):
        color = _PALETTE[k % len(_PALETTE)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{f.px(x):.1f},{f.py(y):.1f}" for i, (x, y) in enumerate(good))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        for (x, y), e in zip(good, f.errors[name] or [0.0] * len(good)):
            out.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.5" fill="{color}"/>')
            if e and math.isfinite(e):
                out.append(f'<line x1="{f.px(x):.1f}" x2="{f.px(x):.1f}" y1="{f.py(y - e):.1f}" y2="{f.py(y + e):.1f}" stroke="{color}"/>')
        out.append(f'<rect x="{width - f.right + 10}" y="{top + 16 * k}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{width - f.right + 24}" y="{top + 16 * k + 9}">{html.escape(str(name))}</text>')
    out.append("</svg>")
    return "".join(out)


def plot_png(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = "", ylabel: str = "", title: str = "",
             width: int = 640, height: int = 400, log_x: bool = False) -> bytes:
    """A line plot of ``{name: (xs, ys)}`` as PNG bytes (Pillow's default font; no matplotlib).

    Example:
        >>> from keepbits.report import plot_png
        >>> plot_png({"a": ([1, 2, 3], [0.5, 0.7, 0.9])}, "bytes", "accuracy")[:4]
        b'\x89PNG'
    """
    from PIL import Image, ImageDraw, ImageFont

    f = _PlotFrame(series, width, height, {}, log_x)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    draw.rectangle([f.left, f.top, f.left + f.pw, f.top + f.ph], outline="#888888")
    draw.text((f.left + f.pw / 2, 4), title, fill="black", anchor="mt", font=ImageFont.load_default(size=14))
    draw.text((f.left + f.pw / 2, height - 4), xlabel, fill="black", anchor="md", font=font)
    if ylabel:  # drawn horizontally, then turned a quarter left
        box = draw.textbbox((0, 0), ylabel, font=font)
        label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
        ImageDraw.Draw(label).text((1, 1), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (4, max(0, int(f.top + f.ph / 2 - label.height / 2))))
    for x, y, xl, yl in f.ticks() if not f.empty else ():
        draw.text((f.left - 4, y), yl, fill="black", anchor="rm", font=font)
        draw.text((x, f.top + f.ph + 4), xl, fill="black", anchor="mt", font=font)
    for k, (name, good) in enumerate(f.curves.items()):
        color = _PALETTE[k % len(_PALETTE)]
        points = [(f.px(x), f.py(y)) for x, y in good]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px_, py_ in points:
            draw.ellipse([px_ - 3, py_ - 3, px_ + 3, py_ + 3], fill=color)
        ly = f.top + 16 * k
        draw.rectangle([width - f.right + 10, ly, width - f.right + 20, ly + 10], fill=color)
        draw.text((width - f.right + 24, ly - 1), str(name), fill="black", font=font)
    return to_png(np.asarray(image))


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
        """The report as JSON, with what made it: keepbits' version, Python's, the platform and CPU."""
        return {"title": self.title, "meta": jsonable(self.meta), "sections": [s.record for s in self.sections], "data": jsonable(self.data),
                "generated_by": _generated_by()}

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
