"""Activation recomputation: run a region keeping only its inputs, recompute it in backward.

``checkpoint(fn, *args)`` returns ``fn(*args)``. The autograd graph of the region is built
as usual, but every tensor the region's ops save for backward is replaced by an empty
placeholder (a saved-tensor hook), except the parameters and the region's inputs, which
live anyway. The first time backward unpacks one of the placeholders, the whole region is
run again from its inputs, with grad, under the RNG and autocast state of the first run,
and each placeholder is filled with the tensor its op saved the second time (ops save in
the same order each time). So the memory the region holds between forward and backward is
its inputs; its other saved tensors exist only from its recompute until its backward.

Why saved-tensor hooks rather than Megatron's reentrant ``CheckpointFunction`` (forward
under no_grad, backward = a nested ``torch.autograd.backward`` on a recomputed graph):
the split backward of the pipeline (``megalite.pipeline.backward``: I computes the input
gradients, W re-enters the graph later for the weight gradients) walks the stage's graph to
find where weight gradients branch off. A reentrant checkpoint hides that graph behind one
opaque node whose backward computes every gradient at once, so W would get nothing to do.
Here the graph is the ordinary one, so I and W split it as they would without recompute:
I triggers the recompute, and the recomputed tensors stay with the graph's nodes (the
graph is retained for W), so W reuses them instead of recomputing again. A full backward
(B) frees each recomputed tensor as soon as its op's backward has run, as without
recompute.

RNG: the default CPU generator, the CUDA generator of the inputs' device, and every stream
of the tensor-parallel RNG tracker (``megalite.parallel.random``: sequence-parallel dropout
draws from it) are captured when the region starts, set for the recompute, and put back
afterwards, so dropout draws the same numbers twice and the streams advance once.

Regions must not nest (the inner one's hooks would hide the outer one's saves): GPT uses
either full recompute of a layer or selective recompute of parts of it, never both.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from megalite.parallel.random import get_rng_tracker

_OBSERVERS: list = []  # measurement hooks (activation_memory.count_saved): see what regions keep
_RECOMPUTING = [False]


def is_recomputing() -> bool:
    """Whether a region is being recomputed now (backward re-running its forward): code that
    records statistics in forward (MoE expert load) skips the second run."""
    return _RECOMPUTING[0]


class _Placeholder:
    """Stands in for one saved tensor until the recompute fills it."""
    __slots__ = ("index", "tensor", "__weakref__")

    def __init__(self, index: int):
        self.index, self.tensor = index, None


def _rng_state(device: torch.device | None) -> dict:
    tracker = get_rng_tracker()
    state = {"cpu": torch.get_rng_state(), "tracker": (tracker, dict(tracker.states))}
    if device is not None and device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    tracker, streams = state["tracker"]
    tracker.states = dict(streams)
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][1], state["cuda"][0])


class _Region:
    """One run of a checkpointed region: its inputs, RNG/autocast state and placeholders."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.device = tensors[0].device if tensors else None
        self.rng = _rng_state(self.device)
        kind = self.device.type if self.device is not None else "cpu"
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.input_storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.placeholders: dict[int, weakref.ref] = {}
        self.count = 0
        self.recomputed = False

    def _keeps(self, t: torch.Tensor) -> bool:
        # Parameters, and views of the inputs, cost nothing extra to keep.
        return (t.grad_fn is None and t.requires_grad) or \
            t.untyped_storage().data_ptr() in self.input_storages

    def pack(self, t: torch.Tensor):
        index, self.count = self.count, self.count + 1
        if self._keeps(t):
            return t
        holder = _Placeholder(index)
        self.placeholders[index] = weakref.ref(holder)
        return holder

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.tensor is None:
            if self.recomputed:
                raise RuntimeError("a recomputed activation was already released: backward "
                                   "through a recomputed region twice needs retain_graph=True "
                                   "the first time")
            self.recompute()
        return packed.tensor

    def recompute(self) -> None:
        seen = [0]

        def fill(t):
            index, seen[0] = seen[0], seen[0] + 1
            ref = self.placeholders.get(index)
            holder = ref() if ref is not None else None
            if holder is not None:  # None: its op's backward already ran and let it go
                holder.tensor = t.detach()
            return None  # the recompute's own graph is thrown away

        inputs = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                  else a for a in self.args]
        now = _rng_state(self.device)
        kind, enabled, dtype = self.autocast
        try:
            _set_rng_state(self.rng)
            _RECOMPUTING[0] = True
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled), \
                    torch.autograd.graph.saved_tensors_hooks(fill, lambda _: None):
                self.fn(*inputs)
        finally:
            _RECOMPUTING[0] = False
            _set_rng_state(now)
        if seen[0] != self.count:
            raise RuntimeError(f"the recomputed region saved {seen[0]} tensors, the first run "
                               f"{self.count}: its forward must not depend on state that "
                               f"changed between forward and backward")
        self.recomputed = True
        self.args = None  # the inputs are needed no more


def checkpoint(fn, *args):
    """``fn(*args)`` keeping only ``args`` (and parameters) for backward; the region is
    recomputed when backward first needs one of its saved tensors. ``fn`` must be a
    deterministic function of ``args``, parameters and the RNG state. Outside grad mode it
    is a plain call."""
    if not torch.is_grad_enabled():
        return fn(*args)
    region = _Region(fn, args)
    for observe in _OBSERVERS:
        observe([a for a in args if isinstance(a, torch.Tensor)])
    with torch.autograd.graph.saved_tensors_hooks(region.pack, region.unpack):
        return fn(*args)


@contextlib.contextmanager
def observe_kept_inputs(callback):
    """While active, ``callback(tensors)`` sees the inputs every region keeps (used to count
    saved activations: saved-tensor hooks outside a region do not see inside it)."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)
