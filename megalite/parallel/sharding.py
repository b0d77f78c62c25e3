"""Move parameters between their full (tp=1) form and this rank's TP shard.

Every TP-sharded parameter has its layout (``tp_dim``, ``tp_sizes``, ``tp_real_size``, set by
:func:`megalite.parallel.layers.set_tp_layout`) in :mod:`megalite.parallel.param_meta`;
replicated parameters have none.
Checkpoints, Hugging Face conversion and the tests all use these two functions, so there is
one definition of "which slice lives where".

Saving streams: :func:`gather_full_to_cpu` copies each gathered tensor to host memory before
the next is gathered, and :func:`send_stages_to_first` moves the pipeline stages' host
tensors to the first stage one message per tensor, so no GPU ever holds more than one full
tensor of a model or optimizer being saved.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.fsdp import full_tensor
from megalite.parallel.layers import shard_segments
from megalite.parallel.param_meta import param_meta
from megalite.parallel.state import ParallelState, get_state


def is_tp_sharded(param: torch.Tensor) -> bool:
    return param_meta(param).tp_sharded


def _padded_sizes(param: torch.Tensor, tp: int) -> list[int]:
    """Segment sizes of the full *padded* tensor (local shard size x tp for each segment)."""
    meta = param_meta(param)
    if meta.tp_real_size is not None:  # one padded segment (vocab tables)
        return [param.shape[meta.tp_dim] * tp]
    return list(meta.tp_sizes)


def is_expert_sharded(param: torch.Tensor, ps: ParallelState) -> bool:
    """An MoE expert tensor split over the expert-parallel group along dim 0 (stacked
    experts, ``expert_parallel``), at ep > 1."""
    return param_meta(param).expert_parallel and ps.ep > 1


def shard_full(full: torch.Tensor, param: torch.Tensor, state: ParallelState | None = None
               ) -> torch.Tensor:
    """This rank's shard of ``full``, the unpadded tp=1 tensor of ``param``."""
    ps = state or get_state()
    if is_expert_sharded(param, ps):  # this ep rank's block of experts
        local = param.shape[0]
        if full.shape[0] != local * ps.ep:
            raise ValueError(f"full tensor has {full.shape[0]} experts; the parameter's layout "
                             f"expects {local} x ep={ps.ep} (model shapes differ?)")
        return full.narrow(0, ps.ep_rank * local, local)
    if not is_tp_sharded(param):
        return full
    dim = param_meta(param).tp_dim
    sizes = _padded_sizes(param, ps.tp)
    if param_meta(param).tp_real_size is not None and full.shape[dim] < sizes[0]:
        pad = [0, 0] * (full.dim() - 1 - dim) + [0, sizes[0] - full.shape[dim]]
        full = F.pad(full, pad)
    if sum(sizes) != full.shape[dim]:
        raise ValueError(f"full tensor has {full.shape[dim]} entries along dim {dim}; the "
                         f"parameter's layout expects {sum(sizes)} (model shapes differ?)")
    return shard_segments(full, sizes, dim, ps.tp, ps.tp_rank)


def gather_full(param: torch.Tensor, state: ParallelState | None = None,
                tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The unpadded tp=1 tensor of ``param`` (collective over the TP group; for MoE experts
    at ep > 1 over the expert-parallel group: every expert).

    ``tensor`` gathers something shaped like the parameter instead (its gradient, an
    optimizer state). An FSDP parameter or state (a DTensor) is gathered over dp first, so
    with FSDP every rank of the dp group must call it too."""
    ps = state or get_state()
    # An FSDP shard (DTensor) is first gathered over dp: every dp rank calls this alike.
    local = full_tensor(param.detach() if tensor is None else tensor)
    if is_expert_sharded(param, ps):  # collective over the ep group instead
        return comm.all_gather(local.contiguous(), ps.ep_group, dim=0)
    if not is_tp_sharded(param):
        return local
    meta = param_meta(param)
    dim = meta.tp_dim
    gathered = comm.all_gather(local.contiguous(), ps.tp_group, dim=dim)
    sizes = _padded_sizes(param, ps.tp)
    if len(sizes) > 1:  # undo the per-segment interleave: [q0 k0 v0 q1 k1 v1] -> [q k v]
        local_sizes = [s // ps.tp for s in sizes]
        per_rank = gathered.chunk(ps.tp, dim=dim)
        pieces = [r.split(local_sizes, dim=dim) for r in per_rank]
        gathered = torch.cat([pieces[r][i] for i in range(len(sizes)) for r in range(ps.tp)],
                             dim=dim)
    if meta.tp_real_size is not None:
        gathered = gathered.narrow(dim, 0, meta.tp_real_size)
    return gathered


def gather_full_to_cpu(param: torch.Tensor, state: ParallelState | None = None,
                       tensor: torch.Tensor | None = None, keep: bool = True,
                       dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """:func:`gather_full`, copied to host memory (cast to ``dtype`` if given) at once, so
    the device holds one full tensor at a time however many are gathered in a row. Ranks
    that write nothing pass ``keep=False``: they join the collective and get None."""
    full = gather_full(param, state, tensor)
    if not keep:
        return None
    return full.to("cpu", dtype) if dtype is not None else full.cpu()


def send_stages_to_first(stage: dict[str, torch.Tensor], state: ParallelState | None = None
                         ) -> dict[str, torch.Tensor] | None:
    """Merge every pipeline stage's ``{name: host tensor}`` on this pipeline group's first
    rank, one point-to-point message per tensor (an object collective would stage a whole
    stage on the GPU under NCCL). Collective over the pp group; returns the merged dict on
    the first stage (stage order; a name already there, e.g. the last stage's copy of a
    tied embedding, is not sent again), None on the others."""
    ps = state or get_state()
    if ps.pp == 1 or not dist.is_initialized():
        return stage
    first, merged = ps.pp_ranks[0], dict(stage) if ps.pp_rank == 0 else None
    seen = set(stage) if ps.pp_rank == 0 else set()
    for src_stage in range(ps.pp):
        src = ps.pp_ranks[src_stage]
        catalogue = [[(n, tuple(t.shape), t.dtype) for n, t in stage.items()]
                     if ps.pp_rank == src_stage else None]
        dist.broadcast_object_list(catalogue, src=src, group=ps.pp_group, device=ps.device)
        new = [entry for entry in catalogue[0] if entry[0] not in seen]
        seen.update(name for name, _, _ in catalogue[0])
        if src_stage == 0:
            continue
        for name, shape, dtype in new:
            if ps.pp_rank == src_stage:
                dist.send(stage[name].to(ps.device), dst=first, group=ps.pp_group)
            elif ps.pp_rank == 0:
                buffer = torch.empty(shape, dtype=dtype, device=ps.device)
                dist.recv(buffer, src=src, group=ps.pp_group)
                merged[name] = buffer.cpu()
    return merged
