"""Contiguous gradient buckets of one reduction group, reduced while backward still runs.

A :class:`GradBuffer` holds the main gradients of parameters that reduce over one process
group (its :class:`ReductionGroup`: data x context for dense parameters, expert-data for MoE
experts; :mod:`megalite.parallel.main_grads` builds one per group and parameter dtype). The
buffer is one flat fp32 tensor laid out in reverse parameter order (roughly the order
backward finishes them) and cut into buckets of about 25 MB, each padded to a multiple of
the group size.

How a gradient gets in: an fp32 parameter's ``.grad`` is a view into the buffer, so autograd
accumulates there in place (zero with :meth:`GradBuffer.zero_grad`, never set to None). A
16-bit parameter's ``.grad`` is the 16-bit gradient autograd just produced; a hook adds it
into the fp32 view (the add converts as it reads, no copy kernel) and frees it, so the
microbatches accumulate in fp32 (Megatron's ``main_grad``).

Overlap: the pipeline executor enters :meth:`GradBuffer.final_backward` around each stage's
last gradient-producing action (``B`` or ``W``) of the step. During it every parameter of
that stage receives its last accumulation (a post-accumulate-grad hook counts it); a
parameter several stages of this rank use (a tied table with both ends here) is final after
the last of them. Buckets whose parameters are all final start their asynchronous
all-reduce, or with ``shard=True`` reduce-scatter, over the group, strictly in bucket order
so every rank of the group issues the same collectives in the same order. :meth:`finish`
starts whatever is left (everything, without overlap) and waits; a group of one rank
launches nothing, so dp = 1 runs the same code.

Parameters given as ``hold_back`` (pipeline-duplicated tied embeddings) sit in their own
last buckets and are reduced only in :meth:`finish`, after the caller's ``before_held``
callback has summed them across stages: with a sharded buffer the stage copies must be
summed while they are whole.

With ``shard=True`` group rank r owns the r-th 1/size chunk of every bucket (the distributed
optimizer updates it, then :meth:`all_gather_params` shares the result); after
:meth:`finish` only the owned chunks hold the averaged gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megalite.parallel import comm
from megalite.parallel.state import ParallelState

DEFAULT_BUCKET_BYTES = 25 * 2**20

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class ReductionGroup:
    """The ranks a buffer's gradients are reduced over, and the factor applied to the sum."""
    name: str               # "dp_cp" (dense) or "expert_dp"
    group: object           # process group (None in one process)
    size: int
    rank: int
    ranks: list
    scale: float            # the summed gradient is multiplied by this (an average)


def dense_reduction(ps: ParallelState) -> ReductionGroup:
    """Dense parameters: averaged over data x context parallelism (the dp group when cp = 1)."""
    group = ps.dp_cp_group if ps.dp_cp_group is not None or ps.cp > 1 else ps.dp_group
    return ReductionGroup("dp_cp", group, ps.dp_cp, ps.dp_cp_rank, list(ps.dp_cp_ranks),
                          1.0 / ps.dp_cp)


def expert_reduction(ps: ParallelState) -> ReductionGroup:
    """Expert parameters: summed over expert-data parallelism (the stage's tp x cp x dp
    ranks / ep) and divided by the data x context size, as Megatron-Core does. This assumes
    every rank of a stage routes its own tokens (sequence parallelism under tp, which
    Megatron requires for MoE with tp > 1): an expert's gradient then gathers the tokens the
    expert-parallel ranks sent it, and the sum over expert-dp covers the whole batch of the
    stage, which is dp x cp micro-batches' worth. A dispatcher that sends the same tokens
    from every tp rank must divide by tp itself."""
    return ReductionGroup("expert_dp", ps.expert_dp_group, ps.expert_dp, ps.expert_dp_rank,
                          list(ps.expert_dp_ranks), 1.0 / ps.dp_cp)


@dataclass
class Bucket:
    params: list
    start: int              # [start, end) in the flat buffer, end - start a multiple of size
    end: int
    hooked: bool            # may start during backward (False: held back until finish)
    pending: int = 0        # parameters not yet final this step
    work: object = None     # the async collective in flight
    out: torch.Tensor | None = field(default=None, repr=False)  # reduce-scatter output


