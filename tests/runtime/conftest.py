"""Fixtures of the runtime tests."""
from __future__ import annotations

import pytest

from keepbits.runtime import Pipeline
from keepbits.runtime.synthetic import toy_bundle


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A Pipeline on the toy bundle (32×32 input, b = 4), one per test module."""
    return Pipeline.from_bundle(toy_bundle(tmp_path_factory.mktemp("b") / "toy", size=32, block=4))
