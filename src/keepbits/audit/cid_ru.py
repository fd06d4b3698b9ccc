"""Reconstruction uncertainty (RU, Ma, Zhang et al. ICML 2022, Eq. 7) of a layer.

A decoder ``g`` is trained (MSE) to rebuild the normalised input from the layer's feature.
The CID procedure (Eq. 3–4, same β and λ calibration) then learns σ̂ for the
*reconstruction* ``μ_rec = g(h(x))`` in place of the feature, and the pixel-wise RU is the
entropy of a Gaussian with the spread of the perturbed inputs around the reconstruction:

    RU_i = ½ log E[(μ_rec,i − x'_i)²] + ½ log(2πe),   x' = x + σ̂∘δ,

the expectation running over δ and the channels of pixel ``i`` (normalised input scale).
It is high where the decoder cannot rebuild the pixel (large ``x − μ_rec``) or where the
pixel can change a lot without changing the reconstruction (large σ̂).

The decoder has one architecture for every layer: an input adapter that brings the
feature onto a fixed grid of ⌈H/4⌉×⌈W/4⌉ cells (strided conv for larger maps, 1×1 conv and
bilinear resize for smaller ones, a linear layer for flat features), ``blocks`` residual
blocks (six by default) of ``width`` channels on that grid, and two stride-2 transposed
convolutions back to the input size. Trained decoders are cached per (model weights,
layer, decoder settings, training images) under ``cache_dir``.

Example:
    >>> import torch
    >>> from keepbits.audit.cid import CIDConfig
    >>> from keepbits.audit.cid_ru import DecoderConfig, reconstruction_uncertainty, train_decoder
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    >>> x = torch.randn(16, 1, 8, 8)
    >>> dec, info = train_decoder(net, "1", x, DecoderConfig(epochs=1, width=8, blocks=1), cache_dir=None)
    >>> ru, fit = reconstruction_uncertainty(net, "1", dec, x[:2], CIDConfig(max_steps=40))
    >>> ru.shape, fit["ratio"].shape
    ((2, 8, 8), (2,))
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keepbits.audit._cid_tap import GAUSS_ENTROPY, LayerTap
from keepbits.audit.cid import CIDConfig, fit_sigma
from keepbits.errors import InputError

log = logging.getLogger("keepbits")


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder architecture and training: ``blocks`` residual blocks of ``width`` channels,
    ``epochs`` of Adam (``lr``, ``batch_size``) on the MSE to the normalised input."""

    blocks: int = 6
    width: int = 48
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/keepbits/cid-decoders`` (``~/.cache`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keepbits" / "cid-decoders"


def _build_decoder(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], cfg: DecoderConfig) -> Any:
    import torch
    from torch import nn
    import torch.nn.functional as F

    c, h, w = image_shape
    gh, gw = math.ceil(h / 4), math.ceil(w / 4)

    class Block(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.body(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            if len(feature_shape) == 1:
                self.adapter = nn.Sequential(nn.Linear(feature_shape[0], cfg.width * gh * gw), nn.Unflatten(1, (cfg.width, gh, gw)))
            elif len(feature_shape) == 3:
                fc, fh, fw = feature_shape
                stride = max(1, min(fh // gh, fw // gw))
                self.adapter = nn.Conv2d(fc, cfg.width, stride, stride) if stride > 1 else nn.Conv2d(fc, cfg.width, 1)
            else:
                raise InputError(f"cannot decode a feature of shape {feature_shape}: expected C×H×W or a flat vector")
            self.blocks = nn.Sequential(*[Block(cfg.width) for _ in range(cfg.blocks)])
            up = [nn.ConvTranspose2d(cfg.width, cfg.width, 4, 2, 1), nn.BatchNorm2d(cfg.width), nn.ReLU(inplace=True)]
            self.up = nn.Sequential(*up, nn.ConvTranspose2d(cfg.width, cfg.width, 4, 2, 1), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(cfg.width, c, 3, padding=1)

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            z = self.adapter(f)
            if z.shape[-2:] != (gh, gw):
                z = F.interpolate(z, size=(gh, gw), mode="bilinear", align_corners=False)
            z = self.up(self.blocks(F.relu(z)))
            return self.head(z[..., :h, :w])

    return Decoder()


def _fingerprint(module: Any, layer: str, images: Any, cfg: DecoderConfig) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"layer": layer, "decoder": asdict(cfg), "images": list(images.shape)}, sort_keys=True).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_decoder(module: Any, layer: str, images: Any, config: DecoderConfig | None = None,
                  cache_dir: str | Path | None = "default") -> tuple[Any, dict[str, Any]]:
    """Train (or load from ``cache_dir``; ``None`` disables the cache) the decoder of
    ``layer`` on normalised float N×C×H×W ``images`` (numpy or tensor). The last tenth of
    the images is held out; returns ``(decoder in eval mode, info)`` with train / held-out
    MSE and the held-out fraction of variance explained."""
    import torch

    cfg = config or DecoderConfig()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images.float()
    if x.ndim != 4 or len(x) < 2:
        raise InputError(f"decoder training needs N×C×H×W images with N ≥ 2, got shape {tuple(x.shape)}")
    was_training = module.training
    module.eval()
    tap = LayerTap(module, [layer])
    try:
        with torch.no_grad():
            feature_shape = tuple(tap(x[:1])[layer].shape[1:])
        decoder = _build_decoder(feature_shape, tuple(x.shape[1:]), cfg)
        cache = None if cache_dir is None else (default_cache_dir() if cache_dir == "default" else Path(cache_dir))
        path = cache / f"{_fingerprint(module, layer, x, cfg)[:32]}.pt" if cache is not None else None
        if path is not None and path.is_file():
            record = torch.load(path, map_location="cpu", weights_only=True)
            decoder.load_state_dict(record["state_dict"])
            return decoder.eval(), {**record["info"], "cached": True}
        info = _fit(decoder, tap, layer, x, cfg)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"state_dict": decoder.state_dict(), "info": info}, tmp)
            os.replace(tmp, path)
        return decoder.eval(), {**info, "cached": False}
    finally:
        tap.remove()
        module.train(was_training)


def _fit(decoder: Any, tap: LayerTap, layer: str, x: Any, cfg: DecoderConfig) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(cfg.seed)
    n_val = max(1, len(x) // 10)
    train, val = x[: len(x) - n_val], x[len(x) - n_val :]
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    decoder.train()
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            with torch.no_grad():
                feat = tap(train[batch])[layer]
            loss = F.mse_loss(decoder(feat), train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    decoder.eval()
    with torch.no_grad():
        rec = torch.cat([decoder(tap(b)[layer]) for b in val.split(cfg.batch_size)])
        val_mse = F.mse_loss(rec, val).item()
    return {"train_mse": float(loss.item()), "val_mse": val_mse, "val_r2": 1.0 - val_mse / max(val.var().item(), 1e-12),
            "train_images": len(train), "val_images": len(val), "config": asdict(cfg)}


def reconstruction_uncertainty(module: Any, layer: str, decoder: Any, x: Any, config: Any = None,
                               batch_size: int = 16) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eq. 7: RU maps (N×H×W, nats) of ``x`` (normalised N×C×H×W) at ``layer``.

    σ̂ is fitted with the CID procedure (Eq. 3–4, same :class:`~keepbits.audit.cid.CIDConfig`)
    on the reconstruction ``x̂ = g(h(x))`` instead of the feature; then
    ``RU_i = ½ log E[(μ_rec,i − x'_i)²] + ½ log(2πe)`` with ``μ_rec = g(h(x))`` and
    ``x' = x + σ̂∘δ``, i.e. ``½ log(mean_c (x − μ_rec)² + σ̂_i²) + ½ log(2πe)``: the spread of
    the inputs the layer (through its decoder) cannot tell apart, around what it rebuilds.
    Returns the maps and the fit's per-image ``ratio`` / ``steps`` arrays.
    """
    import torch
    from torch import nn


    cfg = config or CIDConfig()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()

    class Reconstruction(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.decoder(inner(inputs)[layer])

    was_training = module.training
    module.eval()
    decoder.eval()
    inner = LayerTap(module, [layer])
    wrapper = Reconstruction()
    outer = LayerTap(wrapper, ["decoder"])
    maps, ratio, steps = [], [], []
    try:
        with torch.enable_grad():
            for chunk in x.split(batch_size):
                fit = fit_sigma(outer, chunk, ["decoder"] * len(chunk), cfg)
                with torch.no_grad():
                    rec = outer(chunk)["decoder"]
                sigma2 = np.exp(2 * fit["log_sigma"][:, 0]).repeat(cfg.block, 1).repeat(cfg.block, 2)
                err2 = (chunk - rec).pow(2).mean(1).numpy()
                maps.append(0.5 * np.log(err2 + sigma2) + GAUSS_ENTROPY)
                ratio.append(fit["ratio"])
                steps.append(fit["steps"])
    finally:
        outer.remove()
        inner.remove()
        module.train(was_training)
    return np.concatenate(maps).astype(np.float32), {"ratio": np.concatenate(ratio), "steps": np.concatenate(steps)}
