"""Reconstruction uncertainty (RU) of a layer: Ma, Zhang et al., "Quantification and Analysis
of Layer-wise and Pixel-wise Information Discarding" (ICML 2022, Eq. 6–7; Eq. 8–11 of the
earlier ICLR submission).

A decoder ``g`` is trained to rebuild the input from the layer's feature, ``min_g E_x ‖g(h(x)) − x‖²``
(MSE over training images, Adam). RU then asks how uncertain the *reconstruction* is over the
inputs the layer cannot tell apart: the input is perturbed, ``x' = x + σ∘δ``, ``δ ~ N(0, I)``,
under the same feature constraint as CID (Eq. 4: ``E‖h(x') − f‖² = β δ_f²``), and σ is chosen to
maximise the entropy of the reconstruction ``x̂' = g(h(x'))`` of the perturbed feature (Eq. 6):

    min_σ  E‖h(x') − f‖² / δ_f²  −  λ Σ_i H(X̂'_i),

with each reconstructed pixel modelled as a Gaussian around the true input (Eq. 7):

    H(X̂'_i) = ½ log(2πe σ̃_i²),   σ̃_i² = E_δ[(x̂'_i − x_i)²],

and the RU map is ``RU_i = H(X̂'_i)`` at the optimum (nats per channel value, normalised input
scale). Choices the paper leaves open, made here: σ̃_i² is the mean over the noise draws and the
channels of pixel ``i`` (log of the mean: the Gaussian entropy; the authors' released code
averages the log of each draw's squared error instead); σ is per pixel, shared over channels
(``block`` × ``block`` cells with ``CIDConfig.block``), fitted with CID's optimiser and λ
calibration (:func:`keepbits.audit.cid.fit_sigma`, same β); the decoder works on the
normalised input scale; 32 fresh draws (``final_samples``) give the reported map.

RU includes the decoder's own error: with the feature kept exactly (σ = 0) it would be
``½ log(2πe (x_i − g(h(x))_i)²)``, reported as ``floor`` so that the part due to the
perturbation can be told apart from the part due to the decoder. Where μ_rec of Eq. 7 is read as
the mean of the reconstructions rather than the input, the decoder's bias cancels: that map,
``½ log(2πe Var_δ[x̂'_i])`` from the same final draws at the same σ, is reported as ``spread``.

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
    >>> ru.shape, fit["ratio"].shape, fit["floor"].shape, fit["spread"].shape
    ((2, 8, 8), (2,), (2, 8, 8), (2, 8, 8))
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
from keepbits.data import train_val_split
from keepbits.errors import InputError
from keepbits.training.distributed import on_device

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
    from keepbits.training.checkpoint import state_digest

    digest = hashlib.sha256(state_digest(module).encode())
    digest.update(json.dumps({"layer": layer, "decoder": asdict(cfg), "images": list(images.shape)}, sort_keys=True).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_decoder(module: Any, layer: str, images: Any, config: DecoderConfig | None = None,
                  cache_dir: str | Path | None = "default", device: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Train (or load from ``cache_dir``; ``None`` disables the cache) the decoder of
    ``layer`` on normalised float N×C×H×W ``images`` (numpy or tensor): MSE to the input, Adam
    with a one-cycle schedule. A seeded tenth of the images is held out; returns ``(decoder in eval mode, info)`` with train / held-out
    MSE and the held-out fraction of variance explained. ``device``: where to train (the
    decoder is returned on the CPU)."""
    import torch

    cfg = config or DecoderConfig()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images.float()
    if x.ndim != 4 or len(x) < 2:
        raise InputError(f"decoder training needs N×C×H×W images with N ≥ 2, got shape {tuple(x.shape)}")
    with on_device(module, device) as dev:
        return _train_or_load(module, layer, x, cfg, cache_dir, dev)


def _train_or_load(module: Any, layer: str, x: Any, cfg: DecoderConfig, cache_dir: str | Path | None, dev: Any) -> tuple[Any, dict[str, Any]]:
    import torch

    tap = LayerTap(module, [layer])
    try:
        with torch.no_grad():
            feature_shape = tuple(tap(x[:1].to(dev))[layer].shape[1:])
        decoder = _build_decoder(feature_shape, tuple(x.shape[1:]), cfg)
        cache = None if cache_dir is None else (default_cache_dir() if cache_dir == "default" else Path(cache_dir))
        path = cache / f"{_fingerprint(module, layer, x, cfg)[:32]}.pt" if cache is not None else None
        if path is not None and path.is_file():
            try:
                record = torch.load(path, map_location="cpu", weights_only=True)
                decoder.load_state_dict(record["state_dict"])
                return decoder.eval(), {**record["info"], "cached": True}
            except Exception as exc:  # noqa: BLE001 - a damaged cache file (any unpickler or shape error) is retrained, not fatal
                log.warning("%s: unreadable cached decoder (%s); training it again", path, next(iter(str(exc).splitlines()), type(exc).__name__))
        info = _fit(decoder.to(dev), tap, layer, x.to(dev), cfg)
        decoder.cpu()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"state_dict": decoder.state_dict(), "info": info}, tmp)
            os.replace(tmp, path)
        return decoder.eval(), {**info, "cached": False}
    finally:
        tap.remove()


