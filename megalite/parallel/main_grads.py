"""The gradient path: every parameter's gradient goes into an fp32 main-gradient buffer that
knows its reduction group.

:class:`MainGrads` splits a model's parameters by where their gradients reduce (by
:func:`megalite.parallel.param_meta.param_meta`): dense parameters over data x context
(``ps.dp_cp_group``; the dp group when cp = 1), MoE experts (``expert_parallel``) over
expert-data (``ps.expert_dp_group``), and by parameter dtype (16-bit weights and fp32 norm
weights can sit side by side), and builds one :class:`~megalite.parallel.grad_buffer.
GradBuffer` for each. The same path serves dp = 1 and dp > 1, with and without the
distributed optimizer (``shard=True``: reduce-scatter, each rank keeps its chunk), with
``overlap_grad_reduce`` (buckets start during the last microbatch's backward) or without
(:meth:`finish` starts them all).

After :meth:`finish`, the reduced gradient of ``p`` on this rank is :meth:`main_grad` (the
owned part with ``shard=True``); :meth:`norm`, :meth:`clip_` and :meth:`unscale_` act on
exactly those parts, so the optimizer (plain or distributed) needs no metadata of its own.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from megalite.parallel import comm
from megalite.parallel.grad_buffer import (DEFAULT_BUCKET_BYTES, GradBuffer, dense_reduction,
                                           expert_reduction)
from megalite.parallel.grads import norm_squares, scale_to_max_norm_
from megalite.parallel.param_meta import param_meta
from megalite.parallel.state import ParallelState


class MainGrads:
    def __init__(self, stage_params: dict[int, list[torch.nn.Parameter]], ps: ParallelState,
                 *, shard: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 hold_back=()):
        self.ps, self.shard = ps, shard
        order, seen = [], set()
        for stage in sorted(stage_params):
            for p in stage_params[stage]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    order.append(p)
        self.params = order  # the model's order (the norm sums in it)
        key = lambda p: (param_meta(p).expert_parallel, str(p.dtype))  # noqa: E731
        keys = sorted({key(p) for p in order})  # dense before expert; same order on all ranks
        held = {id(p) for p in hold_back}
        self.buffers: list[GradBuffer] = []
        self._buffer_of: dict[int, GradBuffer] = {}
        for k in keys:
            expert = k[0]
            mine = {stage: [p for p in params if p.requires_grad and key(p) == k]
                    for stage, params in stage_params.items()}
            buffer = GradBuffer(mine, ps, shard=shard, bucket_bytes=bucket_bytes,
                                hold_back=[p for p in order if id(p) in held and key(p) == k],
                                reduction=expert_reduction(ps) if expert else dense_reduction(ps))
            self.buffers.append(buffer)
            self._buffer_of.update({id(p): buffer for p in buffer.params})
        self._meta = {id(p): param_meta(p) for p in order}

    # ------------------------------------------------------------------ per parameter
    def __contains__(self, p) -> bool:
        return id(p) in self._buffer_of

    def buffer(self, p) -> GradBuffer:
        return self._buffer_of[id(p)]

    def grad_view(self, p) -> torch.Tensor:
        return self._buffer_of[id(p)].grad_view(p)

    def owned_range(self, p) -> tuple[int, int]:
        """[lo, hi) of ``p.view(-1)`` whose reduced gradient this rank holds (all of it
        unless sharded)."""
        if not self.shard:
            return 0, p.numel()
        return self._buffer_of[id(p)].owned_range(p)

    def main_grad(self, p) -> torch.Tensor:
        """This rank's reduced fp32 gradient of ``p``, flat: the owned range."""
        lo, hi = self.owned_range(p)
        return self.grad_view(p).view(-1)[lo:hi]

    def gather_dp(self, p, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor shaped like ``p`` whose owned range each rank of ``p``'s
        reduction group holds as ``local`` (collective over that group)."""
        if not self.shard:
            return local.view(p.shape)
        return self._buffer_of[id(p)].gather_dp(p, local)

    # ------------------------------------------------------------------ one step
    def zero_grad(self) -> None:
        for b in self.buffers:
            b.zero_grad()

    @contextlib.contextmanager
    def final_backward(self, stage: int):
        with contextlib.ExitStack() as stack:
            for b in self.buffers:
                stack.enter_context(b.final_backward(stage))
            yield

    def finish(self, before_held: Callable[[torch.Tensor], None] | None = None) -> None:
        """Start what has not started, wait, average; ``before_held(flat)`` runs on the
        held-back (tied-embedding) slice of each buffer holding one."""
        for b in self.buffers:
            b.finish(before_held)

    @torch.no_grad()
    def all_gather_params(self) -> None:
        for b in self.buffers:
            b.all_gather_params()

    def remove_hooks(self) -> None:
        for b in self.buffers:
            b.remove_hooks()

    # ------------------------------------------------------------------ on the reduced grads
    def _regions(self) -> list[torch.Tensor]:
        return [r for b in self.buffers for r in b.reduced_regions()]

    def norm(self) -> torch.Tensor:
        """Global L2 norm of the model's gradient (collective; every rank gets it)."""
        pieces = ((self._meta[id(p)], self.main_grad(p)) for p in self.params)
        return norm_squares(pieces, self.ps, dense_sharded=self.shard,
                            expert_sharded=self.shard).sqrt()[0]

    @torch.no_grad()
    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so the global norm is at most ``max_norm`` (0: no clipping);
        returns the norm before."""
        norm = self.norm()
        scale_to_max_norm_(self._regions(), norm, max_norm)
        return norm

    @torch.no_grad()
    def unscale_(self, factor: float) -> bool:
        """Multiply the gradients by ``factor`` (1/loss scale); True when every rank's
        gradients are finite (collective over all ranks)."""
        regions = self._regions()
        found = torch.zeros(1, device=self.ps.device)
        if regions:
            torch._foreach_mul_(regions, factor)
            for r in regions:
                found += (~torch.isfinite(r)).any().float()
        comm.all_reduce(found, torch.distributed.group.WORLD
                        if torch.distributed.is_initialized() else None,
                        op=torch.distributed.ReduceOp.MAX)
        return found.item() == 0

    # ------------------------------------------------------------------ memory
    def nbytes(self) -> int:
        return sum(b.data.numel() * b.data.element_size() for b in self.buffers)

    def __repr__(self) -> str:
        parts = [f"{b.reduction.name}/{str(b.param_dtype).replace('torch.', '')}"
                 f"x{b.reduction.size}: {len(b.params)} params, {len(b.buckets)} buckets"
                 for b in self.buffers]
        return f"MainGrads(shard={self.shard}; {'; '.join(parts)})"
