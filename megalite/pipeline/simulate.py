"""Simulate a schedule's timing and memory without starting processes.

Every rank runs its action list in order; an action starts when the rank is free and, if it
consumes a neighbour's output, once that output has arrived (producer's end + comm cost;
free between stages on one rank). Costs are abstract time units: scalars, or one value per
stage. A full backward B costs I + W unless b_cost says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from megalite.pipeline.actions import Action, Schedule, stage_to_rank
from megalite.pipeline.validate import replay, validate_schedule

Cost = Union[float, Sequence[float]]


@dataclass
class SimResult:
    """What `simulate_schedule` returns.

    timeline[rank]:  [(start, end, "0F3"), ...] in execution order
    makespan:        end of the last action on any rank (every rank starts at 0)
    bubble[rank]:    idle fraction of that rank, idle / makespan
    bubble_total:    total idle / (ranks * makespan)
    peak_live[rank]: most stage-microbatches whose activations the rank holds at once (from
                     F until B, or until W for a split backward), in list order
    peak_live_units[rank]: the same in units of the rank's whole share of the model (a stage
                     of a rank that owns v stages counts 1/v), comparable across v
    """

    timeline: dict[int, list[tuple[float, float, str]]]
    makespan: float
    bubble: dict[int, float]
    bubble_total: float
    peak_live: dict[int, int]
    peak_live_units: dict[int, float] = field(default_factory=dict)
    busy: dict[int, float] = field(default_factory=dict)

    def spans(self) -> list[tuple[int, str, str, float, float]]:
        """(rank, name, kind, start, end) tuples for megalite.pipeline.timeline."""
        return [(r, name, Action.parse(name).kind, t0, t1)
                for r, items in self.timeline.items() for t0, t1, name in items]


def _per_stage(name: str, cost: Cost, num_stages: int) -> list[float]:
    if isinstance(cost, (int, float)):
        values = [float(cost)] * num_stages
    else:
        values = [float(c) for c in cost]
        if len(values) != num_stages:
            raise ValueError(f"{name} has {len(values)} entries but there are {num_stages} "
                             "stages; give one cost per stage or a single number")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {cost!r}")
    return values


def simulate_schedule(schedule: Schedule, num_stages: int | None = None,
                      num_microbatches: int | None = None, f_cost: Cost = 1.0,
                      b_cost: Cost | None = None, w_cost: Cost = 1.0, comm_cost: Cost = 0.0,
                      stage_to_rank: Mapping[int, int] | None = None,
                      i_cost: Cost = 1.0) -> SimResult:
    """Validate `schedule`, then time it.

    f_cost, i_cost, w_cost: compute time of F, I (backward to the input) and W (weight
    gradients) per stage; a full backward B costs i_cost + w_cost, or b_cost when given.
    comm_cost: time for a stage's output (activation or gradient) to reach the neighbouring
    rank; comm_cost[s] is charged to what stage s sends. Free between stages on one rank.
    """
    parsed = validate_schedule(schedule, num_stages, num_microbatches, stage_to_rank)
    num_stages = 1 + max(a.stage for lst in parsed.values() for a in lst)
    f = _per_stage("f_cost", f_cost, num_stages)
    i = _per_stage("i_cost", i_cost, num_stages)
    w = _per_stage("w_cost", w_cost, num_stages)
    b = [x + y for x, y in zip(i, w)] if b_cost is None else _per_stage("b_cost", b_cost, num_stages)
    costs = {"F": f, "B": b, "I": i, "W": w}
    comm = _per_stage("comm_cost", comm_cost, num_stages)
    timeline, stuck = replay(parsed, num_stages, duration=lambda a: costs[a.kind][a.stage],
                             comm=lambda a: comm[a.stage])
    assert not stuck, "validate_schedule lets no deadlocking schedule through"

    makespan = max((t1 for items in timeline.values() for _, t1, _ in items), default=0.0)
    busy = {r: sum(t1 - t0 for t0, t1, _ in items) for r, items in timeline.items()}
    idle = {r: makespan - b for r, b in busy.items()}
    denom = makespan if makespan > 0 else 1.0  # all-zero costs: no time, no bubble
    peak = {r: peak_live_activations(lst) for r, lst in parsed.items()}
    return SimResult(
        timeline={r: [(t0, t1, str(a)) for t0, t1, a in items] for r, items in timeline.items()},
        makespan=makespan,
        bubble={r: idle[r] / denom for r in idle},
        bubble_total=sum(idle.values()) / (len(idle) * denom),
        peak_live=peak,
        peak_live_units={r: peak[r] / max(1, len({a.stage for a in parsed[r]})) for r in parsed},
        busy=busy,
    )


def peak_live_activations(actions: Sequence[Union[str, Action]]) -> int:
    """Most stage-microbatches forwarded but not yet fully backwarded at once in one rank's
    list: a stage's activations are kept from its F until its B, or until its W when the
    backward is split (W still needs the layer inputs). Counted in list order, so it is
    independent of costs."""
    live = peak = 0
    for a in actions:
        kind = Action.parse(a).kind
        live += {"F": 1, "B": -1, "W": -1}.get(kind, 0)
        peak = max(peak, live)
    return peak


def published_bubble(name: str, p: int, m: int, v: int, f: float, i: float, w: float):
    """The bubble fraction the literature gives for a schedule (None where it gives none):
    1F1B and GPipe (p-1)/(m+p-1) and interleaved (p-1)/(vm+p-1) for F = B (Narayanan et al.
    2021); ZB-H1's bubble time (p-1)(T_F + T_I - T_W) (Qi et al. 2024, table 1)."""
    b = i + w
    if name in ("1f1b", "gpipe") and v == 1:
        return (p - 1) * (f + b) / (m * (f + b) + (p - 1) * (f + b))
    if name == "interleaved-1f1b":
        return (p - 1) * (f + b) / (v * m * (f + b) + (p - 1) * (f + b))
    if name == "zb-h1":
        bubble = (p - 1) * max(0.0, f + i - w)
        return bubble / (m * (f + b) + bubble)
    return None


