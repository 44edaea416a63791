"""Settings for every test in the repository (tests/ and each integration package's tests/): no network, a fixed
number of threads."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
