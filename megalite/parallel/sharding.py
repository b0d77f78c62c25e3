"""Move parameters between their full (tp=1) form and this rank's TP shard.

Every TP-sharded parameter carries its layout (``tp_dim``, ``tp_sizes``, ``tp_real_size``,
set by :func:`megalite.parallel.layers.set_tp_layout`); replicated parameters carry none.
Checkpoints, Hugging Face conversion and the tests all use these two functions, so there is
one definition of "which slice lives where".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.layers import shard_segments
from megalite.parallel.state import ParallelState, get_state


def is_tp_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tp_dim", None) is not None


def _padded_sizes(param: torch.Tensor, tp: int) -> list[int]:
    """Segment sizes of the full *padded* tensor (local shard size x tp for each segment)."""
    if param.tp_real_size is not None:  # one padded segment (vocab tables)
        return [param.shape[param.tp_dim] * tp]
    return list(param.tp_sizes)


def shard_full(full: torch.Tensor, param: torch.Tensor, state: ParallelState | None = None
               ) -> torch.Tensor:
    """This rank's shard of ``full``, the unpadded tp=1 tensor of ``param``."""
    ps = state or get_state()
    if not is_tp_sharded(param):
        return full
    dim = param.tp_dim
    sizes = _padded_sizes(param, ps.tp)
    if param.tp_real_size is not None and full.shape[dim] < sizes[0]:
        pad = [0, 0] * (full.dim() - 1 - dim) + [0, sizes[0] - full.shape[dim]]
        full = F.pad(full, pad)
    if sum(sizes) != full.shape[dim]:
        raise ValueError(f"full tensor has {full.shape[dim]} entries along dim {dim}; the "
                         f"parameter's layout expects {sum(sizes)} (model shapes differ?)")
    return shard_segments(full, sizes, dim, ps.tp, ps.tp_rank)


def gather_full(param: torch.Tensor, state: ParallelState | None = None,
                tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The unpadded tp=1 tensor of ``param`` (collective over the TP group).

    ``tensor`` gathers something shaped like the parameter instead (its gradient, an
    optimizer state)."""
    ps = state or get_state()
    local = param.detach() if tensor is None else tensor
    if not is_tp_sharded(param):
        return local
    dim = param.tp_dim
    gathered = comm.all_gather(local.contiguous(), ps.tp_group, dim=dim)
    sizes = _padded_sizes(param, ps.tp)
    if len(sizes) > 1:  # undo the per-segment interleave: [q0 k0 v0 q1 k1 v1] -> [q k v]
        local_sizes = [s // ps.tp for s in sizes]
        per_rank = gathered.chunk(ps.tp, dim=dim)
        pieces = [r.split(local_sizes, dim=dim) for r in per_rank]
        gathered = torch.cat([pieces[r][i] for i in range(len(sizes)) for r in range(ps.tp)],
                             dim=dim)
    if param.tp_real_size is not None:
        gathered = gathered.narrow(dim, 0, param.tp_real_size)
    return gathered
