"""Enumerate the layouts of a model on N GPUs, keep those that fit, rank them by step time.

Every candidate is a :class:`Layout`: tp (dividing the heads and kv heads, at most a node),
pp (dividing the rest, at most one stage per layer), the schedule (1F1B, and interleaved
1F1B with 2 or 4 stages per rank), dp = N / (tp pp), a micro-batch size dividing the batch,
a recompute mode, and the distributed optimizer when dp > 1. Sequence parallelism is on
whenever tp > 1 (it only saves memory). A layout is *invalid* (it cannot run: the reason
comes from :func:`layout.invalid_reason`) or *does not fit* (the reason names the rank and
the part that is largest), else it is ranked: first by the closed-form pipeline time, then
the best few are re-timed with the schedule simulator.
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.models.config import GPTConfig

from megalite.plan.gpus import GPU
from megalite.plan.layout import Layout, invalid_reason
from megalite.plan.memory import MemoryBreakdown, memory
from megalite.plan.speed import StepTime, step_time

GIB = 2**30


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown | None = None
    time: StepTime | None = None
    rejected: str | None = None      # why it cannot run, or does not fit


def fit_reason(mem: MemoryBreakdown, budget: float) -> str | None:
    """None when every rank fits in ``budget`` bytes, else which rank and part is over."""
    worst = mem.worst
    if worst.total <= budget:
        return None
    parts = worst.parts()
    static = worst.static
    if static > budget:
        what = "parameters + gradients + optimizer state" + \
            (" + weight casts" if worst.weight_casts else "")
        return (f"does not fit: {what} alone need {static / GIB:.1f} GiB on pipeline rank "
                f"{worst.pp_rank} (> {budget / GIB:.1f} GiB); largest: {worst.largest_part()} "
                f"{max(parts.values()) / GIB:.1f} GiB")
    return (f"does not fit: {worst.total / GIB:.1f} GiB on pipeline rank {worst.pp_rank} "
            f"(> {budget / GIB:.1f} GiB): activations {worst.activations / GIB:.1f} GiB "
            f"({sum(worst.live_microbatches.values())} live stage-microbatches) on top of "
            f"{static / GIB:.1f} GiB of parameters, gradients and optimizer state")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: GPTConfig, gpus: int, seq_len: int, global_batch_size: int,
                      gpus_per_node: int = 8, micro_batch_sizes=(1, 2, 4, 8),
                      recompute=("none", "selective", "full"), virtual=(1, 2, 4),
                      **fixed) -> list[Layout]:
    out = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        if gpus % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.n_layers:
                continue
            dp = gpus // (tp * pp)
            for v in virtual if pp > 1 else (1,):
                schedule = "1f1b" if v == 1 else "interleaved-1f1b"
                for mbs in micro_batch_sizes:
                    for rec in recompute:
                        for dist_opt in ((False, True) if dp > 1 else (False,)):
                            out.append(Layout(
                                tp=tp, pp=pp, dp=dp, micro_batch_size=mbs, seq_len=seq_len,
                                global_batch_size=global_batch_size, schedule=schedule,
                                virtual_stages=v if v > 1 else None,
                                sequence_parallel=tp > 1, recompute=rec,
                                distributed_optimizer=dist_opt, **fixed))
    return out


def search(cfg: GPTConfig, gpus: int, gpu: GPU, seq_len: int, global_batch_size: int,
           memory_budget: float | None = None, top: int = 10, simulate_top: int | None = None,
           **options) -> tuple[list[Candidate], list[Candidate]]:
    """(ranked layouts that fit, fastest first; rejected layouts with their reasons)."""
    budget = gpu.memory if memory_budget is None else memory_budget
    fits, rejected = [], []
    for layout in candidate_layouts(cfg, gpus, seq_len, global_batch_size,
                                    gpus_per_node=gpu.gpus_per_node, **options):
        reason = invalid_reason(cfg, layout)
        if reason:
            rejected.append(Candidate(layout, rejected=f"invalid: {reason}"))
            continue
        mem = memory(cfg, layout)
        reason = fit_reason(mem, budget)
        if reason:
            rejected.append(Candidate(layout, memory=mem, rejected=reason))
            continue
        fits.append(Candidate(layout, memory=mem,
                              time=step_time(cfg, layout, gpu, simulate=False)))
    fits.sort(key=lambda c: (c.time.step, c.memory.total))
    head = fits[: simulate_top or max(3 * top, 20)]
    for c in head:  # the schedule simulator's bubble for the front runners
        c.time = step_time(cfg, c.layout, gpu, simulate=True)
    head.sort(key=lambda c: (c.time.step, c.memory.total))
    return head + fits[len(head):], rejected


def format_table(cands: list[Candidate], top: int) -> str:
    lines = ["| # | layout | step (s) | tokens/s | MFU | bubble | memory/rank (GiB) | largest part |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for i, c in enumerate(cands[:top], 1):
        w = c.memory.worst
        lines.append(f"| {i} | {c.layout.describe()} | {c.time.step:.3f} | "
                     f"{c.time.tokens_per_second:,.0f} | {c.time.mfu:.1%} | "
                     f"{c.time.bubble:.1%} | {w.total / GIB:.1f} | {w.largest_part()} "
                     f"{max(w.parts().values()) / GIB:.1f} |")
    return "\n".join(lines)


__all__ = ["Candidate", "candidate_layouts", "fit_reason", "format_table", "search"]
