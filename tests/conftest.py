import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Models built in the test process compare against CPU references, also on a GPU machine;
# GPU-marked tests put their tensors on CUDA explicitly.
os.environ.setdefault("MEGALITE_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
