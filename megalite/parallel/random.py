"""RNG streams for dropout under tensor parallelism.

Outside TP regions (residual stream, replicated activations) every TP rank must draw the
same dropout mask, so they share the default generator, seeded identically. Inside a TP
region (attention probabilities of this rank's heads, a column-parallel activation) each
rank holds a different shard and must draw an independent mask: that code runs under
``tracker.fork()``, which swaps in a per-TP-rank generator state and restores the default
one afterwards, so the default stream advances identically on all ranks.
"""
from __future__ import annotations

import contextlib

import torch

TP_STREAM_OFFSET = 2718  # keeps the TP stream's seeds away from the default seed


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named RNG states for one device; ``fork(name)`` runs a block on that stream."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() first")
        saved = _get_state(self.device)
        torch.manual_seed(seed) if self.device.type == "cpu" else \
            torch.cuda.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(saved, self.device)

    def reset(self) -> None:
        self.states.clear()

    @contextlib.contextmanager
    def fork(self, name: str = "tensor-parallel"):
        if name not in self.states:
            raise ValueError(f"RNG stream {name!r} is not set; call "
                             f"megalite.parallel.model_parallel_seed(seed) first")
        saved = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(saved, self.device)


_TRACKER = RNGTracker()


def get_rng_tracker() -> RNGTracker:
    return _TRACKER


def model_parallel_seed(seed: int, state=None) -> RNGTracker:
    """Seed the default stream with ``seed`` (same on every rank) and the TP stream with a
    seed that differs per TP rank (and per pipeline stage, whose layers differ)."""
    from megalite.parallel.state import get_state
    ps = state or get_state()
    global _TRACKER
    torch.manual_seed(seed)
    _TRACKER = RNGTracker(ps.device)
    _TRACKER.add("tensor-parallel", seed + TP_STREAM_OFFSET + 100 * ps.pp_rank + ps.tp_rank)
    return _TRACKER