def _fit(decoder: Any, tap: LayerTap, layer: str, x: Any, cfg: DecoderConfig) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = train_val_split(np.zeros(len(x), np.int64), max(0.1, 1.0 / len(x)), cfg.seed)  # seeded (one class): the images may be sorted by class
    train, val = x[torch.as_tensor(train_idx)], x[torch.as_tensor(val_idx)]
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    decoder.train()
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(train), generator=gen).to(x.device).split(cfg.batch_size):
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
    """RU maps (Eq. 6–7; N×H×W, nats) of ``x`` (normalised N×C×H×W) at ``layer``: σ fitted to
    maximise the entropy of ``g(h(x + σ∘δ))`` around ``x`` under the feature constraint of CID
    (same :class:`~keepbits.audit.cid.CIDConfig`), then ``½ log(2πe E[(g(h(x')) − x)²])`` per
    pixel from ``final_samples`` fresh draws.

    Returns the maps and, per image, the fit's ``ratio``, ``steps``, ``converged``, ``log_sigma``
    (N×1×H/b×W/b), the window traces (``trace_*``), ``floor`` (N×H×W: the map at σ = 0, i.e.
    the decoder's own error) and ``spread`` (N×H×W: ``½ log(2πe Var_δ[g(h(x'))])``, the same draws
    centred on their own mean instead of ``x``: the reconstruction's variation alone, no decoder bias;
    the unbiased variance over the S draws, so with an unbiased decoder it can exceed RU by up to
    ½ log(S/(S−1)), 0.016 nats at S = 32).
    """
    import torch

    cfg = config or CIDConfig()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    b = cfg.block
    fits: list[dict[str, np.ndarray]] = []
    maps, floors, spreads = [], [], []
    with on_device(module, cfg.device) as device, on_device(decoder, cfg.device):
        tap = LayerTap(module, [layer])
        try:
            for chunk in x.to(device).split(batch_size):

                def rebuilt(perturbed: Any) -> Any:
                    """g(f') of S×R perturbed features, S×R×C×H×W."""
                    s, r = perturbed.shape[:2]
                    return decoder(perturbed.reshape(s * r, *perturbed.shape[2:])).reshape(s, r, *chunk.shape[1:])

                def rebuilt_error(perturbed: Any, target: Any) -> Any:
                    """Mean over draws and channels of (g(f') − x)² per pixel; ``perturbed``: S×R×feature."""
                    return (rebuilt(perturbed) - target[None]).pow(2).mean(dim=(0, 2)).clamp_min(1e-12)

                def entropy(log_sigma: Any, index: Any, perturbed: dict[str, Any]) -> Any:
                    return (0.5 * rebuilt_error(perturbed[layer], chunk[index]).log() + GAUSS_ENTROPY).flatten(1).sum(1)

                with torch.enable_grad():
                    fit = fit_sigma(tap, chunk, [layer] * len(chunk), cfg, entropy)
                with torch.no_grad():
                    sigma = torch.as_tensor(fit["log_sigma"], device=device).exp()
                    sigma = sigma.repeat_interleave(b, 2).repeat_interleave(b, 3)
                    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
                    noise = sigma[None] * torch.randn((cfg.final_samples, *chunk.shape), generator=gen, device=device)
                    perturbed = tap((chunk[None] + noise).reshape(-1, *chunk.shape[1:]))[layer]
                    rec = rebuilt(perturbed.reshape(cfg.final_samples, len(chunk), *perturbed.shape[1:]))
                    err2 = (rec - chunk[None]).pow(2).mean(dim=(0, 2)).clamp_min(1e-12)
                    maps.append((0.5 * err2.log() + GAUSS_ENTROPY).cpu().numpy())
                    spreads.append((0.5 * rec.var(dim=0).mean(dim=1).clamp_min(1e-12).log() + GAUSS_ENTROPY).cpu().numpy())
                    floors.append((0.5 * rebuilt_error(tap(chunk)[layer][None], chunk).log() + GAUSS_ENTROPY).cpu().numpy())
                fits.append(fit)
        finally:
            tap.remove()
    out = {k: np.concatenate([f[k] for f in fits]) for k in fits[0] if k in ("ratio", "steps", "converged", "log_sigma") or k.startswith("trace_")}
    out["floor"] = np.concatenate(floors).astype(np.float32)
    out["spread"] = np.concatenate(spreads).astype(np.float32)
    return np.concatenate(maps).astype(np.float32), out
