import os
import sys

import pytest
import torch

# The spawned ranks import test modules and the helper by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "across_ranks: the test spawns ranks of its own")
    config.addinivalue_line(
        "markers",
        "cuda: the test needs a CUDA GPU (skipped without one; benchmarks/gpu_check.py runs "
        "every test so marked)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
