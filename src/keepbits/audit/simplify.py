"""SimpleBits post-hoc simplification audit (Schirrmeister et al., S6, Alg. 1 and 2): for
each image, the simplest image (lowest bpd under a Glow) that the classifier treats like the
original, with before/after figures in the shared HTML/JSON report.

torch is imported inside the functions; the model must be a torch model (a ``.pt``
checkpoint or an ``nn.Module``), because Alg. 1 needs parameter gradients.

Example:
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from keepbits import registry
    >>> from keepbits.audit.simplify import SimplifyExplainer
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    >>> flow = registry.build("glow", in_channels=3, image_size=(8, 8), levels=2, depth=1, hidden=8)
    >>> audit = SimplifyExplainer(clf, input_shape=(3, 8, 8), density=flow, steps=2)
    >>> res = audit.explain(np.random.default_rng(0).integers(0, 255, (1, 8, 8, 3), dtype=np.uint8))
    >>> res[0]["simplified"].shape, res[0]["bpd_sim"] <= res[0]["bpd_orig"] + 1e-6
    ((8, 8, 3), True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from keepbits.audit._base import Explainer
from keepbits.report import Report
from keepbits.errors import InputError


class SimplifyExplainer(Explainer):
    """Post-hoc simplification of each input for the audited classifier.

    ``density``: a density checkpoint path, a Glow module, or None for the shipped CIFAR-10
    Glow; ``device``: ``auto``/``cpu``/``cuda``, where Alg. 1 runs; the remaining keywords are
    :class:`keepbits.training.posthoc.PosthocConfig` fields.
    ``target`` is ignored: the prediction on the original is what must be preserved. ``progress``:
    a progress bar of the optimisation steps on stderr.
    Results per image: ``original`` and ``simplified`` (uint8 H×W×C), ``bpd_orig``,
    ``bpd_sim``, ``kl``, ``kept``, ``label``, ``label_sim``, ``path``, ``history``.
    """

    def __init__(self, model: Any, density: Any = None, steps: int = 100, lambda_sim: float = 1.0, lr: float = 0.05,
                 kl_tolerance: float = 0.1, seed: int = 0, device: str = "cpu", progress: bool = False, **model_kwargs: Any):
        super().__init__(model, **model_kwargs)
        self.progress = progress
        if self.model.torch_module is None:
            raise InputError(f"{self.model.source}: the simplification audit needs a torch model (.pt checkpoint), not ONNX")
        from keepbits.training.distributed import resolve_device

        self.density = density
        self.device = resolve_device(device)
        self.settings = {"steps": steps, "lambda_sim": lambda_sim, "lr": lr, "kl_tolerance": kl_tolerance, "seed": seed}
        from keepbits.training.posthoc import PosthocConfig

        self.config = PosthocConfig(**self.settings)  # settings out of range are refused here, before any image

    def _explain(self, x: np.ndarray, targets: np.ndarray, batch_size: int) -> list[dict]:
        import torch

        from keepbits.training.density import load_density
        from keepbits.training.posthoc import simplify_posthoc
        from keepbits.training.simplebits import Normalized

        flow = self.density if hasattr(self.density, "bpd") else load_density(self.density)
        net = Normalized(self.model.torch_module, self.model.mean.tolist(), self.model.std.tolist())
        unit = torch.from_numpy((x * self.model.std[:, None, None] + self.model.mean[:, None, None]).astype(np.float32)).clamp(0, 1)
        out = simplify_posthoc(net, flow, unit, self.config, device=self.device, progress=self.progress)
        to_uint8 = lambda t: np.clip(np.rint(t[0].detach().permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)  # noqa: E731
        return [{**{k: v for k, v in r.items() if k != "simplified"}, "original": to_uint8(unit[i : i + 1]), "simplified": to_uint8(r["simplified"])}
                for i, r in enumerate(out)]


def simplify_report(results: Sequence[dict], class_names: Sequence[str] | None = None, meta: dict | None = None,
                    image_names: Sequence[str] | None = None, data_labels: Sequence[str] | None = None) -> Report:
    """The shared audit report: before/after grid, a table of bpd and the classifier's predictions
    (on the original and on the simplified image; the data's label beside them when known, each
    image by ``image_names``: its index in the data set or its file), bpd along the interpolation
    path of Alg. 2 per image."""
    name = (lambda k: class_names[k] if class_names else str(k))  # noqa: E731
    image = (lambda i: image_names[i] if image_names is not None else i)  # noqa: E731
    report = Report("SimpleBits post-hoc simplification audit", meta=meta)
    s = report.section("Before / after", "Each original (left) and its simplified version (right): G(z + δ), with δ optimised so "
                       "that every point G(z + α·δ), α ~ U(0, 1], keeps the classifier's prediction and restoring gradients "
                       "while the simplified image costs few bits (Alg. 1 and 2).")
    images, titles = [], []
    for i, r in enumerate(results):
        images += [r["original"], r["simplified"]]
        titles += [f"#{i} {name(r['label'])} · {r['bpd_orig']:.2f} bpd", f"#{i} {name(r['label_sim'])} · {r['bpd_sim']:.2f} bpd"]
    s.image_grid(images, titles=titles, cols=2)
    s.table([{"image": image(i), **({"data label": data_labels[i]} if data_labels is not None else {}),
              "predicted": name(r["label"]), "predicted on simplified": name(r["label_sim"]), "bpd_orig": r["bpd_orig"],
              "bpd_sim": r["bpd_sim"], "bits_saved": r["bpd_orig"] - r["bpd_sim"], "KL": r["kl"], "kept": r["kept"]}
             for i, r in enumerate(results)],
            caption="predicted: the classifier's arg-max (the label the simplification keeps); bpd under the density "
                    "model; kept: same arg-max and KL within the tolerance")
    p = report.section("Interpolation path", "bpd of G(z + t·δ) for t from 0 (original) to 1 (the simplified image); "
                       "report.json has KL and arg-max along the path.")
    p.line_plot({f"#{i}": ([q["t"] for q in r["path"]], [q["bpd"] for q in r["path"]]) for i, r in enumerate(results)}, xlabel="t", ylabel="bpd")
    report.data["per_image"] = [{**({"image": image(i)} if image_names is not None else {}),
                                 **({"data_label": data_labels[i]} if data_labels is not None else {}),
                                 **{k: v for k, v in r.items() if k not in ("original", "simplified")}} for i, r in enumerate(results)]
    return report


def audit_simplify(model: Any, images: np.ndarray, out_dir: str | Path, density: Any = None, meta: dict | None = None,
                   image_names: Sequence[str] | None = None, data_labels: Sequence[str] | None = None, **settings: Any) -> list[Path]:
    """Run :class:`SimplifyExplainer` on uint8 N×H×W×C ``images`` and write report.html/json
    (``meta``: extra provenance for the report, e.g. the data and the command line;
    ``image_names`` / ``data_labels``: which images these are and their labels, shown beside the
    predictions)."""
    explainer = SimplifyExplainer(model, density=density, **settings)
    results = explainer.explain(images)
    meta = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
            "density": str(density or "shipped density_cifar10.pt"), **explainer.settings, **(meta or {})}
    return simplify_report(results, explainer.model.class_names, meta, image_names, data_labels).write(out_dir)