def compare(p: int, m: int, costs: tuple[float, float, float], names=None, png_dir=None):
    """Markdown table (and PNG grids) of every schedule at p, m and per-rank costs
    (F, I, W) of one microbatch through a whole rank's layers (a stage of a rank holding v
    stages costs 1/v of it)."""
    from .schedules import SCHEDULE_NAMES, build_schedule, schedule_info
    from .timeline import plot_timeline

    f, i, w = costs
    lines = ["| schedule | v | makespan | bubble | published | peak live per rank "
             "(stage-microbatches) | peak in rank-microbatches |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name in names or SCHEDULE_NAMES:
        _, v = schedule_info(name)
        if name.startswith("interleaved") and m % p:
            continue
        r = simulate_schedule(build_schedule(name, p, m, v), f_cost=f / v, i_cost=i / v,
                              w_cost=w / v)
        pub = published_bubble(name, p, m, v, f, i, w)
        live = " / ".join(str(r.peak_live[k]) for k in sorted(r.peak_live))
        lines.append(f"| {name} | {v} | {r.makespan:g} | {r.bubble_total:.3f} | "
                     f"{'-' if pub is None else f'{pub:.3f}'} | {live} | "
                     f"{max(r.peak_live_units.values()):g} |")
        if png_dir:
            tag = f"{f:g}-{i:g}-{w:g}".replace(".", "_")
            plot_timeline(r.spans(), f"{png_dir}/sim_{name}_p{p}_m{m}_{tag}.png",
                          title=f"{name} p={p} m={m} (F:I:W = {f:g}:{i:g}:{w:g}): "
                                f"bubble {r.bubble_total:.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """`python -m megalite.pipeline.simulate --schedule zbv -p 4 -m 8 --png out.png`;
    `--all` prints every schedule side by side."""
    import argparse

    from .schedules import SCHEDULE_NAMES, build_schedule, format_schedule, load_schedule
    from .timeline import plot_timeline, write_chrome_trace

    ap = argparse.ArgumentParser(description="Print, validate and simulate a pipeline schedule.")
    ap.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b")
    ap.add_argument("--schedule-file", help="simulate this table (CSV or JSON) instead")
    ap.add_argument("--virtual-stages", type=int, default=None)
    ap.add_argument("-p", "--stages", type=int, default=4, help="pipeline ranks")
    ap.add_argument("-m", "--microbatches", type=int, default=8)
    ap.add_argument("--f-cost", type=float, default=1.0, help="per microbatch through a "
                    "whole rank's layers; a stage of v per rank costs 1/v")
    ap.add_argument("--i-cost", type=float, default=1.0)
    ap.add_argument("--w-cost", type=float, default=1.0)
    ap.add_argument("--comm-cost", type=float, default=0.0)
    ap.add_argument("--all", action="store_true",
                    help="table of every schedule (default virtual stages, no comm cost)")
    ap.add_argument("--png", help="write a timeline plot here (with --all: a directory)")
    ap.add_argument("--trace", help="write a Chrome-trace JSON here (open in ui.perfetto.dev)")
    args = ap.parse_args(argv)

    p, m = args.stages, args.microbatches
    costs = (args.f_cost, args.i_cost, args.w_cost)
    if args.all:
        print(compare(p, m, costs, png_dir=args.png))
        return
    if args.schedule_file:
        schedule, label = load_schedule(args.schedule_file), args.schedule_file
    else:
        schedule, label = build_schedule(args.schedule, p, m, args.virtual_stages), args.schedule
    v = max(1, len(stage_to_rank(schedule)) // len(schedule))
    print(format_schedule(schedule))
    r = simulate_schedule(schedule, f_cost=args.f_cost / v, i_cost=args.i_cost / v,
                          w_cost=args.w_cost / v, comm_cost=args.comm_cost)
    print(f"\nmakespan {r.makespan:g}  bubble {r.bubble_total:.3f}")
    for rank in sorted(r.timeline):
        print(f"rank {rank}: bubble {r.bubble[rank]:.3f}  peak live activations {r.peak_live[rank]}")
    m = 1 + max(Action.parse(a).microbatch for row in schedule.values() for a in row)
    title = f"{label} p={len(schedule)} m={m} (F:I:W = {args.f_cost:g}:{args.i_cost:g}:" \
            f"{args.w_cost:g}, comm={args.comm_cost:g}): bubble {r.bubble_total:.1%}"
    if args.png:
        plot_timeline(r.spans(), args.png, title=title)
    if args.trace:
        write_chrome_trace(r.spans(), args.trace)


if __name__ == "__main__":
    main()
