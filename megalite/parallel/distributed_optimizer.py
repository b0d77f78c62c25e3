"""Optimizers over fp32 main weights fed by the main-gradient buffers; sharded over data
parallelism, the distributed optimizer (ZeRO stage 1).

:class:`MainParamOptimizer` wraps a torch optimizer built over the model's parameters (not
stepped yet): an inner optimizer of the same class and hyperparameters (param groups,
weight decay included) steps on one fp32 *main* tensor per parameter, whose gradient is the
parameter's reduced fp32 main gradient (:meth:`MainGrads.main_grad`). For an fp32
parameter the main tensor is a view of the parameter itself (no copy); for a bf16/fp16
parameter it is an fp32 copy, and after each step the parameter receives the main weight
rounded to 16 bits (Megatron's ``--bf16``: the optimizer holds the fp32 master weights).

With a sharded :class:`~megalite.parallel.main_grads.MainGrads` (``shard=True``) this is the
distributed optimizer: each rank of a parameter's reduction group owns one contiguous
1/size chunk of every bucket; gradients are reduce-scattered (averaged) into the owned
chunks, the inner optimizer holds main weights and state for the owned part only, and the
updated parameters are all-gathered (in their own dtype). Any elementwise torch optimizer
works (AdamW, SGD with momentum, ...). Bytes per parameter on each rank, AdamW:

    fp32 parameters:            4 (weight) + 4 (grad) + 8/dp (moments)
    bf16/fp16 parameters:       2 (weight) + 4 (grad) + 12/dp (main weight + moments)

(Megatron-Core's table: 8 + 8/d and 6 + 12/d; 16 and 18 without sharding.)

Checkpoints use :meth:`gathered_state` / :meth:`load_full_state` (whole per-parameter
tensors, the format checkpoints store) and :meth:`main_weight` / :meth:`load_main_weight`.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from megalite.parallel.main_grads import MainGrads
from megalite.parallel.param_meta import share_meta


class MainParamOptimizer(torch.optim.Optimizer):
    """``MainParamOptimizer(optimizer, main_grads)``: step ``optimizer``'s class on fp32
    main weights of the parameters ``main_grads`` (built over the same model) holds.
    ``param_groups``, ``state``, ``state_dict`` and lr schedulers work as for the inner
    optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, main_grads: MainGrads):
        if any(optimizer.state.values()):
            raise ValueError("wrap the optimizer before its first step: its state would be lost")
        self.main_grads, self.ps = main_grads, main_grads.ps
        self._shards: dict[int, tuple] = {}  # id(param) -> (param, main tensor, lo, hi)
        groups = []
        for group in optimizer.param_groups:
            mains = []
            for p in group["params"]:
                if p not in main_grads:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} in the optimizer "
                                     f"is not in the gradient buffer: build both from the same "
                                     f"model")
                lo, hi = main_grads.owned_range(p)
                flat = p.detach().view(-1)[lo:hi]
                # fp32: the main weight is the parameter (a view, aliasing its storage)
                main = torch.nn.Parameter(flat if p.dtype == torch.float32
                                          else flat.float().clone())
                main.grad = main_grads.main_grad(p)
                share_meta(p, main)
                self._shards[id(p)] = (p, main, lo, hi)
                mains.append(main)
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": mains})
        cls = type(optimizer)
        accepted = inspect.signature(cls).parameters
        self.optimizer = cls(groups, **{k: v for k, v in optimizer.defaults.items()
                                        if k in accepted})
        self._copies = [(p, main, lo, hi) for p, main, lo, hi in self._shards.values()
                        if p.dtype != torch.float32 and hi > lo]

    # The inner optimizer holds groups, state and defaults (so lr schedulers drive it).
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state,
                     lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, v: setattr(self.optimizer, "defaults", v))

    @property
    def grad_buffer(self) -> MainGrads:  # the name of earlier releases
        return self.main_grads

    def shard_parameters(self, params=None) -> list[torch.nn.Parameter]:
        """This rank's main tensors (with their owned gradients) of ``params`` (default:
        all), in that order."""
        params = self.main_grads.params if params is None else params
        return [self._shards[id(p)][1] for p in params if id(p) in self._shards]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main_grads.zero_grad()  # the gradients are views: always zeroed, never None

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.copy_main_to_params()
        self.main_grads.all_gather_params()
        return loss

    @torch.no_grad()
    def copy_main_to_params(self) -> None:
        """16-bit parameters take their (owned part of the) main weights, rounded."""
        for p, main, lo, hi in self._copies:
            p.view(-1)[lo:hi].copy_(main)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def full_grad(self, p) -> torch.Tensor:
        """``p``'s averaged gradient, whole (collective over its reduction group)."""
        _, main, _, _ = self._shards[id(p)]
        return self.main_grads.gather_dp(p, main.grad)

    def main_weight(self, p) -> torch.Tensor:
        """``p``'s fp32 main weight, whole and shaped like ``p`` (collective over its
        reduction group when sharded)."""
        _, main, _, _ = self._shards[id(p)]
        return self.main_grads.gather_dp(p, main.detach())

    @torch.no_grad()
    def load_main_weight(self, p, full: torch.Tensor) -> None:
        """Set ``p``'s main weight (and ``p``) from a whole tensor shaped like ``p``."""
        _, main, lo, hi = self._shards[id(p)]
        main.copy_(full.reshape(-1)[lo:hi].to(main.device, main.dtype))
        p.copy_(full.to(p.device).view(p.shape))

    def gathered_state(self, p) -> dict:
        """``p``'s optimizer state with every tensor whole, shaped like ``p`` (collective
        over its reduction group; every rank returns it); scalars such as AdamW's ``step``
        as they are."""
        return dict(self.iter_gathered_state(p))

    def iter_gathered_state(self, p):
        """:meth:`gathered_state` one ``(key, value)`` at a time, each tensor gathered when
        it is asked for (a save holds one whole state tensor on the device at a time)."""
        _, main, _, _ = self._shards[id(p)]
        for k, v in sorted(self.optimizer.state.get(main, {}).items()):
            yield k, (self.main_grads.gather_dp(p, v) if torch.is_tensor(v) and v.dim()
                      else v)

    def load_full_state(self, p, state: dict) -> None:
        """Set ``p``'s state from whole tensors shaped like ``p`` (keeps the owned range)."""
        _, main, lo, hi = self._shards[id(p)]
        self.optimizer.state[main] = {
            k: v.reshape(-1)[lo:hi].to(main.device, main.dtype).clone()
            if torch.is_tensor(v) and v.dim() else v
            for k, v in state.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.main_grads!r}, {self.optimizer!r})"


class DistributedOptimizer(MainParamOptimizer):
    """``DistributedOptimizer(optimizer, main_grads)``: shard ``optimizer`` (built over the
    model's parameters, not stepped yet) over the reduction groups of ``main_grads`` (built
    with ``shard=True`` over the same parameters)."""

    def __init__(self, optimizer: torch.optim.Optimizer, main_grads: MainGrads):
        if not main_grads.shard:
            raise ValueError("the distributed optimizer needs gradient buffers built with "
                             "shard=True")
        super().__init__(optimizer, main_grads)
        if self.ps.dp_cp == 1 and self.ps.rank == 0:
            warnings.warn("distributed optimizer at dp=1 shards nothing: each rank keeps the "
                          "whole optimizer state of its parameters", stacklevel=2)
