"""Check any schedule without starting processes: `validate_schedule`, and the replay that
the validator, the printer and the simulator share.

Replay model: every rank runs its list in order; an action that consumes another stage's
output (an activation for F, an input gradient for B/I) waits until that output exists,
plus a transfer cost when it comes from another rank. Sends never block: the executor posts
them asynchronously and receives messages in the order each peer sends them (buffering the
ones it does not need yet), so a list is runnable exactly when this replay finishes. A rank
that waits for an output nobody will produce is a deadlock, reported rank by rank.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from megalite.pipeline.actions import Action, Schedule, parse_action, stage_to_rank as _owners


def check_sizes(num_stages: int, num_microbatches: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(
            f"num_microbatches must be an int >= 1, got {num_microbatches!r} "
            "(global batch / (micro batch * dp) must be at least 1)"
        )


def consumes(a: Action, num_stages: int) -> tuple[str, int, int] | None:
    """The message `a` needs from a neighbouring stage: ("act", s-1, mb) for F on s > 0,
    ("grad", s+1, mb) for B/I on s < last; None for the rest."""
    if a.kind == "F" and a.stage > 0:
        return ("act", a.stage - 1, a.microbatch)
    if a.kind in "BI" and a.stage < num_stages - 1:
        return ("grad", a.stage + 1, a.microbatch)
    return None


def produces(a: Action, num_stages: int) -> tuple[str, int, int] | None:
    """The message `a` hands to a neighbouring stage (the mirror of `consumes`)."""
    if a.kind == "F" and a.stage < num_stages - 1:
        return ("act", a.stage, a.microbatch)
    if a.kind in "BI" and a.stage > 0:
        return ("grad", a.stage, a.microbatch)
    return None


def replay(actions: Mapping[int, Sequence[Action]], num_stages: int,
           duration: Callable[[Action], float], comm: Callable[[Action], float]):
    """Return (timeline, stuck).

    timeline: {rank: [(start, end, action), ...]} for the actions that could run;
    stuck: {rank: (index, action, missing message)} for ranks that never finished.
    Start times depend only on finish times already known, so the order in which ranks are
    visited does not change the result. comm(a) is the transfer time of what `a` produced.
    """
    pos = {r: 0 for r in actions}
    free = {r: 0.0 for r in actions}
    ready: dict[tuple, tuple] = {}  # message -> (end time, producing action, its rank)
    timeline = {r: [] for r in actions}
    progress = True
    while progress:
        progress = False
        for r, lst in actions.items():
            while pos[r] < len(lst):
                a = lst[pos[r]]
                start = free[r]
                need = consumes(a, num_stages)
                if need is not None:
                    if need not in ready:
                        break
                    at, producer, src_rank = ready[need]
                    start = max(start, at + (comm(producer) if src_rank != r else 0.0))
                end = start + duration(a)
                timeline[r].append((start, end, a))
                out = produces(a, num_stages)
                if out is not None:
                    ready[out] = (end, a, r)
                free[r] = end
                pos[r] += 1
                progress = True
    stuck = {r: (pos[r], lst[pos[r]], consumes(lst[pos[r]], num_stages))
             for r, lst in actions.items() if pos[r] < len(lst)}
    return timeline, stuck


def validate_schedule(schedule: Schedule, num_stages: int | None = None,
                      num_microbatches: int | None = None,
                      stage_to_rank: Mapping[int, int] | None = None,
                      forward_only: bool = False) -> dict[int, list[Action]]:
    """Check that `schedule` is a runnable pipeline schedule; raise ValueError if not.

    Each error names the rank, the action and the reason. Checks, in order: ranks and stage
    ownership (`stage_to_rank` defaults to what the lists say), action syntax and ranges;
    per stage and microbatch one F, then either one B or one I followed by one W (never
    both), nothing missing or repeated; and no deadlock when the point-to-point transfers
    are replayed (which also catches an F listed before its input exists on the same rank).
    ``forward_only``: a schedule of F actions only (evaluation), every F once.
    num_stages and num_microbatches default to what the schedule uses.
    Returns the parsed schedule {rank: [Action, ...]}.
    """
    parsed: dict[int, list[Action]] = {}
    for r in sorted(schedule):
        parsed[r] = []
        for i, text in enumerate(schedule[r]):
            try:
                a = parse_action(text)
            except ValueError as e:
                raise ValueError(f"rank {r}, action {i}: {e}") from None
            where = f"rank {r}, action {i} ({a})"
            if num_stages is not None and a.stage >= num_stages:
                raise ValueError(f"{where}: stage {a.stage} does not exist (num_stages={num_stages})")
            if num_microbatches is not None and a.microbatch >= num_microbatches:
                raise ValueError(f"{where}: microbatch {a.microbatch} out of range "
                                 f"(num_microbatches={num_microbatches})")
            if stage_to_rank is not None and stage_to_rank.get(a.stage, r) != r:
                raise ValueError(f"{where}: stage {a.stage} belongs to rank "
                                 f"{stage_to_rank[a.stage]}, not rank {r}; move the action to "
                                 f"that rank's list")
            parsed[r].append(a)
    owners = _owners(parsed)
    if num_stages is None:
        num_stages = max(owners, default=-1) + 1
    if num_microbatches is None:
        num_microbatches = 1 + max((a.microbatch for lst in parsed.values() for a in lst),
                                   default=0)
    check_sizes(num_stages, num_microbatches)
    if stage_to_rank is None:
        stage_to_rank = owners
    missing = sorted(set(range(num_stages)) - set(stage_to_rank))
    if missing:
        raise ValueError(f"no rank runs stages {missing} (num_stages={num_stages}); every "
                         f"stage needs its F and backward on one rank")
    ranks = sorted(set(stage_to_rank[s] for s in range(num_stages)))
    if sorted(schedule) != ranks:
        raise ValueError(f"schedule has ranks {sorted(schedule)} but the stages live on ranks "
                         f"{ranks}; give one action list per rank")

    _check_work(parsed, num_stages, num_microbatches, forward_only)
    _, stuck = replay(parsed, num_stages, duration=lambda a: 1.0, comm=lambda a: 0.0)
    if stuck:
        raise ValueError(_deadlock_message(stuck, parsed, stage_to_rank))
    return parsed


# What must already have run on the stage before each kind, and what must not.
_NEEDS = {"B": ("F",), "I": ("F",), "W": ("I",)}
_EXCLUDES = {"B": ("I", "W"), "I": ("B",), "W": ("B",)}


def _check_work(parsed: Mapping[int, list[Action]], num_stages: int, m: int,
                forward_only: bool = False) -> None:
    seen: dict[Action, int] = {}  # action -> its index in its rank's list
    rank_of = {a.stage: r for r, lst in parsed.items() for a in lst}
    for r, lst in parsed.items():
        for i, a in enumerate(lst):
            where = f"rank {r}, action {i} ({a})"
            if forward_only and a.kind != "F":
                raise ValueError(f"{where}: a forward-only schedule has F actions only; "
                                 f"build it with pipeline.forward_schedule(schedule)")
            if a in seen:
                raise ValueError(f"{where}: duplicate, already at action {seen[a]}; each "
                                 f"microbatch runs {a.kind} once per stage")
            for other in _EXCLUDES.get(a.kind, ()):
                if Action(a.stage, other, a.microbatch) in seen:
                    raise ValueError(f"{where}: microbatch {a.microbatch} already has "
                                     f"{a.stage}{other}{a.microbatch}; a backward is either one "
                                     f"B or an I followed by a W, not both")
            for need in _NEEDS.get(a.kind, ()):
                if Action(a.stage, need, a.microbatch) not in seen:
                    raise ValueError(f"{where}: {a.kind} before its {need} "
                                     f"({a.stage}{need}{a.microbatch}); move it after")
            seen[a] = i
    for s in range(num_stages):
        missing_f = [mb for mb in range(m) if Action(s, "F", mb) not in seen]
        if missing_f:
            raise ValueError(f"rank {rank_of.get(s)}: stage {s} has no F for microbatches "
                             f"{missing_f}; every microbatch "
                             f"needs one F and one backward (B, or I then W) on every stage")
        no_backward = [mb for mb in range(m) if not forward_only
                       and Action(s, "B", mb) not in seen and Action(s, "I", mb) not in seen]
        if no_backward:
            raise ValueError(f"rank {rank_of.get(s)}: stage {s} has no B for microbatches "
                             f"{no_backward}; every "
                             f"microbatch needs one F and one backward (B, or I then W)")
        no_w = [mb for mb in range(m) if Action(s, "I", mb) in seen
                and Action(s, "W", mb) not in seen]
        if no_w:
            raise ValueError(f"rank {rank_of.get(s)}: stage {s} has no W for microbatches "
                             f"{no_w} after their I; add "
                             f"{s}W{no_w[0]} (the weight gradients) after {s}I{no_w[0]}")


def _deadlock_message(stuck, parsed, stage_to_rank: Mapping[int, int]) -> str:
    index = {a: (r, i) for r, lst in parsed.items() for i, a in enumerate(lst)}
    lines = ["deadlock: every unfinished rank waits for an input no rank will produce"]
    for r, (i, a, msg) in sorted(stuck.items()):
        kind, stage, mb = msg
        producers = [Action(stage, k, mb) for k in (("F",) if kind == "act" else ("B", "I"))]
        producer = next((p for p in producers if p in index), producers[0])
        peer = stage_to_rank[stage]
        if peer == r:
            j = index[producer][1]
            lines.append(f"  rank {r}, action {i} ({a}) needs {producer}, which this rank runs "
                         f"later (action {j}): its input is not available yet")
            continue
        why = f"rank {peer} is itself stuck at action {stuck[peer][0]} ({stuck[peer][1]})" \
            if peer in stuck else f"rank {peer} finished without running it"
        lines.append(f"  rank {r} waits at action {i} ({a}) for {producer} from rank {peer}; {why}")
    lines.append("fix: reorder so each rank runs the action its neighbour waits for first")
    return "\n".join(lines)
