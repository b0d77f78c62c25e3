"""The distributed optimizer (ZeRO stage 1): optimizer state sharded over data parallelism.

Each dp rank owns one contiguous 1/dp chunk of every bucket of a sharded
:class:`~megalite.parallel.grad_buffer.GradBuffer`. Gradients are reduce-scattered (averaged)
into the owned chunks; an inner torch optimizer of the wrapped optimizer's class and
hyperparameters (param groups, weight decay included) steps only on views of the owned
part of each parameter; the updated parameters are then all-gathered over dp. Any
elementwise torch optimizer works (AdamW, SGD with momentum, ...).

Parameters are fp32 (16-bit runs use autocast), so the parameter is its own master copy.
Bytes per parameter on each rank: 4 (weight) + 4 (gradient) + 8/dp (AdamW's two moments),
against 16 without sharding.

Each shard view carries its parameter's TP/pipeline attributes, so the global gradient norm
is computed over the shard views with the usual rules plus a sum over dp (each element
counted once). Checkpoints use :meth:`gathered_state` / :meth:`load_full_state`, which move
between the owned shards and the whole per-parameter tensors the checkpoint format stores.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from megalite.parallel.grad_buffer import GradBuffer


class DistributedOptimizer(torch.optim.Optimizer):
    """``DistributedOptimizer(optimizer, grad_buffer)``: shard ``optimizer`` (built over the
    model's parameters, not stepped yet) over the dp group of ``grad_buffer`` (built with
    ``shard=True`` over the same parameters). ``param_groups``, ``state``, ``state_dict``
    and lr schedulers work as for the inner optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_buffer: GradBuffer):
        if not grad_buffer.shard:
            raise ValueError("the distributed optimizer needs a GradBuffer built with shard=True")
        if any(optimizer.state.values()):
            raise ValueError("wrap the optimizer before its first step: its state would be lost")
        self.grad_buffer, self.ps = grad_buffer, grad_buffer.ps
        self._shards: dict[int, tuple] = {}  # id(param) -> (param, shard view, lo, hi)
        groups = []
        for group in optimizer.param_groups:
            views = []
            for p in group["params"]:
                if p not in grad_buffer:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} in the optimizer "
                                     f"is not in the gradient buffer: build both from the same "
                                     f"model")
                lo, hi = grad_buffer.owned_range(p)
                view = torch.nn.Parameter(p.detach().view(-1)[lo:hi])  # aliases p's storage
                view.grad = grad_buffer.grad_view(p).view(-1)[lo:hi]
                # TP layout and pipeline-duplicate flags: grad-norm rules follow the shard
                view.__dict__.update({k: v for k, v in p.__dict__.items()
                                      if not k.startswith("_")})
                self._shards[id(p)] = (p, view, lo, hi)
                views.append(view)
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": views})
        cls = type(optimizer)
        accepted = inspect.signature(cls).parameters
        self.optimizer = cls(groups, **{k: v for k, v in optimizer.defaults.items()
                                        if k in accepted})
        if self.ps.dp == 1 and self.ps.rank == 0:
            warnings.warn("distributed optimizer at dp=1 shards nothing: each rank keeps the "
                          "whole optimizer state of its parameters", stacklevel=2)

    # The inner optimizer holds groups, state and defaults (so lr schedulers drive it).
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state,
                     lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, v: setattr(self.optimizer, "defaults", v))

    def shard_parameters(self, params=None) -> list[torch.nn.Parameter]:
        """This rank's views (with their owned gradients) of ``params`` (default: all), in
        that order: what clipping and fp16 unscaling act on. In the model's parameter order
        the global norm sums as without sharding."""
        params = self.grad_buffer.params if params is None else params
        return [self._shards[id(p)][1] for p in params if id(p) in self._shards]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_buffer.zero_grad()  # the gradients are views: always zeroed, never None

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.grad_buffer.all_gather_params()
        return loss

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def full_grad(self, p) -> torch.Tensor:
        """``p``'s averaged gradient, whole (collective over dp)."""
        _, view, _, _ = self._shards[id(p)]
        return self.grad_buffer.gather_dp(p, view.grad)

    def gathered_state(self, p) -> dict:
        """``p``'s optimizer state with every tensor whole, shaped like ``p`` (collective
        over dp; every rank returns it); scalars such as AdamW's ``step`` as they are."""
        return dict(self.iter_gathered_state(p))

    def iter_gathered_state(self, p):
        """:meth:`gathered_state` one ``(key, value)`` at a time, each tensor gathered when
        it is asked for (a save holds one whole state tensor on the device at a time)."""
        _, view, _, _ = self._shards[id(p)]
        for k, v in sorted(self.optimizer.state.get(view, {}).items()):
            yield k, self.grad_buffer.gather_dp(p, v) if torch.is_tensor(v) and v.dim() else v

    def load_full_state(self, p, state: dict) -> None:
        """Set ``p``'s state from whole tensors shaped like ``p`` (keeps the owned range)."""
        _, view, lo, hi = self._shards[id(p)]
        self.optimizer.state[view] = {
            k: v.reshape(-1)[lo:hi].to(view.device, view.dtype).clone()
            if torch.is_tensor(v) and v.dim() else v
            for k, v in state.items()}

    def __repr__(self) -> str:
        return f"DistributedOptimizer(dp={self.ps.dp}, {self.optimizer!r})"
