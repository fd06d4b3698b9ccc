"""Forward hooks that read named layers of a torch model (shared by CID and RU)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from keepbits.errors import InputError

#: ½ log(2πe): entropy of N(0, 1) in nats; ``H_i = log σ_i + GAUSS_ENTROPY``.
GAUSS_ENTROPY = 0.5 * math.log(2 * math.pi * math.e)


class _StopForward(Exception):
    """Raised by a hook once the deepest needed layer has run (truncates the forward)."""


class LayerTap:
    """Forward hooks collecting the outputs of named layers; the forward stops after the
    deepest layer asked for. A hooked layer hands a copy of its output to the rest of the
    network, so later in-place ops (``ReLU(inplace=True)``) cannot change what was captured.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2))
        >>> from keepbits.audit.cid import LayerTap
        >>> tap = LayerTap(net, ["0", "1"])
        >>> out = tap(torch.randn(5, 3))
        >>> bool((out["0"].clamp(min=0) == out["1"]).all()), tap.order
        (True, ['0', '1'])
    """

    def __init__(self, model: Any, layers: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules or name == ""]
        if missing:
            names = [n for n in modules if n]
            raise InputError(f"unknown layer(s) {missing}; the model's layers are: {', '.join(names[:60])}{' ...' if len(names) > 60 else ''}")
        if len(set(layers)) != len(layers):
            raise InputError(f"layers listed twice: {sorted(n for n in set(layers) if list(layers).count(n) > 1)}")
        self.model = model
        self.layers = list(layers)
        self.order: list[str] = []
        self._outputs: dict[str, Any] = {}
        self._stop: str | None = None
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        import torch

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise InputError(f"layer {name!r} returns {type(output).__name__}, not a tensor; pick a module that outputs a tensor")
            if name in self._outputs:
                raise InputError(f"layer {name!r} runs more than once per forward pass; pick a module used once")
            self._outputs[name] = output
            if name == self._stop:
                raise _StopForward
            return output.clone()

        return hook

    def __call__(self, x: Any, needed: Iterable[str] | None = None) -> dict[str, Any]:
        """Outputs of the layers (all, or those ``needed``) for the batch ``x``."""
        needed = list(self.layers if needed is None else needed)
        if not self.order:  # first call: learn the execution order, run the whole network
            self._stop = None
        else:
            self._stop = max(needed, key=self.order.index)
        self._outputs = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        if not self.order:
            self.order = list(self._outputs)
        absent = [n for n in needed if n not in self._outputs]
        if absent:
            raise InputError(f"layer(s) {absent} did not run in the model's forward pass")
        outputs, self._outputs = self._outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
