"""Plain-JSON values for records (provenance, reports, summaries).

Example:
    >>> import numpy as np
    >>> from keepbits._json import jsonable
    >>> jsonable({"a": np.float32(0.5), "b": (1, float("nan")), "c": np.arange(2)})
    {'a': 0.5, 'b': [1, None], 'c': [0, 1]}
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: mappings and sequences recursively, arrays and tensors (anything
    with ``tolist``) as lists, non-finite floats as None, paths and unknown objects as str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
