"""Contiguous gradient buckets, reduced over data parallelism while backward still runs.

Every parameter's ``.grad`` is a view into one flat fp32 buffer laid out in reverse
parameter order (roughly the order backward finishes them) and cut into buckets of about
25 MB, each padded to a multiple of dp. Because the views persist, gradients must be zeroed
with :meth:`GradBuffer.zero_grad`, never set to None.

Overlap: the pipeline executor enters :meth:`GradBuffer.final_backward` around each stage's
last gradient-producing action (``B`` or ``W``) of the step. During it every parameter of
that stage receives its last accumulation (a post-accumulate-grad hook counts it); a
parameter several stages of this rank use (a tied table with both ends here) is final after
the last of them. Buckets whose parameters are all final start their asynchronous
all-reduce, or with ``shard=True`` reduce-scatter, over the dp group, strictly in bucket
order so every dp rank issues the same collectives in the same order. :meth:`finish` starts
whatever is left (everything, without overlap) and waits.

Parameters given as ``hold_back`` (pipeline-duplicated tied embeddings) sit in their own
last buckets and are reduced only in :meth:`finish`, after the caller's ``before_held``
callback has summed them across stages: with a sharded buffer the stage copies must be
summed while they are whole.

With ``shard=True`` dp rank r owns the r-th 1/dp chunk of every bucket (the distributed
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
from megalite.parallel.grads import DEFAULT_BUCKET_BYTES
from megalite.parallel.state import ParallelState

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only those
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bucket:
    params: list
    start: int              # [start, end) in the flat buffer, end - start a multiple of dp
    end: int
    hooked: bool            # may start during backward (False: held back until finish)
    pending: int = 0        # parameters not yet final this step
    work: object = None     # the async collective in flight
    out: torch.Tensor | None = field(default=None, repr=False)  # reduce-scatter output


class GradBuffer:
    def __init__(self, stage_params: dict[int, list[torch.nn.Parameter]], ps: ParallelState,
                 *, shard: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 hold_back=()):
        self.ps, self.shard, self.dp = ps, shard, ps.dp
        unique, uses = {}, {}
        for stage in sorted(stage_params):
            for p in stage_params[stage]:
                if p.requires_grad:
                    unique.setdefault(id(p), p)
                    uses.setdefault(id(p), set()).add(stage)
        for p in unique.values():
            if p.dtype != torch.float32:
                raise ValueError(f"the gradient buffer holds fp32 parameters (megalite keeps "
                                 f"master weights fp32 and uses autocast); got {p.dtype}")
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
        self.data = torch.zeros(offset, dtype=torch.float32, device=ps.device)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in order]
        self._final_stage = None
        self.zero_grad()

    # ------------------------------------------------------------------ layout
    def grad_view(self, p) -> torch.Tensor:
        o = self.offset[id(p)]
        return self.data[o:o + p.numel()].view_as(p)

    def owned_range(self, p) -> tuple[int, int]:
        """[lo, hi) of ``p.view(-1)`` this dp rank owns (empty when lo == hi)."""
        b, o = self._bucket_of[id(p)], self.offset[id(p)]
        chunk = (b.end - b.start) // self.dp
        lo = b.start + self.ps.dp_rank * chunk
        a, z = max(o, lo), min(o + p.numel(), lo + chunk)
        a = min(max(a - o, 0), p.numel())
        return a, max(a, z - o)

    def __contains__(self, p) -> bool:
        return id(p) in self.offset

    # ------------------------------------------------------------------ one step
    def zero_grad(self) -> None:
        """Zero every gradient for a new step (and re-point any ``.grad`` replaced since)."""
        self.data.zero_()
        for p in self.params:
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
        flat, group = self.data[b.start:b.end], self.ps.dp_group
        if self.shard:
            b.out = torch.empty((b.end - b.start) // self.dp, dtype=flat.dtype,
                                device=flat.device)
            b.work = comm._run("reduce_scatter", flat, group, lambda: _reduce_scatter(
                b.out, flat, group=group, async_op=True))
        else:
            b.work = comm._run("all_reduce", flat, group,
                               lambda: dist.all_reduce(flat, group=group, async_op=True))

    def finish(self, before_held: Callable[[list], None] | None = None) -> None:
        """Start the buckets not started yet, wait for all, average over dp. ``before_held``
        (e.g. the tied-embedding sum) runs on the held-back parameters before their reduction."""
        for p in self.params:
            if p.grad is None or p.grad.data_ptr() != self.grad_view(p).data_ptr():
                raise RuntimeError("a parameter's .grad no longer points into the gradient "
                                   "buffer: zero gradients with the optimizer's zero_grad() "
                                   "(or GradBuffer.zero_grad), not by setting them to None")
        for i in range(self._next, len(self.buckets)):
            b = self.buckets[i]
            if not b.hooked and before_held is not None:
                before_held([p for b2 in self.buckets[i:] for p in b2.params])
                before_held = None
            self._launch(b)
        self._next = len(self.buckets)
        for b in self.buckets:
            if b.work is not None:
                try:
                    b.work.wait()
                except RuntimeError as e:
                    raise RuntimeError(f"rank {self.ps.rank}: data-parallel gradient "
                                       f"reduction over ranks {self.ps.dp_ranks} failed: {e}"
                                       ) from e
                b.work = None
            if self.dp > 1:
                target = self.owned(b) if self.shard else self.data[b.start:b.end]
                if b.out is not None:
                    target.copy_(b.out)
                    b.out = None
                target.mul_(1.0 / self.dp)

    def owned(self, b: Bucket) -> torch.Tensor:
        chunk = (b.end - b.start) // self.dp
        lo = b.start + self.ps.dp_rank * chunk
        return self.data[lo:lo + chunk]

    # ------------------------------------------------------------------ sharded parameters
    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Every dp rank updated its owned chunk of the parameters: share them (shard=True)."""
        if self.dp == 1:
            return
        for b in self.buckets:
            flat = torch.zeros(b.end - b.start, dtype=torch.float32, device=self.data.device)
            chunk = flat.numel() // self.dp
            mine = flat[self.ps.dp_rank * chunk:(self.ps.dp_rank + 1) * chunk]
            for p in b.params:
                lo, hi = self.owned_range(p)
                if hi > lo:
                    at = self.offset[id(p)] - b.start
                    flat[at + lo:at + hi] = p.detach().reshape(-1)[lo:hi]
            full = torch.empty_like(flat)
            comm._run("all_gather", full, self.ps.dp_group, lambda: _all_gather(
                full, mine, group=self.ps.dp_group))
            for p in b.params:
                at = self.offset[id(p)] - b.start
                p.view(-1).copy_(full[at:at + p.numel()])

    def gather_dp(self, p, local: torch.Tensor) -> torch.Tensor:
        """The whole ``p``-shaped tensor whose owned range each dp rank holds as ``local``
        (collective over dp; zeros elsewhere, summed, so exact)."""
        lo, hi = self.owned_range(p)
        full = torch.zeros(p.numel(), dtype=local.dtype, device=local.device)
        full[lo:hi] = local.reshape(-1)
        return comm.all_reduce(full, self.ps.dp_group).view_as(p)

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
