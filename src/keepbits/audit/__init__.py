"""Audits of image classifiers: sufficient input subsets (SIS), overinterpretation, and the
shared machinery other audits build on (model adapters, explainer base, HTML/JSON reports).

``import keepbits.audit`` never imports torch; torch is loaded when a torch model is used.

Example:
    >>> import numpy as np
    >>> from keepbits.audit import FunctionAdapter
    >>> model = FunctionAdapter(lambda x: x.reshape(len(x), -1), input_shape=(1, 1, 2))
    >>> model.probabilities(np.zeros((1, 1, 1, 2), np.float32)).tolist()
    [[0.5, 0.5]]
"""
from keepbits.audit._base import (
    Explainer,
    FunctionAdapter,
    ModelAdapter,
    OnnxAdapter,
    TorchAdapter,
    load_model,
    softmax,
)
from keepbits.report import Report, Section, colorize, overlay, to_png
from keepbits.audit.sis import (
    BackSelectResult,
    SISExplainer,
    SISResult,
    backselect,
    backselect_batch,
    find_sis,
    gradient_backselect,
    sis_collection,
)

__all__ = [
    "Explainer",
    "FunctionAdapter",
    "ModelAdapter",
    "OnnxAdapter",
    "TorchAdapter",
    "load_model",
    "softmax",
    "Report",
    "Section",
    "colorize",
    "overlay",
    "to_png",
    "BackSelectResult",
    "SISExplainer",
    "SISResult",
    "backselect",
    "backselect_batch",
    "find_sis",
    "gradient_backselect",
    "sis_collection",
]
