"""The 1,000 ImageNet (ILSVRC-2012) classes in the standard index order (sorted WordNet ids),
shipped with keepbits (``keepbits/assets/imagenet_classes.json``: index, wnid, name).

Example:
    >>> from keepbits.data import imagenet_class_names, imagenet_wnids
    >>> len(imagenet_class_names()), imagenet_class_names()[1], imagenet_wnids()[1]
    (1000, 'goldfish', 'n01443537')
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _classes() -> tuple[tuple[str, str], ...]:
    path = Path(__file__).resolve().parent.parent / "assets" / "imagenet_classes.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    if [e["index"] for e in entries] != list(range(1000)):
        raise RuntimeError(f"{path}: expected the 1,000 ImageNet classes in index order")
    return tuple((e["wnid"], e["name"]) for e in entries)


def imagenet_class_names() -> list[str]:
    """The 1,000 class names; position = the class index a 1,000-way ImageNet classifier outputs."""
    return [name for _, name in _classes()]


def imagenet_wnids() -> list[str]:
    """The 1,000 WordNet ids (``n01440764``, ...), the folder names of ImageNet-style image trees."""
    return [wnid for wnid, _ in _classes()]
