import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from minirerank_core import testing as T  # noqa: E402

FAMILIES = ["qwen3_vl", "qwen2_vl"]
# Three page sizes → three different visual grids (and query offsets) in one batch.
PAGE_SIZES = [(200, 150), (120, 260), (160, 160)]
MAX_PIXELS = 200 * 200


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) per family, built once per test session."""
    cache = {}

    def get(family, seed=0, **kw):
        key = (family, seed, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = T.tiny_model_and_processor(family, seed=seed, max_pixels=MAX_PIXELS, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def page_images():
    return [T.random_page_image(w, h, seed=i) for i, (w, h) in enumerate(PAGE_SIZES)]
