"""Simulate a schedule's timing and memory without starting processes.

Every rank runs its action list in order; an action starts when the rank is free and, if it
consumes a neighbour's output, once that output has arrived (producer's end + comm cost;
free between stages on one rank). Costs are abstract time units: scalars, or one value per
stage. A full backward B costs I + W unless b_cost says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from megalite.pipeline.actions import Action, Schedule
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


def main(argv=None) -> None:
    """`python -m megalite.pipeline.simulate --schedule 1f1b -p 4 -m 8 --png out.png`"""
    import argparse

    from .schedules import SCHEDULE_NAMES, build_schedule, format_schedule
    from .timeline import plot_timeline, write_chrome_trace

    ap = argparse.ArgumentParser(description="Print, validate and simulate a pipeline schedule.")
    ap.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b")
    ap.add_argument("-p", "--stages", type=int, default=4)
    ap.add_argument("-m", "--microbatches", type=int, default=8)
    ap.add_argument("--f-cost", type=float, default=1.0)
    ap.add_argument("--b-cost", type=float, default=2.0)
    ap.add_argument("--comm-cost", type=float, default=0.0)
    ap.add_argument("--png", help="write a timeline plot here")
    ap.add_argument("--trace", help="write a Chrome-trace JSON here (open in ui.perfetto.dev)")
    args = ap.parse_args(argv)

    p, m = args.stages, args.microbatches
    schedule = build_schedule(args.schedule, p, m)
    print(format_schedule(schedule))
    r = simulate_schedule(schedule, p, m, args.f_cost, args.b_cost, comm_cost=args.comm_cost)
    print(f"\nmakespan {r.makespan:g}  bubble {r.bubble_total:.3f} "
          f"((p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f} with equal stage costs, no comm)")
    for rank in sorted(r.timeline):
        print(f"rank {rank}: bubble {r.bubble[rank]:.3f}  peak live activations {r.peak_live[rank]}")
    title = f"{args.schedule} p={p} m={m} (F={args.f_cost:g}, B={args.b_cost:g}, " \
            f"comm={args.comm_cost:g}): bubble {r.bubble_total:.1%}"
    if args.png:
        plot_timeline(r.spans(), args.png, title=title)
    if args.trace:
        write_chrome_trace(r.spans(), args.trace)


if __name__ == "__main__":
    main()
