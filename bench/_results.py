"""Bookkeeping for bench scripts (it lives in :mod:`keepbits.benchmarking`), a figure helper and a frame reader."""
from pathlib import Path

import numpy as np

from keepbits.benchmarking import default_data_dir, machine, results_dir, write_result

__all__ = ["default_data_dir", "machine", "results_dir", "save_image_rows", "video_frames", "write_result"]


def save_image_rows(rows: list[tuple[str, np.ndarray]], path: Path, per_row: int = 10) -> None:
    """PNG with one labelled strip per ``(title, images)``: the first ``per_row`` images
    (N×C×H×W floats in [0, 1], gray or RGB), shown at 2× size."""
    from PIL import Image, ImageDraw

    strips = []
    for title, imgs in rows:
        tiles = [(np.repeat(t, 3, 0) if t.shape[0] == 1 else t).transpose(1, 2, 0) for t in imgs[:per_row]]
        strip = np.concatenate([np.pad((t * 255).round().astype(np.uint8), ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1)
        canvas = Image.new("RGB", (strip.shape[1] + 150, strip.shape[0]), "white")
        canvas.paste(Image.fromarray(strip), (150, 0))
        ImageDraw.Draw(canvas).text((4, strip.shape[0] // 2 - 6), title, fill="black")
        strips.append(np.asarray(canvas))
    width = max(s.shape[1] for s in strips)
    grid = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def video_frames(path: Path, count: int, step: int = 1) -> list[np.ndarray]:
    """Every ``step``-th frame of a video (RGB uint8, via :func:`keepbits.runtime.open_source`), ``count`` at most."""
    from keepbits.runtime import open_source

    frames: list[np.ndarray] = []
    with open_source(path) as src:
        for i, frame in enumerate(iter(src.get, None)):
            if len(frames) == count:
                break
            if i % step == 0:
                frames.append(frame.image)
    return frames