class GradBuffer:
    def __init__(self, stage_params: dict[int, list[torch.nn.Parameter]], ps: ParallelState,
                 *, shard: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 hold_back=(), reduction: ReductionGroup | None = None):
        self.ps, self.shard = ps, shard
        self.reduction = reduction or dense_reduction(ps)
        self.dp = self.reduction.size  # the group's size (the dp group's for dense params)
        unique, uses = {}, {}
        for stage in sorted(stage_params):
            for p in stage_params[stage]:
                if p.requires_grad:
                    unique.setdefault(id(p), p)
                    uses.setdefault(id(p), set()).add(stage)
        dtypes = {p.dtype for p in unique.values()}
        if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
            raise ValueError(f"a GradBuffer holds parameters of one floating dtype (fp32, bf16 "
                             f"or fp16); got {sorted(map(str, dtypes))}: build one per dtype "
                             f"(megalite.parallel.main_grads.MainGrads does)")
        self.param_dtype = dtypes.pop() if dtypes else torch.float32
        # fp32 parameters' .grad is the buffer view; 16-bit ones are added in by the hook
        self.in_place = self.param_dtype == torch.float32
        held = {id(p) for p in hold_back}
        order = list(reversed(list(unique.values())))
        self.params = order
        self._stages = {stage: {id(p) for p in ps_ if p.requires_grad}
                        for stage, ps_ in stage_params.items()}
        self._uses = {k: len(v) for k, v in uses.items()}
        self.buckets: list[Bucket] = []
        self.offset: dict[int, int] = {}
        offset = 0
        for group, hooked in (([p for p in order if id(p) not in held], True),
                              ([p for p in order if id(p) in held], False)):
            for params in _split(group, bucket_bytes // 4):
                size = sum(p.numel() for p in params)
                padded = -(-size // self.dp) * self.dp
                for p in params:
                    self.offset[id(p)] = offset
                    offset += p.numel()
                start = offset - size
                self.buckets.append(Bucket(params, start, start + padded, hooked))
                offset = start + padded
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        device = order[0].device if order else ps.device
        self.data = torch.zeros(offset, dtype=torch.float32, device=device)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in order]
        self._final_stage = None
        self.zero_grad()

    # ------------------------------------------------------------------ layout
    def grad_view(self, p) -> torch.Tensor:
        """``p``'s main gradient (fp32, shaped like ``p``) in the buffer."""
        o = self.offset[id(p)]
        return self.data[o:o + p.numel()].view(p.shape)

    def owned_range(self, p) -> tuple[int, int]:
        """[lo, hi) of ``p.view(-1)`` this group rank owns (empty when lo == hi)."""
        b, o = self._bucket_of[id(p)], self.offset[id(p)]
        chunk = (b.end - b.start) // self.dp
        lo = b.start + self.reduction.rank * chunk
        a, z = max(o, lo), min(o + p.numel(), lo + chunk)
        a = min(max(a - o, 0), p.numel())
        return a, max(a, z - o)

    def __contains__(self, p) -> bool:
        return id(p) in self.offset

    def reduced_regions(self) -> list[torch.Tensor]:
        """The parts of the buffer holding this rank's reduced gradient after :meth:`finish`:
        whole buckets, or with ``shard=True`` the owned chunks (padding included, zero)."""
        return [self.owned(b) if self.shard else self.data[b.start:b.end]
                for b in self.buckets]

    # ------------------------------------------------------------------ one step
    def zero_grad(self) -> None:
        """Zero every gradient for a new step (and re-point any ``.grad`` replaced since)."""
        self.data.zero_()
        for p in self.params:
            if not self.in_place:
                p.grad = None
                continue
            view = self.grad_view(p)
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view
        self._final_hits = dict.fromkeys(self._uses, 0)
        for b in self.buckets:
            b.pending, b.work, b.out = len(b.params), None, None
        self._next = 0

    @contextlib.contextmanager
    def final_backward(self, stage: int):
        """Around ``stage``'s last B or W of the step: its gradients become final."""
        self._final_stage = stage
        try:
            yield
        finally:
            self._final_stage = None

    def _on_grad(self, p) -> None:
        if not self.in_place:  # 16-bit gradient: accumulate it in fp32 and free it
            self.grad_view(p).add_(p.grad)
            p.grad = None
        stage = self._final_stage
        if stage is None or id(p) not in self._stages.get(stage, ()):
            return  # not the last microbatch: keep accumulating
        self._final_hits[id(p)] += 1
        if self._final_hits[id(p)] > self._uses[id(p)]:  # its bucket may be reducing already
            raise RuntimeError(
                f"a parameter of shape {tuple(p.shape)} received two gradient accumulations in "
                f"stage {stage}'s last backward action, so overlapped reduction cannot tell "
                f"when it is final: train with overlap_grad_reduce=False "
                f"(--no-overlap-grad-reduce), or run one backward per stage action")
        if self._final_hits[id(p)] == self._uses[id(p)]:
            self._bucket_of[id(p)].pending -= 1
            while (self._next < len(self.buckets) and self.buckets[self._next].hooked
                   and self.buckets[self._next].pending == 0):
                self._launch(self.buckets[self._next])
                self._next += 1

    def _launch(self, b: Bucket) -> None:
        if self.dp == 1:
            return
        flat, group = self.data[b.start:b.end], self.reduction.group
        if self.shard:
            b.out = torch.empty((b.end - b.start) // self.dp, dtype=flat.dtype,
                                device=flat.device)
            b.work = comm._run("reduce_scatter", flat, group, lambda: _reduce_scatter(
                b.out, flat, group=group, async_op=True))
        else:
            b.work = comm._run("all_reduce", flat, group,
                               lambda: dist.all_reduce(flat, group=group, async_op=True))

    def finish(self, before_held: Callable[[torch.Tensor], None] | None = None) -> None:
        """Start the buckets not started yet, wait for all, apply the group's average.
        ``before_held(flat)`` (e.g. the tied-embedding sum across stages) runs on the
        held-back buckets' slice of the buffer before their reduction."""
        for p in self.params:
            if self.in_place and (p.grad is None
                                  or p.grad.data_ptr() != self.grad_view(p).data_ptr()):
                raise RuntimeError("a parameter's .grad no longer points into the gradient "
                                   "buffer: zero gradients with the optimizer's zero_grad() "
                                   "(or GradBuffer.zero_grad), not by setting them to None")
            if not self.in_place and p.grad is not None:
                raise RuntimeError("a 16-bit parameter holds a .grad the gradient buffer did "
                                   "not take (its hooks were removed?): rebuild the buffer")
        for i in range(self._next, len(self.buckets)):
            b = self.buckets[i]
            if not b.hooked and before_held is not None:
                before_held(self.data[b.start:self.buckets[-1].end])
                before_held = None
            self._launch(b)
        self._next = len(self.buckets)
        for b in self.buckets:
            if b.work is not None:
                try:
                    b.work.wait()
                except RuntimeError as e:
                    raise RuntimeError(f"rank {self.ps.rank}: {self.reduction.name} gradient "
                                       f"reduction over ranks {self.reduction.ranks} failed: "
                                       f"{e}") from e
                b.work = None
            target = self.owned(b) if self.shard and self.dp > 1 else self.data[b.start:b.end]
            if b.out is not None:
                target.copy_(b.out)
                b.out = None
            if self.reduction.scale != 1.0:
                target.mul_(self.reduction.scale)

    def owned(self, b: Bucket) -> torch.Tensor:
        chunk = (b.end - b.start) // self.dp
        lo = b.start + self.reduction.rank * chunk
        return self.data[lo:lo + chunk]

    # ------------------------------------------------------------------ sharded parameters
    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Every group rank updated its owned chunk of the parameters: share them
        (shard=True); the gather moves the parameters' own dtype (2 bytes for bf16). Unsharded,
        every rank updated every parameter alike: nothing to share."""
        if self.dp == 1 or not self.shard:
            return
        for b in self.buckets:
            flat = torch.zeros(b.end - b.start, dtype=self.param_dtype, device=self.data.device)
            chunk = flat.numel() // self.dp
            mine = flat[self.reduction.rank * chunk:(self.reduction.rank + 1) * chunk]
            for p in b.params:
                lo, hi = self.owned_range(p)
                if hi > lo:
                    at = self.offset[id(p)] - b.start
                    flat[at + lo:at + hi] = p.detach().reshape(-1)[lo:hi]
            full = torch.empty_like(flat)
            comm._run("all_gather", full, self.reduction.group, lambda: _all_gather(
                full, mine, group=self.reduction.group))
            for p in b.params:
                at = self.offset[id(p)] - b.start
                p.view(-1).copy_(full[at:at + p.numel()])

    def gather_dp(self, p, local: torch.Tensor) -> torch.Tensor:
        """The whole ``p``-shaped tensor whose owned range each group rank holds as ``local``
        (collective over the group; zeros elsewhere, summed, so exact)."""
        lo, hi = self.owned_range(p)
        full = torch.zeros(p.numel(), dtype=local.dtype, device=local.device)
        full[lo:hi] = local.reshape(-1)
        if self.dp == 1:
            return full.view(p.shape)
        return comm.all_reduce(full, self.reduction.group).view(p.shape)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _split(params: list, bucket_elems: int):
    """Consecutive groups of about ``bucket_elems`` elements (a larger parameter alone)."""
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() > bucket_elems:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket
