"""Gradient bookkeeping across the 3D layout, once per optimizer step.

* :func:`allreduce_data_parallel` averages gradients over the dp group in a few large
  buckets (one all-reduce per bucket, after all microbatches have accumulated).
* :func:`allreduce_shared` sums the gradients of parameters duplicated on several pipeline
  stages (tied input/output embeddings on the first and last stage) so the copies stay equal.
* :func:`clip_grad_norm_` computes the global norm of the *model's* gradient: TP-sharded
  parameters contribute their shard on every TP rank, TP-replicated ones only once, stage
  duplicates only once, and the pipeline stages' sums are added. With the distributed
  optimizer (``dp_sharded=True``) each dp rank holds a disjoint part of the gradient, so the
  dp ranks' sums are added too.

The overlapped reduction (during backward, into a flat buffer) is in :mod:`grad_buffer`.
"""
from __future__ import annotations

from typing import Iterable

import torch

from megalite.parallel import comm
from megalite.parallel.sharding import is_tp_sharded
from megalite.parallel.state import ParallelState

DEFAULT_BUCKET_BYTES = 25 * 2**20


def _buckets(grads: list[torch.Tensor], bucket_bytes: int):
    bucket, size = [], 0
    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > bucket_bytes
                       or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


def _allreduce_coalesced(grads: list[torch.Tensor], group, scale: float,
                         bucket_bytes: int) -> None:
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        comm.all_reduce(flat, group)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def allreduce_data_parallel(params: Iterable[torch.nn.Parameter], ps: ParallelState,
                            bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Average gradients over the data-parallel group (bucketed)."""
    if ps.dp > 1:
        _allreduce_coalesced(_grads(params), ps.dp_group, 1.0 / ps.dp, bucket_bytes)


def allreduce_shared(params: Iterable[torch.nn.Parameter], ps: ParallelState) -> None:
    """Sum the gradients of parameters duplicated on the first and last pipeline stage."""
    grads = _grads(params)
    if ps.pp > 1 and grads:
        _allreduce_coalesced(grads, ps.embedding_group, 1.0, DEFAULT_BUCKET_BYTES)


def grad_norm(params: Iterable[torch.nn.Parameter], ps: ParallelState,
              dp_sharded: bool = False) -> torch.Tensor:
    """Global L2 norm of the gradient of the whole model (all stages, all shards).
    ``dp_sharded``: ``params`` are this dp rank's part of the gradient (distributed optimizer)."""
    squares = torch.zeros(1, dtype=torch.float32, device=ps.device)
    for p in params:
        if p.grad is None or getattr(p, "pipeline_duplicate", False):
            continue
        if not is_tp_sharded(p) and ps.tp_rank != 0:
            continue  # replicated across the TP group: counted on TP rank 0 only
        squares += p.grad.detach().float().pow(2).sum()
    comm.all_reduce(squares, ps.tp_group)
    comm.all_reduce(squares, ps.pp_group)
    if dp_sharded:
        comm.all_reduce(squares, ps.dp_group)
    return squares.sqrt()[0]


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float,
                    ps: ParallelState, dp_sharded: bool = False) -> torch.Tensor:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before."""
    params = list(params)
    norm = grad_norm(params, ps, dp_sharded)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in _grads(params):
            g.mul_(coef.to(g.dtype))
    return norm
