"""Kernel tests run the Triton kernels with Triton's interpreter on CPU tensors.

megalite.kernels reads TRITON_INTERPRET at call time and chooses interpreted vs compiled
execution per launch (kernels/_backend.py), so it does not matter whether another test
folder imported megalite.kernels (or triton) first. The variable is set per test with
monkeypatch rather than for the whole session: other folders' tests, and the processes
they spawn, keep the plain "reference on CPU" dispatch and its speed. GPU-marked tests run
compiled kernels on CUDA tensors and leave the variable alone.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
