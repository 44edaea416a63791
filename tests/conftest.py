import pytest

from minirerank_core import testing as T
from tests.helpers import MAX_PIXELS, PAGE_SIZES


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) per family, built once per test session."""
    return T.TinyModels(MAX_PIXELS)


@pytest.fixture(scope="session")
def page_images():
    return [T.random_page_image(w, h, seed=i) for i, (w, h) in enumerate(PAGE_SIZES)]
