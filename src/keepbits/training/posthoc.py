"""SimpleBits post-hoc simplification of one image for an already trained classifier
(Schirrmeister et al., S6, Alg. 1 and 2).

Alg. 1 (loss). Classifier parameters θ are scaled element-wise by s ~ U(0.8, 0.95)
("simulated forgetting"). With p = softmax(f_θ(x_orig)) as reference and
KL(x) = KL(p ‖ softmax(f_{s⊙θ}(x))), the simplified image x_sim should give the same
restoring gradients as the original:

    L_grad = Σ_layers (1 − cos(∇_s KL(x_sim)[m], ∇_s KL(x_orig)[m])),  m = ∇_s KL(x_orig) < 0
    L_pred = KL(p ‖ f_θ(x_sim)) + KL(f_{s⊙θ}(x_orig) ‖ f_{s⊙θ}(x_sim))
    L      = L_grad + L_pred + λ_sim·bpd(x_sim)

Alg. 2 (optimisation in the Glow latent). x_sim = G(z + δ), z = G⁻¹(x_orig), δ = 0 at the
start (our choice: x_sim starts as x_orig), Adam on δ. Every step draws α ~ U(0, 1] and
evaluates the classifier terms (L_grad, L_pred) on the interpolated image
x_α = G(z + α·δ), while ``bpd`` is taken of x_sim itself: the prediction and the restoring
gradients must hold along the whole latent path from the original to the simplified image.
The result is x_sim = G(z + δ), rounded to 8 bits; the path t ∈ [0, 1] is evaluated once at the
end as a diagnostic (bpd, KL, arg-max), and ``kept`` says whether x_sim keeps the arg-max with
KL(p ‖ f_θ(x_sim)) ≤ ``kl_tolerance``.

The classifier takes [0, 1] images (wrap normalised classifiers with
:class:`keepbits.training.simplebits.Normalized`); the density model must have the images'
size (Alg. 2 works in its latent: another size would resize every image before it is
simplified) and may have another channel count (gray↔RGB).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from keepbits import registry
    >>> from keepbits.training.posthoc import PosthocConfig, simplify_posthoc
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    >>> flow = registry.build("glow", in_channels=3, image_size=(8, 8), levels=2, depth=1, hidden=8).requires_grad_(False)
    >>> out = simplify_posthoc(clf, flow, torch.rand(1, 3, 8, 8), PosthocConfig(steps=3))
    >>> out[0]["simplified"].shape, all(0 < h["alpha"] <= 1 for h in out[0]["history"])
    (torch.Size([1, 3, 8, 8]), True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from keepbits.errors import InputError
from keepbits.training.condensation import layerwise_cosine_distance
from keepbits.training.distributed import on_device


@dataclass
class PosthocConfig:
    """Settings of Alg. 1/2 (CPU-sized defaults)."""

    steps: int = 100
    lr: float = 0.05
    lambda_sim: float = 1.0
    scale_low: float = 0.8
    scale_high: float = 0.95
    path_points: int = 11
    kl_tolerance: float = 0.1  # only for the ``kept`` flag of the result
    seed: int = 0

    def __post_init__(self) -> None:
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        if not (finite(self.lr) and self.lr > 0 and finite(self.lambda_sim) and self.lambda_sim >= 0
                and finite(self.kl_tolerance) and self.kl_tolerance >= 0):
            raise InputError(f"lr must be finite and > 0, lambda_sim and kl_tolerance finite and >= 0; got {self.lr}, "
                             f"{self.lambda_sim}, {self.kl_tolerance}")
        if not (finite(self.scale_low) and finite(self.scale_high) and 0 < self.scale_low <= self.scale_high):
            raise InputError(f"forgetting scales need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.steps < 0 or self.path_points < 1:
            raise InputError(f"steps must be >= 0 and path_points >= 1, got {self.steps}, {self.path_points}")


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) per row."""
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def forgetting_gradients(net: torch.nn.Module, scales: dict[str, torch.Tensor], ref_logits: torch.Tensor, x: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
    """∇_s KL(softmax(ref) ‖ softmax(f_{s⊙θ}(x))) for every parameter tensor (Alg. 1)."""
    params = {n: p.detach() * scales[n] for n, p in net.named_parameters()}
    kl = kl_div(ref_logits, functional_call(net, params, (x,))).sum()
    return list(torch.autograd.grad(kl, list(scales.values()), create_graph=create_graph))


def _to_classifier_space(y: torch.Tensor, flow: torch.nn.Module, shape: torch.Size) -> torch.Tensor:
    """Flow-range image → [0, 1] image of the classifier's channels and size (no noise)."""
    x = (((y + 0.5) * 256.0 - 0.5) / 255.0).clamp(0.0, 1.0)
    if shape[1] == 1 and x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if tuple(x.shape[-2:]) != tuple(shape[-2:]):
        x = F.interpolate(x, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
    return x


def interpolate(flow: torch.nn.Module, zs: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float, shape: torch.Size) -> torch.Tensor:
    """x_α = G(z + α·δ) in the classifier's space (Alg. 2): α = 0 is the original, 1 the simplified image."""
    return _to_classifier_space(flow.decode([z + alpha * d for z, d in zip(zs, deltas)]), flow, shape)


def posthoc_loss(
    net: torch.nn.Module, flow: torch.nn.Module, x_orig: torch.Tensor, x_sim: torch.Tensor, scales: dict[str, torch.Tensor], lambda_sim: float,
    x_interp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Alg. 1 loss of one image (batch of 1): L_grad + L_pred on ``x_interp`` (Alg. 2's x_α;
    default ``x_sim``) plus λ_sim·bpd(x_sim)."""
    x_cls = x_sim if x_interp is None else x_interp
    with torch.no_grad():
        ref = net(x_orig)
        forgot = functional_call(net, {n: p * scales[n] for n, p in net.named_parameters()}, (x_orig,))
    g_orig = [g.detach() for g in forgetting_gradients(net, scales, ref, x_orig, create_graph=False)]
    g_sim = forgetting_gradients(net, scales, ref, x_cls, create_graph=True)
    masks = [g < 0 for g in g_orig]
    keep = [i for i, m in enumerate(masks) if m.any()]
    l_grad = (layerwise_cosine_distance([g_sim[i][masks[i]] for i in keep], [g_orig[i][masks[i]] for i in keep], per_output_channel=False)
              if keep else x_sim.new_zeros(()))
    forgot_sim = functional_call(net, {n: p.detach() * scales[n] for n, p in net.named_parameters()}, (x_cls,))
    l_pred = kl_div(ref, net(x_cls)).sum() + kl_div(forgot, forgot_sim).sum()
    bits = flow.bpd(x_sim, dequantize=False).sum()
    loss = l_grad + l_pred + lambda_sim * bits
    return loss, {"l_grad": l_grad.item(), "l_pred": l_pred.item(), "bpd": bits.item()}


def simplify_posthoc(classifier: torch.nn.Module, flow: torch.nn.Module, images: torch.Tensor, cfg: PosthocConfig | None = None,
                     device: str | torch.device | None = None, progress: bool = False) -> list[dict]:
    """Simplify each [0, 1] image of ``images`` (N×C×H×W) for ``classifier`` (Alg. 1 + 2), on
    ``device`` (default: where the classifier's parameters are; both modules are moved there for
    the run and back after it; the random draws come from one CPU generator, so a GPU run draws
    the same numbers).

    Returns per image: ``simplified`` (1×C×H×W, 8-bit levels, on the CPU), ``bpd_orig``, ``bpd_sim``,
    ``kl`` (KL(p ‖ f_θ(x_sim))), ``kept`` (same arg-max and ``kl`` ≤ ``kl_tolerance``), ``path``
    (t, bpd, KL, same arg-max along G(z + t·δ)), ``history`` of the loss terms and the α drawn,
    ``label`` and ``label_sim`` (arg-max of the classifier). ``progress``: a progress bar of the
    optimisation steps on stderr (each step differentiates the classifier twice: minutes per image
    on a 224² model)."""
    side = tuple(int(v) for v in getattr(flow, "image_size", images.shape[-2:]))
    if side != tuple(images.shape[-2:]):
        h, w = images.shape[-2:]
        raise InputError(f"the density model scores {side[0]}×{side[1]} images and these are {h}×{w}: Alg. 2 optimises in its "
                         f"latent, so the simplified image would begin as the original resized to {side[0]}×{side[1]} and back; "
                         f"use a density model of the classifier's input size (keepbits train density --image-size {h} on such images)")
    with on_device(classifier, device) as where, on_device(flow, where):
        return _simplify_posthoc(classifier, flow, images, cfg or PosthocConfig(), where, progress)


def _simplify_posthoc(net: torch.nn.Module, flow: torch.nn.Module, images: torch.Tensor, cfg: PosthocConfig, where: torch.device,
                      progress: bool = False) -> list[dict]:
    from tqdm.auto import tqdm

    from keepbits.training.simplebits import quantize_8bit

    gen = torch.Generator().manual_seed(cfg.seed)
    for p in net.parameters():
        p.requires_grad_(False)
    flow.requires_grad_(False)
    results = []
    bar = tqdm(total=len(images) * cfg.steps, desc="simplify", unit="step", disable=not progress, leave=False)
    for i in range(len(images)):
        bar.set_postfix_str(f"image {i + 1}/{len(images)}")
        x = images[i : i + 1].float().to(where)
        with torch.no_grad():
            zs, _ = flow.encode(flow.to_flow_range(x, dequantize=False))
            ref = net(x)
        deltas = [torch.zeros_like(z, requires_grad=True) for z in zs]
        opt = torch.optim.Adam(deltas, lr=cfg.lr)
        history = []
        for _ in range(cfg.steps):
            scales = {n: (cfg.scale_low + (cfg.scale_high - cfg.scale_low) * torch.rand(p.shape, generator=gen)).to(where).requires_grad_(True)
                      for n, p in net.named_parameters()}
            alpha = 1.0 - float(torch.rand((), generator=gen))  # α ~ U(0, 1]
            x_sim = interpolate(flow, zs, deltas, 1.0, x.shape)
            x_alpha = x_sim if alpha == 1.0 else interpolate(flow, zs, deltas, alpha, x.shape)
            loss, stats = posthoc_loss(net, flow, x, x_sim, scales, cfg.lambda_sim, x_interp=x_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(stats | {"alpha": alpha})
            bar.update()
        with torch.no_grad():
            x_sim = quantize_8bit(interpolate(flow, zs, deltas, 1.0, x.shape))
            logits = net(x_sim)
            kl = float(kl_div(ref, logits))
            label, label_sim = int(ref.argmax(1)), int(logits.argmax(1))
            results.append({
                "simplified": x_sim.cpu(), "bpd_orig": float(flow.bpd(x, dequantize=False)), "bpd_sim": float(flow.bpd(x_sim, dequantize=False)),
                "kl": kl, "kept": label_sim == label and kl <= cfg.kl_tolerance, "label": label, "label_sim": label_sim,
                "path": _path(net, flow, x, zs, [d.detach() for d in deltas], ref, cfg), "history": history,
            })
    bar.close()
    return results


@torch.no_grad()
def _path(net, flow, x, zs, deltas, ref, cfg: PosthocConfig) -> list[dict]:
    """bpd, KL and arg-max along G(z + t·δ), t ∈ [0, 1] (a diagnostic of the result)."""
    label, path = int(ref.argmax(1)), []
    for t in torch.linspace(0.0, 1.0, max(cfg.path_points, 2)).tolist():
        x_t = x if t == 0.0 else interpolate(flow, zs, deltas, t, x.shape)
        logits = net(x_t)
        path.append({"t": t, "bpd": float(flow.bpd(x_t, dequantize=False)), "kl": float(kl_div(ref, logits)), "same_label": int(logits.argmax(1)) == label})
    return path
