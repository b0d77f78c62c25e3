"""The global gradient norm across the layout, and the tied-embedding gradient sum.

* :func:`norm_squares` adds up squared gradient pieces by the metadata of their parameters
  (:mod:`megalite.parallel.param_meta`) into the squared L2 norm of the *model's* gradient:
  TP-sharded parameters contribute their shard on every TP rank, TP-replicated ones only
  once, stage duplicates (a tied embedding's last-stage copy) not at all, expert parameters
  on every rank of the expert-parallel group (each holds other experts), and the pipeline
  stages' sums are added. Where the pieces are a rank's shard of a dp-sharded buffer (the
  distributed optimizer), the data-parallel ranks' sums are added too.
* :func:`clip_grad_norm_` / :func:`grad_norm` apply it to parameters' ``.grad``.
* :func:`allreduce_shared` sums the gradients of parameters duplicated on the first and last
  pipeline stage (tied embeddings) so the copies stay equal.

The gradient path itself (main-gradient buffers, their overlapped reduction) is in
:mod:`megalite.parallel.main_grads` and :mod:`megalite.parallel.grad_buffer`.
"""
from __future__ import annotations

from typing import Iterable

import torch

from megalite.parallel import comm
from megalite.parallel.grad_buffer import DEFAULT_BUCKET_BYTES, dense_reduction, expert_reduction
from megalite.parallel.param_meta import ParamMeta, param_meta
from megalite.parallel.state import ParallelState

__all__ = ["DEFAULT_BUCKET_BYTES", "norm_squares", "grad_norm", "clip_grad_norm_",
           "scale_to_max_norm_", "allreduce_shared"]


def norm_squares(pieces: Iterable[tuple[ParamMeta, torch.Tensor]], ps: ParallelState, *,
                 dense_sharded: bool = False, expert_sharded: bool = False) -> torch.Tensor:
    """Squared global norm (a 1-element fp32 tensor, the same on every rank) of the
    gradient whose pieces on this rank are ``(metadata, gradient piece)``. Collective over
    tp, pp, and the reduction groups whose pieces are sharded."""
    dense = torch.zeros(1, dtype=torch.float32, device=ps.device)
    expert = torch.zeros(1, dtype=torch.float32, device=ps.device)
    for meta, g in pieces:
        if meta.pipeline_duplicate or not g.numel():
            continue
        if meta.expert_parallel:
            expert += g.detach().float().pow(2).sum()
        elif meta.tp_sharded or ps.tp_rank == 0:  # TP-replicated: counted on TP rank 0 only
            dense += g.detach().float().pow(2).sum()
    comm.all_reduce(dense, ps.tp_group)
    if dense_sharded:
        comm.all_reduce(dense, dense_reduction(ps).group)
    if ps.ep > 1:  # each expert-parallel rank holds other experts
        comm.all_reduce(expert, ps.ep_group)
    if expert_sharded:
        comm.all_reduce(expert, expert_reduction(ps).group)
    total = dense + expert
    comm.all_reduce(total, ps.pp_group)
    return total


def grad_norm(params: Iterable[torch.nn.Parameter], ps: ParallelState,
              dp_sharded: bool = False) -> torch.Tensor:
    """Global L2 norm of the gradient of the whole model (all stages, all shards) from the
    parameters' ``.grad``. ``dp_sharded``: they are this dp rank's part of the gradient."""
    pieces = ((param_meta(p), p.grad) for p in params if p.grad is not None)
    return norm_squares(pieces, ps, dense_sharded=dp_sharded,
                        expert_sharded=dp_sharded).sqrt()[0]


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                    ps: ParallelState, dp_sharded: bool = False) -> torch.Tensor:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before."""
    params = list(params)
    norm = grad_norm(params, ps, dp_sharded)
    scale_to_max_norm_([p.grad for p in params if p.grad is not None], norm, max_norm)
    return norm


def scale_to_max_norm_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradient pieces ``grads`` of a gradient whose global norm is ``norm`` so that
    norm is at most ``max_norm`` (0: leave them): the one clipping rule of every path."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, coef.to(dtype))


def allreduce_shared(grads: Iterable[torch.Tensor], ps: ParallelState) -> None:
    """Sum gradient tensors of parameters duplicated on the first and last pipeline stage
    (in place, over the embedding group; nothing at pp = 1)."""
    grads = [g for g in grads if g is not None]
    if ps.pp == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, ps.embedding_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
