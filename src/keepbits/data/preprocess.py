"""How a classifier sees an image, as one small typed record: :class:`Preprocessing` (input
size, mean/std, resize policy, class names), and the one implementation of the resize
policies, :func:`fit_into`, with its geometric record :class:`ImageFit` (the mapping from the
model image back to the source frame).

Resize policies (source W×H into model ``input_size`` H×W):

* ``resize``: stretch the whole frame to the model size;
* ``center-crop``: scale so the frame covers the model image, then keep the middle; with
  ``crop_fraction`` < 1 the frame is scaled up by 1 / ``crop_fraction`` first (ImageNet's
  "short side 256, centre 224" is ``crop_fraction = 0.875``);
* ``letterbox``: scale so the whole frame fits, centre it, pad with zeros.

Only the part of the frame the model sees is resized (OpenCV, area filter when shrinking,
bilinear when enlarging), straight into the output buffer.

Example:
    >>> import numpy as np
    >>> from keepbits.data import Preprocessing
    >>> pre = Preprocessing(input_size=(224, 224), resize_policy="center-crop", crop_fraction=0.875)
    >>> image, fit = pre.fit(np.zeros((256, 341, 3), np.uint8))
    >>> image.shape, fit.crop, fit.roi
    ((224, 224, 3), (58, 16, 224, 224), (0, 0, 224, 224))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import cv2
import numpy as np

from keepbits.errors import InputError

RESIZE_POLICIES = ("resize", "center-crop", "letterbox")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageFit:
    """Where a source frame went: its region ``crop`` (x0, y0, w, h, source pixels) was resized
    onto ``roi`` (x0, y0, w, h) of the model image; sizes are W×H. ``letterbox``: ``crop`` is the
    whole frame, ``roi`` the centred box; ``center-crop``: ``roi`` is the whole model image;
    ``resize``: both are whole."""

    source_size: tuple[int, int]
    model_size: tuple[int, int]
    crop: Box
    roi: Box

    @classmethod
    def plan(cls, source_size: tuple[int, int], model_size: tuple[int, int], policy: str = "letterbox",
             crop_fraction: float = 1.0) -> "ImageFit":
        """The fit of ``source_size`` into ``model_size`` (both W×H) under ``policy``.

        Example:
            >>> from keepbits.data import ImageFit
            >>> ImageFit.plan((640, 360), (224, 224)).roi
            (0, 49, 224, 126)
            >>> ImageFit.plan((640, 360), (224, 224), "center-crop").crop
            (140, 0, 360, 360)
        """
        (sw, sh), (mw, mh) = source_size, model_size
        if min(sw, sh, mw, mh) < 1:
            raise InputError(f"image sizes must be positive, got source {source_size} and model {model_size}")
        whole_source, whole_model = (0, 0, sw, sh), (0, 0, mw, mh)
        if policy == "resize":
            return cls((sw, sh), (mw, mh), whole_source, whole_model)
        if policy == "letterbox":
            scale = min(mw / sw, mh / sh)
            w, h = max(1, min(mw, round(sw * scale))), max(1, min(mh, round(sh * scale)))
            return cls((sw, sh), (mw, mh), whole_source, ((mw - w) // 2, (mh - h) // 2, w, h))
        if policy == "center-crop":
            scale = max(mw / sw, mh / sh) / crop_fraction
            w, h = max(1, min(sw, round(mw / scale))), max(1, min(sh, round(mh / scale)))
            return cls((sw, sh), (mw, mh), ((sw - w) // 2, (sh - h) // 2, w, h), whole_model)
        raise InputError(f"unknown resize policy {policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")

    @property
    def scale(self) -> tuple[float, float]:
        """Model pixels per source pixel, (x, y)."""
        return self.roi[2] / self.crop[2], self.roi[3] / self.crop[3]

    def to_source(self, points: Any) -> np.ndarray:
        """Map model-image (x, y) points (…×2) to source-frame coordinates.

        Example:
            >>> from keepbits.data import ImageFit
            >>> ImageFit.plan((640, 360), (224, 224)).to_source([112, 112]).round(1).tolist()
            [320.0, 180.0]
        """
        p = np.asarray(points, np.float64)
        sx, sy = self.scale
        return np.stack([(p[..., 0] - self.roi[0]) / sx + self.crop[0], (p[..., 1] - self.roi[1]) / sy + self.crop[1]], -1)

    def to_model(self, points: Any) -> np.ndarray:
        """Map source-frame (x, y) points (…×2) to model-image coordinates (inverse of :meth:`to_source`)."""
        p = np.asarray(points, np.float64)
        sx, sy = self.scale
        return np.stack([(p[..., 0] - self.crop[0]) * sx + self.roi[0], (p[..., 1] - self.crop[1]) * sy + self.roi[1]], -1)

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """A model-size mask on the source frame (nearest); zero where the model saw nothing."""
        return self.image_to_source(np.asarray(mask, np.float32), cv2.INTER_NEAREST)

    def image_to_source(self, image: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """A model-size image (or mask) resized back onto the source frame; pixels of the frame
        the model did not see (outside ``crop``) are zero.

        Example:
            >>> import numpy as np
            >>> from keepbits.data import ImageFit
            >>> fit = ImageFit.plan((64, 32), (32, 32), "center-crop")
            >>> back = fit.image_to_source(np.full((32, 32), 7, np.uint8))
            >>> back.shape, int(back[:, :16].max()), int(back[:, 16:48].min())
            ((32, 64), 0, 7)
        """
        x0, y0, w, h = self.roi
        cx, cy, cw, ch = self.crop
        part = cv2.resize(np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w]), (cw, ch), interpolation=interpolation)
        if (cw, ch) == self.source_size:
            return part
        out = np.zeros((self.source_size[1], self.source_size[0], *part.shape[2:]), part.dtype)
        out[cy:cy + ch, cx:cx + cw] = part
        return out


def fit_into(image: np.ndarray, out: np.ndarray, policy: str = "letterbox", crop_fraction: float = 1.0) -> ImageFit:
    """Apply ``policy`` to ``image`` (uint8 H×W×3 RGB or H×W grey) and write the model image into
    ``out`` (uint8 H×W×C, C = 1 or 3; the frame is converted to C channels); returns the
    :class:`ImageFit`. Nothing is allocated beyond what OpenCV needs for a colour conversion:
    the visible region is resized straight into ``out`` and only letterbox bands are zeroed.

    Example:
        >>> import numpy as np
        >>> from keepbits.data import fit_into
        >>> out = np.empty((32, 32, 3), np.uint8)
        >>> fit_into(np.full((48, 64, 3), 200, np.uint8), out).roi, int(out[0, 0, 0]), int(out[16, 16, 0])
        ((0, 4, 32, 24), 0, 200)
    """
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] not in (1, 3):
        raise InputError(f"output buffer must be uint8 H×W×C with C in (1, 3), got {out.dtype} {out.shape}")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise InputError(f"images must be uint8 H×W or H×W×3, got {image.dtype} {image.shape}")
    channels, (height, width) = out.shape[2], out.shape[:2]
    if channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    elif channels == 3 and image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    fit = ImageFit.plan((image.shape[1], image.shape[0]), (width, height), policy, crop_fraction)
    x0, y0, w, h = fit.roi
    if (w, h) != (width, height):
        out[:y0] = 0
        out[y0 + h:] = 0
        out[y0:y0 + h, :x0] = 0
        out[y0:y0 + h, x0 + w:] = 0
    cx, cy, cw, ch = fit.crop
    src, dst = image[cy:cy + ch, cx:cx + cw], out[y0:y0 + h, x0:x0 + w]
    if channels == 1:
        dst = dst[:, :, 0]
    if (w, h) == (cw, ch):
        dst[...] = src
    else:
        shrink = w < cw or h < ch
        resized = cv2.resize(src, (w, h), dst=dst, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if not np.shares_memory(resized, dst):  # OpenCV allocated (a non-contiguous view): copy it in
            dst[...] = resized
    return fit


def _floats(name: str, values: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"preprocessing {name} must be a list of numbers, got {values!r}") from None
    if len(out) not in (1, 3) or not all(np.isfinite(out)):
        raise InputError(f"preprocessing {name} must hold 1 or 3 finite numbers (one per channel), got {list(out)}")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """How a classifier sees an image. ``input_size`` is (H, W); ``mean``/``std`` are per
    channel on the [0, 1] scale (their length is the channel count, 1 or 3); ``resize_policy``
    is one of :data:`RESIZE_POLICIES`; ``crop_fraction`` (``center-crop`` only) is the share of
    the scaled frame's short side the crop keeps; ``class_names`` name the logits (may be empty).

    Example:
        >>> from keepbits.data import Preprocessing
        >>> pre = Preprocessing((96, 128), mean=(0.5,), std=(0.25,), resize_policy="resize")
        >>> Preprocessing.from_dict(pre.to_dict()) == pre, pre.channels
        (True, 1)
    """

    input_size: tuple[int, int]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize_policy: str = "letterbox"
    crop_fraction: float = 1.0
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            size = tuple(int(v) for v in self.input_size)
        except (TypeError, ValueError):
            raise InputError(f"preprocessing input_size must be (height, width), got {self.input_size!r}") from None
        if len(size) != 2 or min(size) < 1 or size != tuple(self.input_size):
            raise InputError(f"preprocessing input_size must be two positive integers (height, width), got {self.input_size!r}")
        mean, std = _floats("mean", self.mean), _floats("std", self.std)
        if len(mean) != len(std):
            raise InputError(f"preprocessing mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise InputError(f"preprocessing std must be positive, got {list(std)}")
        if self.resize_policy not in RESIZE_POLICIES:
            raise InputError(f"unknown resize policy {self.resize_policy!r}; choose one of {', '.join(RESIZE_POLICIES)}")
        crop = float(self.crop_fraction)
        if not 0.0 < crop <= 1.0:
            raise InputError(f"preprocessing crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if crop != 1.0 and self.resize_policy != "center-crop":
            raise InputError(f"crop_fraction applies to the center-crop policy only, not {self.resize_policy!r}")
        if isinstance(self.class_names, str) or not all(isinstance(c, str) for c in self.class_names):
            raise InputError("preprocessing class_names must be a list of strings")
        for name, value in (("input_size", size), ("mean", mean), ("std", std), ("crop_fraction", crop),
                            ("class_names", tuple(self.class_names))):
            object.__setattr__(self, name, value)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        """The inverse of :meth:`to_dict`; :class:`InputError` on unknown or missing fields."""
        if not isinstance(data, Mapping):
            raise InputError(f"preprocessing must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown preprocessing fields {unknown}; known: {sorted(known)}")
        if "input_size" not in data:
            raise InputError("preprocessing needs input_size (height, width)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def fit(self, image: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, ImageFit]:
        """The model-size uint8 image (H×W×C; into ``out`` when given) and its :class:`ImageFit`."""
        if out is None:
            out = np.empty((*self.input_size, self.channels), np.uint8)
        elif out.shape != (*self.input_size, self.channels):
            raise InputError(f"output buffer shape {out.shape} is not the model's {(*self.input_size, self.channels)}")
        return out, fit_into(image, out, self.resize_policy, self.crop_fraction)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×C (or H×W×C) model images → float32 N×C×H×W, ``(x / 255 − mean) / std``.

        Example:
            >>> import numpy as np
            >>> from keepbits.data import Preprocessing
            >>> Preprocessing((1, 1), mean=(0.5,), std=(0.5,)).normalize(np.full((1, 1, 1), 255, np.uint8)).tolist()
            [[[[1.0]]]]
        """
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise InputError(f"expected N×H×W×{self.channels} images, got shape {x.shape}")
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        inv_std = (1.0 / np.asarray(self.std, np.float32)).reshape(1, -1, 1, 1)
        return (x.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255) - mean) * inv_std
