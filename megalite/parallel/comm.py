"""Communication ops with autograd, as in Megatron-LM's paper.

Tensor parallelism needs two conjugate operators around each column->row pair:

* ``f`` = :func:`copy_to_tp_region`: identity forward, all-reduce backward (enters a TP region);
* ``g`` = :func:`reduce_from_tp_region`: all-reduce forward, identity backward (leaves it).

Sequence parallelism replaces ``g`` by a reduce-scatter along the sequence and ``f`` by an
all-gather, which moves the same bytes but keeps activations outside TP regions sharded:

* :func:`gather_from_sequence_parallel_region`: all-gather forward, reduce-scatter backward;
* :func:`reduce_scatter_to_sequence_parallel_region`: reduce-scatter forward, all-gather backward.

Expert parallelism exchanges tokens with a variable-size all-to-all, its own conjugate (the
backward is the all-to-all with the send and receive sizes swapped):

* :func:`all_to_all`: rows of ``x`` in ``input_splits`` go to the group's ranks in order;
  returns the rows received, ``output_splits`` from each rank.

Every op is the identity when the group has one rank (or there is no torch.distributed),
so a model written with them runs in a single plain process.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]


# --------------------------------------------------------------------------- raw collectives

class CommStats:
    """Bytes and calls per collective, recorded while :func:`count_comm` is active."""

    def __init__(self):
        self.bytes = Counter()
        self.calls = Counter()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        return f"CommStats(bytes={dict(self.bytes)}, calls={dict(self.calls)})"


_ACTIVE_STATS: list[CommStats] = []


@contextlib.contextmanager
def count_comm():
    """Count each collective's calls and payload bytes on this rank: the size of the full
    tensor it all-reduces, all-gathers (output) or reduce-scatters (input). A ring algorithm
    sends 2(n-1)/n of the payload for an all-reduce and (n-1)/n for the other two."""
    stats = CommStats()
    _ACTIVE_STATS.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE_STATS.remove(stats)


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _run(op: str, tensor: torch.Tensor, group, fn, payload_elems: int | None = None):
    """Run a collective; count its payload: the full (unsharded) tensor it reduces or builds."""
    for stats in _ACTIVE_STATS:
        stats.bytes[op] += (payload_elems or tensor.numel()) * tensor.element_size()
        stats.calls[op] += 1
    try:
        return fn()
    except RuntimeError as e:  # gloo/NCCL timeouts: say who waited on what
        raise RuntimeError(f"rank {dist.get_rank()}: {op} of {tuple(tensor.shape)} "
                           f"{tensor.dtype} over ranks {dist.get_process_group_ranks(group)} "
                           f"failed: {e}") from e


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor (returns it)."""
    if group_size(group) == 1:
        return x
    _run("all_reduce", x, group, lambda: dist.all_reduce(x, op=op, group=group))
    return x


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in group-rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    _run("all_gather", x, group, lambda: dist.all_gather(parts, x, group=group),
         payload_elems=x.numel() * world)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, then keep this rank's chunk of ``dim``."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible "
                         f"by the group size {world}")
    parts = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    _run("reduce_scatter", x, group, lambda: dist.reduce_scatter(out, parts, group=group))
    return out


def all_to_all_single(x: torch.Tensor, group, output_splits: list[int],
                      input_splits: list[int]) -> torch.Tensor:
    """Rows ``x[sum(input_splits[:j]) : ...]`` go to group rank j; returns the rows received,
    ``output_splits[i]`` of them from rank i, in group-rank order. Counted payload: the rows
    sent plus the rows received (what this rank moves through the network, itself
    included)."""
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    row = math.prod(x.shape[1:])  # elements per row (x may have no rows: an idle expert)
    _run("all_to_all", x, group, lambda: dist.all_to_all_single(
        out, x, output_split_sizes=list(output_splits), input_split_sizes=list(input_splits),
        group=group), payload_elems=(sum(input_splits) + sum(output_splits)) * row)
    return out


def split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of ``dim`` (no communication)."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {world} ranks; "
                         f"make it a multiple of {world}")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in global rank order (``[obj]`` in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class PeerFailure(RuntimeError):
    """Raised by :func:`agree` on a rank that did not fail itself: another rank did, and
    that rank raises (and reports) its own error."""


def agree(error: BaseException | None, what: str, payload=None) -> list:
    """Collective error check: share every rank's ``payload``; if any rank failed, raise on
    every rank (the failing one re-raises its own exception) instead of leaving the others
    hanging in the next collective. Doubles as a barrier."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered = all_gather_object((message, payload))
    if error is not None:
        raise error
    failed = {r: m for r, (m, _) in enumerate(gathered) if m}
    if failed:
        raise PeerFailure(f"{what} failed on rank(s) {sorted(failed)}: {failed}")
    return [p for _, p in gathered]


# --------------------------------------------------------------------------- autograd pairs

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, inplace):
        if not inplace or x.is_leaf or not x.is_contiguous() or x._base is not None:
            return all_reduce(x.contiguous().clone(), group)
        # No copy of the activation; autograd raises if another node saved x for
        # backward, so this cannot silently corrupt a gradient.
        ctx.mark_dirty(x)
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _conjugate_pair(name: str, forward_op, backward_op):
    """An autograd Function running ``forward_op(x, group, dim)`` forward and
    ``backward_op(grad, group, dim)`` backward."""
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return forward_op(x, group, dim)

    def backward(ctx, grad):
        return backward_op(grad, ctx.group, ctx.dim), None, None

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_ScatterToRegion = _conjugate_pair("_ScatterToRegion", split, all_gather)
_GatherFromRegion = _conjugate_pair("_GatherFromRegion", all_gather, split)
_GatherReduceScatter = _conjugate_pair("_GatherReduceScatter", all_gather, reduce_scatter)
_ReduceScatterGather = _conjugate_pair("_ReduceScatterGather", reduce_scatter, all_gather)


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all; its backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.splits = group, (list(output_splits), list(input_splits))
        return all_to_all_single(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return all_to_all_single(grad, ctx.group, input_splits, output_splits), None, None, None


def all_to_all(x, group, output_splits: list[int], input_splits: list[int]):
    """Expert dispatch/combine: rows of ``x`` split by ``input_splits`` to the group's ranks,
    ``output_splits`` rows received from each; backward sends the gradients back the same
    way. The identity when the group has one rank."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, output_splits,
                                                              input_splits)


def copy_to_tp_region(x, group):
    """Megatron's *f*: identity forward, all-reduce of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x, group, inplace: bool = False):
    """Megatron's *g*: all-reduce forward, identity backward. ``inplace=True`` reduces an
    intermediate activation in its own storage (the caller must not read ``x`` again)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group, inplace)


def scatter_to_tp_region(x, group, dim=-1):
    """Keep this rank's slice of the last dim forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group, dim)


def gather_from_tp_region(x, group, dim=-1):
    """All-gather along the last dim forward; keep this rank's gradient slice backward."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group, dim)


def scatter_to_sequence_parallel_region(x, group, dim=SEQUENCE_DIM):
    """Keep this rank's sequence chunk forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group, dim)


def gather_from_sequence_parallel_region(x, group, dim=SEQUENCE_DIM):
    """Sequence parallel *f*: all-gather the sequence forward, reduce-scatter backward."""
    return x if group_size(group) == 1 else _GatherReduceScatter.apply(x, group, dim)


def reduce_scatter_to_sequence_parallel_region(x, group, dim=SEQUENCE_DIM):
    """Sequence parallel *g*: reduce-scatter along the sequence forward, all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterGather.apply(x, group, dim)
