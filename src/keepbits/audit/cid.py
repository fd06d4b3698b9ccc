"""Pixel-wise information discarding (CID) of any layer: Ma, Zhang et al., "Quantification
and Analysis of Layer-wise and Pixel-wise Information Discarding" (ICML 2022).

For an input ``x`` (on the classifier's *normalised* input scale: per-channel
``(pixel/255 - mean) / std``) and the feature ``f = h(x)`` of a named layer, CID learns a
noise scale ``σ_i`` per pixel (shared over channels, optionally per ``block``×``block``
cell) of the perturbation ``x' = x + σ∘δ``, ``δ ~ N(0, I)``, by minimising (Eq. 3)

    L(σ) = E‖h(x') − f‖² / δ_f²  −  λ Σ_i H_i(σ_i),      H_i = log σ_i + ½ log(2πe),

where ``δ_f² = lim_{ξ→0} E‖h(x + ξε) − f‖² / ξ²`` (ε ~ N(0, I)) is the layer's sensitivity
to isotropic input noise, estimated with finite differences. ``H_i`` is the entropy (nats,
per channel value, normalised scale) of the Gaussian perturbation of pixel ``i``: a high
``H_i`` means the layer discards pixel ``i``. λ is adapted during the optimisation (dual
ascent on log λ) so that ``E‖f' − f‖² ≈ β δ_f²`` at the end (Eq. 4); the achieved ratio is
reported per map and maps outside ``tolerance`` are flagged. The ratio
``‖f' − f‖²/δ_f²`` is invariant to rescaling the feature, which makes CID comparable across
layers and networks (§3.4).

Why the initial λ is ``2β/(H·W)``: for a locally linear layer ``h(x + Δ) ≈ f + JΔ``, the
stationary point of Eq. 3 has ``2σ_i² g_i / δ_f² = λ w_i`` for every pixel (``g_i``: squared
column norms of ``J`` for that pixel, ``w_i``: pixels sharing ``σ_i``); summing over pixels
gives ``E‖f' − f‖²/δ_f² = λ·H·W / 2``. Starting at ``σ_i = √β`` (ratio exactly β for a
linear layer) with that λ, the dual update only has to correct for non-linearity and for
pixels whose σ reaches ``sigma_max`` (completely ignored pixels, where ``H_i`` is unbounded).

Example:
    >>> import torch
    >>> from keepbits.audit.cid import CIDConfig, CIDExplainer
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
    >>> cid = CIDExplainer(net, layers=["0"], input_shape=(1, 8, 8), config=CIDConfig(max_steps=80))
    >>> res = cid.explain(torch.randn(2, 1, 8, 8), batch_size=2)
    >>> res[0].entropy.shape, bool(res[0].reached[0])
    ((1, 8, 8), True)
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from keepbits.audit._base import Explainer
from keepbits.audit._cid_tap import GAUSS_ENTROPY, LayerTap
from keepbits.errors import InputError
from keepbits.training.distributed import on_device

log = logging.getLogger("keepbits")


_NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm")


@dataclass(frozen=True)
class CIDConfig:
    """Settings of the σ optimisation (Eq. 3) and the λ calibration (Eq. 4).

    ``beta``: target ``E‖f'−f‖²/δ_f²`` (paper scale 1.5e-4). ``block``: σ shared by
    ``block``×``block`` pixels. ``samples``: δ draws per step. ``lr``: Adam step on log σ.
    ``dual_lr``: gain of the per-step log λ update (a fraction of ``log β − log ratio``).

    Stopping rule (per map, checked every ``check_every`` steps on the window just ended):
    the map is *on target* when the window's mean ratio is within ``tolerance/2`` of β, and
    *on a plateau* when its mean entropy per pixel moved by less than ``plateau·lr_now/lr``
    nats from the previous window (drift and noise both scale with the step). On target and
    on a plateau, the lr and the dual gain are halved, down to ``lr/2**anneal`` (annealing
    removes the jitter of log σ, which biases the mean entropy low); a plateau at that lr
    (after ``min_steps``) ends the map. A map still moving at ``max_steps`` is reported with
    ``converged`` False.

    ``xi``: finite-difference scale of δ_f² (checked against ``xi/10``, ``xi_samples``
    draws). ``sigma_max``: cap on σ (normalised scale). ``final_samples``: draws for the
    reported ratio. ``tolerance``: relative band around β for ``reached``. ``device``:
    torch device of the fit (default: the input's, CPU for numpy input).
    """

    beta: float = 1.5e-4
    block: int = 1
    max_steps: int = 1000
    min_steps: int = 100
    check_every: int = 20
    samples: int = 2
    lr: float = 0.1
    dual_lr: float = 0.3
    plateau: float = 0.01
    anneal: int = 3
    xi: float = 1e-3
    xi_samples: int = 64
    sigma_max: float = 10.0
    final_samples: int = 32
    tolerance: float = 0.1
    seed: int = 0
    device: str | None = None

    def check(self) -> None:
        """:class:`InputError` on settings that cannot work."""
        positive = {k: getattr(self, k) for k in ("beta", "lr", "dual_lr", "xi", "sigma_max", "tolerance", "plateau")}
        bad = [f"{k}={v}" for k, v in positive.items() if not (v > 0 and math.isfinite(v))]
        counts = ("block", "max_steps", "check_every", "samples", "xi_samples", "final_samples")
        bad += [f"{k}={getattr(self, k)}" for k in counts if int(getattr(self, k)) < 1]
        bad += [f"{k}={getattr(self, k)}" for k in ("min_steps", "anneal") if getattr(self, k) < 0]
        if not bad and self.sigma_max <= math.sqrt(self.beta):
            bad.append(f"sigma_max={self.sigma_max} (must exceed sqrt(beta))")
        if bad:
            raise InputError(f"invalid CID settings: {', '.join(bad)}")


@dataclass
class CIDMaps:
    """CID of one image at every requested layer (arrays indexed by layer, in ``layers`` order).

    ``entropy``: L×H×W map of ``H_i`` (nats, normalised input scale); ``cid``: its sum over
    pixels (the layer's CID); ``mean``: per-pixel mean; ``ratio``: achieved
    ``E‖f'−f‖²/δ_f²``; ``reached``: ratio within ``tolerance`` of β; ``steps``:
    forward–backward passes used; ``lam``: final λ; ``delta_f2``: δ_f²;
    ``delta_f2_change``: relative change of δ_f² from ξ to ξ/10 (stability check);
    ``saturated``: fraction of pixels at ``sigma_max``; ``converged``: the map ended on a
    plateau (see :class:`CIDConfig`) rather than at ``max_steps``; ``trace``: per layer, one
    value per ``check_every`` window (NaN after the map stopped) of the mean ``ratio`` over the
    window, the mean ``entropy`` per pixel, the ``loss`` of Eq. 3 (ratio − λ·ΣH), ``lr`` and
    ``lam`` at the window's end.
    """

    layers: list[str]
    entropy: np.ndarray
    cid: np.ndarray
    mean: np.ndarray
    ratio: np.ndarray
    reached: np.ndarray
    steps: np.ndarray
    lam: np.ndarray
    delta_f2: np.ndarray
    delta_f2_change: np.ndarray
    saturated: np.ndarray
    converged: np.ndarray
    beta: float
    trace: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, maps: bool = False) -> dict[str, Any]:
        """Plain-JSON summary (per layer); ``maps=True`` includes the entropy maps."""
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items() if k not in ("entropy", "trace")}
        out["trace"] = {k: [[None if not np.isfinite(x) else float(x) for x in row] for row in v] for k, v in self.trace.items()}
        if maps:
            out["entropy"] = self.entropy.tolist()
        return out


def default_layers(model: Any) -> list[str]:
    """Block-level layers of a model, in registration order: every module holding parameters
    reached by descending only through ``Sequential``/``ModuleList`` containers (so a
    ResNet block counts once), without normalisation layers.

    Example:
        >>> from keepbits import registry
        >>> default_layers(registry.build("lenet5"))
        ['features.0', 'features.2', 'classifier.1', 'classifier.3']
    """
    from torch import nn

    found: list[str] = []

    def walk(module: Any, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                walk(child, full + ".")
            elif any(True for _ in child.parameters()) and type(child).__name__ not in _NORM_TYPES:
                found.append(full)

    walk(model, "")
    return found


def _upsample(values: Any, block: int) -> Any:
    return values if block == 1 else values.repeat_interleave(block, 2).repeat_interleave(block, 3)


class _Group:
    """Replicas (image, layer) fitted together: inputs, base features, δ_f², and the
    distortion ``‖h(x') − f‖²`` of a batch of perturbed copies."""

    def __init__(self, tap: LayerTap, x: Any, layer_of: list[str]):
        import torch

        self.tap, self.x, self.layer_of = tap, x, layer_of
        self.rows = {name: torch.tensor([i for i, n in enumerate(layer_of) if n == name], device=x.device) for name in dict.fromkeys(layer_of)}
        with torch.no_grad():
            outs = tap(x, self.rows)
        self.base = {name: outs[name][rows].detach() for name, rows in self.rows.items()}

    def subset(self, index: Any) -> "_Group":
        """The replicas ``index`` (a long tensor), sharing base features and hooks."""
        import torch

        sub = object.__new__(_Group)
        sub.tap, sub.x = self.tap, self.x[index]
        sub.layer_of = [self.layer_of[i] for i in index.tolist()]
        sub.rows, sub.base = {}, {}
        for name in dict.fromkeys(sub.layer_of):
            rows = [i for i, n in enumerate(sub.layer_of) if n == name]
            parent_rows = self.rows[name].tolist()
            sub.rows[name] = torch.tensor(rows, device=self.x.device)
            sub.base[name] = self.base[name][[parent_rows.index(int(index[r])) for r in rows]]
        return sub

    def distortion(self, noise: Any) -> tuple[Any, dict[str, Any]]:
        """Mean over the S draws of ``‖h(x + noise) − f‖²`` per replica (``noise``: S×R×C×H×W),
        and the perturbed features per layer (S × that layer's replicas × feature shape)."""
        s, r = noise.shape[:2]
        outs = self.tap((self.x[None] + noise).reshape(s * r, *self.x.shape[1:]), self.rows)
        d = self.x.new_zeros(r)
        feats = {}
        for name, rows in self.rows.items():
            feats[name] = outs[name].reshape(s, r, *outs[name].shape[1:])[:, rows]
            d = d.index_add(0, rows, (feats[name] - self.base[name][None]).flatten(2).pow(2).sum(2).mean(0))
        return d, feats


def _delta_f2(group: _Group, cfg: CIDConfig, gen: Any) -> tuple[Any, Any]:
    """δ_f² by finite differences at ξ, and its relative change at ξ/10 (same ε)."""
    import torch

    eps = torch.randn((cfg.xi_samples, *group.x.shape), generator=gen, device=group.x.device)
    with torch.no_grad():
        coarse = group.distortion(cfg.xi * eps)[0] / cfg.xi**2
        fine = group.distortion(cfg.xi / 10 * eps)[0] / (cfg.xi / 10) ** 2
    change = (coarse - fine).abs() / fine.clamp_min(1e-30)
    return coarse, change


#: ``entropy(log_sigma, index, perturbed)`` → Σ over pixels of the entropy each replica maximises
#: (log_sigma: R×1×H/b×W/b of the replicas ``index``; perturbed: their features per layer).
EntropyTerm = Callable[[Any, Any, dict[str, Any]], Any]


def fit_sigma(tap: LayerTap, x: Any, layer_of: list[str], cfg: CIDConfig, entropy: EntropyTerm | None = None,
              on_step: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Optimise log σ for replicas (``x[r]``, layer ``layer_of[r]``) of Eq. 3 with Adam and
    per-replica dual ascent on log λ (Eq. 4), until the stopping rule of :class:`CIDConfig`
    (converged replicas leave the batch) or ``max_steps``.

    ``entropy``: the term Eq. 3 maximises; default CID's ``Σ_i H_i`` with
    ``H_i = log σ_i + ½ log 2πe`` (per channel value, ``block²`` pixels per σ). RU passes the
    entropy of the reconstruction (:mod:`keepbits.audit.cid_ru`).

    Returns numpy arrays per replica: ``log_sigma`` (R×1×H/b×W/b), ``ratio`` (final, fresh
    draws), ``steps``, ``lam``, ``delta_f2``, ``delta_f2_change``, ``converged`` and the window
    traces ``trace_ratio``, ``trace_entropy`` (nats per pixel), ``trace_loss``, ``trace_lr``,
    ``trace_lam`` (R × max_steps/check_every, NaN after a replica stopped). ``on_step(t, fitting)``
    is called before each step with the number of replicas still fitting (progress display).
    """
    import torch

    cfg.check()
    dev = x.device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    r, c, h, w = x.shape
    b = cfg.block
    if h % b or w % b:
        raise InputError(f"block {b} must divide the image size {h}×{w}")
    group = _Group(tap, x, layer_of)
    df2, df2_change = _delta_f2(group, cfg, gen)
    flat = [layer_of[i] for i in range(r) if not df2[i] > 0]
    if flat:
        raise InputError(f"layer(s) {sorted(set(flat))} do not depend on the input here (δ_f² = 0); CID is undefined")
    for i in torch.nonzero(df2_change > 0.05).flatten().tolist():
        log.warning("CID: δ_f² of layer %s changes by %.1f%% between ξ=%g and ξ/10 (non-smooth layer?)", layer_of[i], 100 * float(df2_change[i]), cfg.xi)
    if entropy is None:
        def entropy(s: Any, index: Any, perturbed: dict[str, Any]) -> Any:
            return (b * b) * (s + GAUSS_ENTROPY).flatten(1).sum(1)

    log_beta, s_max = math.log(cfg.beta), math.log(cfg.sigma_max)
    s = torch.full((r, 1, h // b, w // b), 0.5 * log_beta, device=dev)
    log_lam = torch.full((r,), math.log(2 * cfg.beta / (h * w)), device=dev)
    m, v = torch.zeros_like(s), torch.zeros_like(s)
    lr = torch.full((r,), cfg.lr, device=dev)
    lr_min = cfg.lr / 2**cfg.anneal
    steps = torch.zeros(r, dtype=torch.long, device=dev)
    ema = torch.full((r,), cfg.beta, device=dev)
    active = torch.ones(r, dtype=torch.bool, device=dev)
    converged = torch.zeros(r, dtype=torch.bool, device=dev)
    window = torch.zeros(3, r, device=dev)  # sums over the current window: ratio, entropy per pixel, loss
    previous = torch.full((r,), math.nan, device=dev)
    checks = cfg.max_steps // cfg.check_every
    trace = {k: torch.full((r, checks), math.nan, device=dev) for k in ("ratio", "entropy", "loss", "lr", "lam")}
    band = math.log1p(cfg.tolerance / 2)
    b1, b2 = 0.9, 0.999
    sub, sub_index = group, None
    for t in range(1, cfg.max_steps + 1):
        idx = torch.nonzero(active).flatten()
        if len(idx) == 0:
            break
        if on_step is not None:
            on_step(t, len(idx))
        if sub_index is None or len(idx) != len(sub_index):
            sub, sub_index = (group, idx) if len(idx) == r else (group.subset(idx), idx)
        sa = s[idx].clone().requires_grad_(True)
        noise = _upsample(sa.exp(), b)[None] * torch.randn((cfg.samples, len(idx), c, h, w), generator=gen, device=dev)
        distortion, perturbed = sub.distortion(noise)
        ratio = distortion / df2[idx]
        ent = entropy(sa, idx, perturbed)
        loss = ratio - log_lam[idx].exp() * ent
        (grad,) = torch.autograd.grad(loss.sum(), sa)
        window[:, idx] += torch.stack([ratio.detach(), ent.detach() / (h * w), loss.detach()])
        steps[idx] += 1
        k = steps[idx].view(-1, 1, 1, 1).double()
        m[idx] = b1 * m[idx] + (1 - b1) * grad
        v[idx] = b2 * v[idx] + (1 - b2) * grad**2
        step = (m[idx] / (1 - b1**k).float()) / ((v[idx] / (1 - b2**k).float()).sqrt() + 1e-8)
        s[idx] = (s[idx] - lr[idx].view(-1, 1, 1, 1) * step).clamp(max=s_max)
        ema[idx] = 0.9 * ema[idx] + 0.1 * ratio.detach()
        # dual step on log λ, with the matching shift of log σ (the λ-optimal σ moves by
        # ½ Δlog λ and the ratio by a factor e^Δ for a locally linear layer): no lag
        dual = cfg.dual_lr * (lr[idx] / cfg.lr) * (log_beta - ema[idx].log())
        log_lam[idx] += dual
        s[idx] = (s[idx] + 0.5 * dual.view(-1, 1, 1, 1)).clamp(max=s_max)
        ema[idx] *= dual.exp()
        if t % cfg.check_every == 0:
            mean = window[:, idx] / cfg.check_every
            col = t // cfg.check_every - 1
            for key, val in (("ratio", mean[0]), ("entropy", mean[1]), ("loss", mean[2]), ("lr", lr[idx]), ("lam", log_lam[idx].exp())):
                trace[key][idx, col] = val
            on_target = (mean[0].log() - log_beta).abs() < band
            plateau = (mean[1] - previous[idx]).abs() < cfg.plateau * lr[idx] / cfg.lr  # False at the first check (NaN)
            settle = on_target & plateau
            done = settle & (lr[idx] <= lr_min * (1 + 1e-6)) & (steps[idx] >= cfg.min_steps)
            lr[idx] = torch.where(settle & ~done, (lr[idx] / 2).clamp_min(lr_min), lr[idx])
            active[idx[done]] = False
            converged[idx[done]] = True
            previous[idx] = mean[1]
            window[:, idx] = 0
    with torch.no_grad():
        noise = _upsample(s.exp(), b)[None] * torch.randn((cfg.final_samples, r, c, h, w), generator=gen, device=dev)
        final = group.distortion(noise)[0] / df2
    out = {
        "log_sigma": s, "ratio": final, "steps": steps, "lam": log_lam.exp(), "delta_f2": df2, "delta_f2_change": df2_change,
        "converged": converged, **{f"trace_{k}": val for k, val in trace.items()},
    }
    return {k: val.detach().cpu().numpy() for k, val in out.items()}


class CIDExplainer(Explainer):
    """Pixel-wise CID maps (Eq. 3–4) of named layers of a torch classifier.

    ``model``: an ``nn.Module`` (pass ``input_shape``, optional ``mean``/``std``), a keepbits
    checkpoint or a :class:`~keepbits.audit.ModelAdapter` wrapping a torch module.
    ``layers``: module names (``dict(model.named_modules())``); default :func:`default_layers`.

    ``explain(inputs, target=None, batch_size=16)`` returns one :class:`CIDMaps` per image;
    ``target`` is ignored (CID depends on the layer, not on a class); ``batch_size`` is the
    number of (image, layer) maps optimised together. Maps are ordered layer-major, so a
    batch holding one layer stops the forward pass at that layer.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> res = CIDExplainer(net, input_shape=(1, 4, 4), config=CIDConfig(max_steps=60)).explain(torch.randn(1, 1, 4, 4))
        >>> res[0].layers, res[0].entropy.shape
        (['1'], (1, 4, 4))
    """

    def __init__(self, model: Any, layers: Sequence[str] | None = None, config: CIDConfig | None = None, progress: bool = False,
                 **model_kwargs: Any):
        super().__init__(model, **model_kwargs)
        self.progress = progress
        self.module = self.model.torch_module
        if self.module is None:
            raise InputError(f"{self.model.source}: CID needs a torch model (gradients through its layers), not ONNX")
        self.layers = list(layers) if layers else default_layers(self.module)
        if not self.layers:
            raise InputError("no layers to audit: pass layers=[module names]")
        self.config = config or CIDConfig()
        self.config.check()

    def explain(self, inputs: Any, target: Any = None, batch_size: int = 16) -> list[CIDMaps]:
        return super().explain(inputs, target, batch_size)

    def _explain(self, x: np.ndarray, targets: np.ndarray, batch_size: int) -> list[CIDMaps]:
        import torch
        from tqdm.auto import tqdm

        n, (_, h, w), nl = len(x), self.model.input_shape, len(self.layers)
        fitted: dict[tuple[int, int], dict[str, Any]] = {}
        with on_device(self.module, self.config.device) as device:
            xt = torch.as_tensor(x).to(device)
            tap = LayerTap(self.module, self.layers)
            replicas = [(i, l) for l in range(nl) for i in range(n)]
            bar = tqdm(total=len(replicas), desc="CID maps", unit="map", disable=not self.progress, leave=False)

            def on_step(t: int, fitting: int) -> None:
                bar.set_postfix_str(f"step {t}/{self.config.max_steps}, {fitting} fitting")

            try:
                with torch.enable_grad():
                    for start in range(0, len(replicas), batch_size):
                        chunk = replicas[start : start + batch_size]
                        bar.set_postfix_str(f"δ_f² of {len(chunk)} maps")
                        out = fit_sigma(tap, xt[[i for i, _ in chunk]], [self.layers[l] for _, l in chunk], self.config, on_step=on_step)
                        for j, key in enumerate(chunk):
                            fitted[key] = {k: val[j] for k, val in out.items()}
                        bar.update(len(chunk))
            finally:
                tap.remove()
                bar.close()
        return [self._maps([fitted[(i, l)] for l in range(nl)], h, w) for i in range(n)]

    def _maps(self, per_layer: list[dict[str, Any]], h: int, w: int) -> CIDMaps:
        cfg = self.config
        log_sigma = np.stack([p["log_sigma"][0] for p in per_layer])
        entropy = (log_sigma.repeat(cfg.block, 1).repeat(cfg.block, 2) + GAUSS_ENTROPY).astype(np.float32)
        ratio = np.array([p["ratio"] for p in per_layer], dtype=np.float64)
        stacked = {k: np.array([p[k] for p in per_layer]) for k in ("steps", "lam", "delta_f2", "delta_f2_change", "converged")}
        return CIDMaps(
            layers=list(self.layers), entropy=entropy, cid=entropy.reshape(len(per_layer), -1).sum(1).astype(np.float64),
            mean=entropy.reshape(len(per_layer), -1).mean(1).astype(np.float64), ratio=ratio,
            reached=np.abs(ratio / cfg.beta - 1) <= cfg.tolerance, steps=stacked["steps"], lam=stacked["lam"].astype(np.float64),
            delta_f2=stacked["delta_f2"].astype(np.float64), delta_f2_change=stacked["delta_f2_change"].astype(np.float64),
            saturated=(log_sigma >= math.log(cfg.sigma_max) - 1e-6).reshape(len(per_layer), -1).mean(1), converged=stacked["converged"],
            beta=cfg.beta, trace={k: np.stack([p[f"trace_{k}"] for p in per_layer]).astype(np.float64) for k in ("ratio", "entropy", "loss", "lr", "lam")},
        )


def concentration(entropy: np.ndarray, foreground: np.ndarray) -> float:
    """Eq. 5: mean ``H_i`` outside the foreground Λ minus mean ``H_i`` inside it. Positive:
    the layer discards background more than foreground (information concentrates on Λ).

    ``foreground``: H×W bool mask, or a box ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive).

    Example:
        >>> h = np.zeros((4, 4)); h[:, :2] = 1.0
        >>> concentration(h, (2, 0, 4, 4))
        1.0
    """
    ent = np.asarray(entropy, dtype=np.float64)
    if ent.ndim != 2:
        raise InputError(f"entropy map must be H×W, got shape {ent.shape}")
    mask = box_mask(foreground, ent.shape) if np.asarray(foreground).ndim == 1 else np.asarray(foreground, dtype=bool)
    if mask.shape != ent.shape:
        raise InputError(f"foreground mask shape {mask.shape} does not match the map {ent.shape}")
    if mask.all() or not mask.any():
        raise InputError("the foreground must cover some but not all pixels")
    return float(ent[~mask].mean() - ent[mask].mean())


def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """H×W bool mask of the box ``(x0, y0, x1, y1)`` (pixels, x1/y1 exclusive, clipped)."""
    if len(box) != 4:
        raise InputError(f"a box is (x0, y0, x1, y1), got {list(box)}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    h, w = shape
    x0, x1, y0, y1 = max(0, x0), min(w, x1), max(0, y0), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"box {list(box)} is empty inside a {h}×{w} image")
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask

def load_boxes(path: str | Path) -> dict[int, tuple[float, float, float, float]]:
    """Foreground boxes Λ per image index from a CSV (header ``index,x0,y0,x1,y1``) or a
    JSON file (``{"<index>": [x0, y0, x1, y1]}`` or ``[{"index": i, "box": [...]}, ...]``);
    pixels, x1/y1 exclusive.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "boxes.csv"
        >>> _ = p.write_text("index,x0,y0,x1,y1\\n3,2,2,10,12\\n")
        >>> load_boxes(p)
        {3: (2.0, 2.0, 10.0, 12.0)}
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"boxes file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
            items = raw.items() if isinstance(raw, dict) else [(d["index"], d["box"]) for d in raw]
        else:
            reader = csv.DictReader(io.StringIO(text))
            items = [(row["index"], [row[k] for k in ("x0", "y0", "x1", "y1")]) for row in reader]
        boxes = {int(i): tuple(float(v) for v in box) for i, box in items}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: expected CSV columns index,x0,y0,x1,y1 or JSON {{index: [x0, y0, x1, y1]}} ({exc})") from None
    bad = [i for i, b in boxes.items() if len(b) != 4 or b[2] <= b[0] or b[3] <= b[1]]
    if bad:
        raise InputError(f"{path}: boxes of images {bad[:10]} are not (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    return boxes


__all__ = [
    "GAUSS_ENTROPY", "CIDConfig", "CIDMaps", "CIDExplainer", "LayerTap", "default_layers", "fit_sigma",
    "concentration", "box_mask", "load_boxes", "on_device",
]
