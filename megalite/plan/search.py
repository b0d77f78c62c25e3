"""Enumerate the layouts of a model on N GPUs, keep those that fit, rank them by step time.

Every candidate is a :class:`Layout`: tp (dividing the heads and kv heads, at most a node),
cp (powers of two leaving each rank at least ``MIN_CP_TOKENS`` of a sequence; ring and
all-to-all), pp (dividing the rest, at most one stage per layer), the schedule (1F1B, and
interleaved 1F1B with 2 or 4 stages per rank), dp = N / (tp cp pp), a micro-batch size
dividing the batch, a recompute mode, the sharding when dp x cp > 1 (none, the distributed
optimizer, or FSDP) and, for MoE models, ep (the divisors of the experts that divide tp x cp
x dp). Any of cp, cp_comm, ep, fsdp given as an option is fixed instead of searched.
Sequence parallelism is on whenever tp > 1 (it only saves memory). A layout is *invalid*
(it cannot run: the reason comes from :func:`layout.invalid_reason`) or *does not fit*
(the reason names the rank and the part that is largest), else it is ranked: first by the
closed-form pipeline time, then the best few are re-timed with the schedule simulator.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from megalite.models.config import GPTConfig

from megalite.plan.gpus import GPU
from megalite.plan.layout import Layout, invalid_reason
from megalite.plan.memory import MemoryBreakdown, memory
from megalite.plan.speed import StepTime, step_time

GIB = 2**30
MIN_CP_TOKENS = 2048   # cp only while each rank keeps at least this much of a sequence


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
            (" + weight casts" if worst.weight_casts else "") + \
            (" + FSDP working copies" if worst.fsdp_working else "")
        return (f"does not fit: {what} alone need {static / GIB:.1f} GiB on pipeline rank "
                f"{worst.pp_rank} (> {budget / GIB:.1f} GiB); largest: {worst.largest_part()} "
                f"{max(parts.values()) / GIB:.1f} GiB")
    return (f"does not fit: {worst.total / GIB:.1f} GiB on pipeline rank {worst.pp_rank} "
            f"(> {budget / GIB:.1f} GiB): activations {worst.activations / GIB:.1f} GiB "
            f"({sum(worst.live_microbatches.values())} live stage-microbatches) on top of "
            f"{static / GIB:.1f} GiB of parameters, gradients and optimizer state")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]


def _sharding(dp: int, cp: int, fsdp: bool | None) -> list[tuple[bool, bool]]:
    """(distributed_optimizer, fsdp) choices: none without dp x cp > 1; ``fsdp`` True/False
    fixes it."""
    if dp * cp == 1:
        return [(False, False)] if not fsdp else []
    out = [] if fsdp else [(False, False), (True, False)]
    if fsdp is not False:
        out.append((False, True))
    return out


def _grid(cfg: GPTConfig, gpus: int, seq_len: int, gpus_per_node: int, cp, ep):
    """(tp, cp, pp, dp, ep choices) of ``gpus`` ranks."""
    for tp in _divisors(min(gpus, gpus_per_node)):
        if gpus % tp:
            continue
        cps = [cp] if cp else [c for c in _powers_of_two(gpus // tp)
                               if c == 1 or seq_len // c >= MIN_CP_TOKENS]
        for c in (c for c in cps if (gpus // tp) % c == 0):
            for pp in _divisors(gpus // (tp * c)):
                if pp > cfg.n_layers:
                    continue
                dp = gpus // (tp * c * pp)
                eps = [ep] if ep else [1] if not cfg.moe_num_experts else \
                    [e for e in _divisors(tp * c * dp) if cfg.moe_num_experts % e == 0]
                yield tp, c, pp, dp, eps


def candidate_layouts(cfg: GPTConfig, gpus: int, seq_len: int, global_batch_size: int,
                      gpus_per_node: int = 8, micro_batch_sizes=(1, 2, 4, 8),
                      recompute=("none", "selective", "full"), virtual=(1, 2, 4),
                      cp: int | None = None, cp_comm: str | None = None,
                      ep: int | None = None, fsdp: bool | None = None,
                      **fixed) -> list[Layout]:
    out = []
    for tp, c, pp, dp, eps in _grid(cfg, gpus, seq_len, gpus_per_node, cp, ep):
        comms = [cp_comm or "ring"] if c == 1 or cp_comm else ["ring", "all-to-all"]
        for v, mbs, rec, comm, e in product(virtual if pp > 1 else (1,), micro_batch_sizes,
                                            recompute, comms, eps):
            schedule = "1f1b" if v == 1 else "interleaved-1f1b"
            for dist_opt, shard in _sharding(dp, c, fsdp):
                out.append(Layout(
                    tp=tp, pp=pp, dp=dp, cp=c, cp_comm=comm, ep=e, micro_batch_size=mbs,
                    seq_len=seq_len, global_batch_size=global_batch_size, schedule=schedule,
                    virtual_stages=v if v > 1 else None, sequence_parallel=tp > 1,
                    recompute=rec, distributed_optimizer=dist_opt, fsdp=shard, **fixed))
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
                              time=step_time(cfg, layout, gpu, simulate=False, mem=mem)))
    fits.sort(key=lambda c: (c.time.step, c.memory.total))
    head = fits[: simulate_top or max(3 * top, 20)]
    for c in head:  # the schedule simulator's bubble for the front runners
        c.time = step_time(cfg, c.layout, gpu, simulate=True, mem=c.memory)
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
