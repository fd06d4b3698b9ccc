"""Every example in a public docstring runs and prints what it shows (supervision-style docs)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import keepbits
import keepbits.export
import keepbits.training


def _modules() -> list[str]:
    names = {m.name for pkg in (keepbits, keepbits.training, keepbits.export) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
    return sorted(n for n in names | {"keepbits", "keepbits.training", "keepbits.export"} if not n.endswith("__main__"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"

