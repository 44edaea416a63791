"""Fixtures of this package's tests (the root conftest.py sets the offline environment and the threads)."""

import pytest

from minirerank_core import testing as T

MAX_PIXELS = 200 * 200  # the tiny rerankers' pixel budget: a few dozen visual tokens per test page


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of a tiny random Qwen-VL per family (and seed), built once per test session."""
    return T.TinyModels(MAX_PIXELS)
