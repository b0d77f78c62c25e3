"""Simulate a schedule's timing and memory without starting processes.

Every rank runs its action list in order; an action starts when the rank is free and, if it
consumes a neighbour's output, once that output has arrived (producer's end + comm cost).
Costs are abstract time units: scalars, or one value per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from .schedules import Action, Schedule, _replay, validate_schedule

Cost = Union[float, Sequence[float]]


@dataclass
class SimResult:
    """What `simulate_schedule` returns.

    timeline[rank]: [(start, end, "0F3"), ...] in execution order
    makespan:       end of the last action on any rank (every rank starts at 0)
    bubble[rank]:   idle fraction of that rank, idle / makespan
    bubble_total:   total idle / (ranks * makespan)
    peak_live[rank]: most microbatches forwarded but not yet backwarded at once on that
                    rank, i.e. how many stashed activations it must hold
    """

    timeline: dict[int, list[tuple[float, float, str]]]
    makespan: float
    bubble: dict[int, float]
    bubble_total: float
    peak_live: dict[int, int]
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


def simulate_schedule(schedule: Schedule, num_stages: int, num_microbatches: int,
                      f_cost: Cost = 1.0, b_cost: Cost = 2.0, w_cost: Cost | None = None,
                      comm_cost: Cost = 0.0,
                      stage_to_rank: Mapping[int, int] | None = None) -> SimResult:
    """Validate `schedule`, then time it.

    f_cost, b_cost, w_cost: compute time of F, B, W per stage. When a schedule splits the
    backward into B + W, b_cost is its input-gradient half; w_cost defaults to f_cost.
    comm_cost: time for a stage's output (activation or gradient) to reach the neighbouring
    rank; comm_cost[s] is charged to what stage s sends. Free between stages on one rank.
    """
    parsed = validate_schedule(schedule, num_stages, num_microbatches, stage_to_rank)
    costs = {
        "F": _per_stage("f_cost", f_cost, num_stages),
        "B": _per_stage("b_cost", b_cost, num_stages),
        "W": _per_stage("w_cost", f_cost if w_cost is None else w_cost, num_stages),
    }
    comm = _per_stage("comm_cost", comm_cost, num_stages)
    timeline, stuck = _replay(parsed, num_stages,
                              duration=lambda a: costs[a.kind][a.stage],
                              comm=lambda a: comm[a.stage])
    assert not stuck, "validate_schedule lets no deadlocking schedule through"

    makespan = max((t1 for items in timeline.values() for _, t1, _ in items), default=0.0)
    busy = {r: sum(t1 - t0 for t0, t1, _ in items) for r, items in timeline.items()}
    idle = {r: makespan - b for r, b in busy.items()}
    denom = makespan if makespan > 0 else 1.0  # all-zero costs: no time, no bubble
    return SimResult(
        timeline={r: [(t0, t1, str(a)) for t0, t1, a in items] for r, items in timeline.items()},
        makespan=makespan,
        bubble={r: idle[r] / denom for r in idle},
        bubble_total=sum(idle.values()) / (len(idle) * denom),
        peak_live={r: peak_live_activations(lst) for r, lst in parsed.items()},
        busy=busy,
    )


def peak_live_activations(actions: Sequence[Union[str, Action]]) -> int:
    """Most microbatches forwarded but not yet backwarded at once in one rank's list.

    Counted in list order, so it is independent of costs: the activation stash of a
    microbatch is kept from its F until its B (W needs only small saved inputs and is
    not counted).
    """
    live = peak = 0
    for a in actions:
        kind = Action.parse(a).kind
        live += {"F": 1, "B": -1}.get(kind, 0)
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
