"""Pipeline schedules as data (DESIGN.md principle 3).

A schedule is, per rank, the list of compute actions that rank runs, in order, written
`{stage}{F|B|W}{microbatch}` -- the grammar of torch.distributed.pipelining:

    F  forward of a microbatch on a stage
    B  backward; alone it is the full backward, followed by a W on the same stage and
       microbatch it is only the input-gradient half (zero-bubble style split)
    W  weight-gradient half of a split backward

Communication is implied, never written: F on stage s > 0 consumes the activation that F on
stage s-1 produced; B on stage s < last consumes the gradient that B on stage s+1 produced.

This module builds lists (`build_schedule`), checks any list (`validate_schedule`) and
prints it (`format_schedule`), all without starting processes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

KINDS = ("F", "B", "W")
_ACTION_RE = re.compile(r"(\d+)([FBW])(\d+)")


@dataclass(frozen=True, order=True)
class Action:
    """One compute action: `Action(1, "B", 0)` is written "1B0"."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"action kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got {self}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        return parse_action(text)


ActionLike = Union[str, Action]
Schedule = Mapping[int, Sequence[ActionLike]]


def parse_action(text: ActionLike) -> Action:
    """Parse "0F3" into Action(0, "F", 3); an Action is returned unchanged."""
    if isinstance(text, Action):
        return text
    match = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"malformed action {text!r}: write {{stage}}{{F|B|W}}{{microbatch}}, e.g. '0F3' or '1B0'"
        )
    stage, kind, mb = match.groups()
    return Action(int(stage), kind, int(mb))


# ---------------------------------------------------------------------------------------
# Generators. One stage per rank, so stage == rank.


def _gpipe(rank: int, p: int, m: int) -> list[Action]:
    # Fill the pipeline with every forward, then drain it with every backward: simple, but
    # all m activations are alive at once.
    return [Action(rank, "F", i) for i in range(m)] + [Action(rank, "B", i) for i in range(m)]


def _one_f_one_b(rank: int, p: int, m: int) -> list[Action]:
    # Warmup: the forwards that must run before the first gradient can come back from the
    # last stage (p-r-1 of them; fewer when there are fewer microbatches).
    warmup = min(p - rank - 1, m)
    actions = [Action(rank, "F", i) for i in range(warmup)]
    # Steady state: each new forward is followed by the oldest pending backward, so at most
    # warmup+1 = min(p-r, m) activations are alive at any time.
    for i in range(m - warmup):
        actions += [Action(rank, "F", warmup + i), Action(rank, "B", i)]
    # Cooldown: drain the backwards still owed for the warmup forwards.
    actions += [Action(rank, "B", i) for i in range(m - warmup, m)]
    return actions


_GENERATORS: dict[str, Callable[[int, int, int], list[Action]]] = {
    "1f1b": _one_f_one_b,
    "gpipe": _gpipe,
}
SCHEDULE_NAMES = tuple(_GENERATORS)


def build_schedule(name: str, num_stages: int, num_microbatches: int) -> dict[int, list[str]]:
    """Return {rank: ["0F0", "0F1", "0B0", ...]}, each rank's compute actions in order.

    name is "1f1b" or "gpipe" (case-insensitive). num_microbatches < num_stages is allowed:
    1F1B's warmup is then clipped to the microbatches there are.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULE_NAMES)}")
    _check_sizes(num_stages, num_microbatches)
    gen = _GENERATORS[key]
    return {r: [str(a) for a in gen(r, num_stages, num_microbatches)] for r in range(num_stages)}


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(
            f"num_microbatches must be an int >= 1, got {num_microbatches!r} "
            "(global batch / (micro batch * dp) must be at least 1)"
        )


# ---------------------------------------------------------------------------------------
# Replay: run every rank's list in order and time it. Shared by the validator (deadlock
# check), format_schedule (alignment) and the simulator (costs).
#
# Model: a rank blocks only on a receive, i.e. until the peer has produced the activation
# or gradient its next action consumes; sends never block (isend, waited later). Plain
# blocking sends would deadlock even textbook 1F1B at p=2 (rank 0 blocks sending F1 while
# rank 1 blocks sending B0), which is why executors fuse or defer sends; a list is then
# runnable exactly when its waits form no cycle, which is what this replay detects.


def _remote_input(a: Action, num_stages: int) -> Action | None:
    """The action on a neighbouring stage whose output `a` consumes, if any."""
    if a.kind == "F" and a.stage > 0:
        return Action(a.stage - 1, "F", a.microbatch)
    if a.kind == "B" and a.stage < num_stages - 1:
        return Action(a.stage + 1, "B", a.microbatch)
    return None


def _replay(actions: Mapping[int, Sequence[Action]], num_stages: int,
            duration: Callable[[Action], float], comm: Callable[[Action], float]):
    """Return (timeline, stuck).

    timeline: {rank: [(start, end, action), ...]} for the actions that could run;
    stuck: {rank: (index, action, missing input)} for ranks that never finished.
    Start times depend only on finish times already known, so the order in which ranks are
    visited does not change the result.
    """
    pos = {r: 0 for r in actions}
    free = {r: 0.0 for r in actions}
    finished: dict[Action, tuple[float, int]] = {}  # action -> (end time, rank)
    timeline = {r: [] for r in actions}
    progress = True
    while progress:
        progress = False
        for r, lst in actions.items():
            while pos[r] < len(lst):
                a = lst[pos[r]]
                start = free[r]
                dep = _remote_input(a, num_stages)
                if dep is not None:
                    if dep not in finished:
                        break
                    dep_end, dep_rank = finished[dep]
                    start = max(start, dep_end + (comm(dep) if dep_rank != r else 0.0))
                end = start + duration(a)
                timeline[r].append((start, end, a))
                finished[a] = (end, r)
                free[r] = end
                pos[r] += 1
                progress = True
    stuck = {r: (pos[r], lst[pos[r]], _remote_input(lst[pos[r]], num_stages))
             for r, lst in actions.items() if pos[r] < len(lst)}
    return timeline, stuck


# ---------------------------------------------------------------------------------------
# Validation.


def validate_schedule(schedule: Schedule, num_stages: int, num_microbatches: int,
                      stage_to_rank: Mapping[int, int] | None = None) -> dict[int, list[Action]]:
    """Check that `schedule` is a runnable pipeline schedule; raise ValueError if not.

    stage_to_rank defaults to stage s on rank s. Checks, in order: ranks and stage
    ownership, action syntax and ranges, per stage every microbatch's F exactly once and
    before its B (exactly once), an optional W only after its B, messages between two
    stages consumed in the order they are produced, and no deadlock (see `_replay`).
    Returns the parsed schedule {rank: [Action, ...]}.
    """
    _check_sizes(num_stages, num_microbatches)
    if stage_to_rank is None:
        stage_to_rank = {s: s for s in range(num_stages)}
    missing_stages = sorted(set(range(num_stages)) - set(stage_to_rank))
    if missing_stages:
        raise ValueError(f"stage_to_rank has no rank for stages {missing_stages}")
    ranks = sorted(set(stage_to_rank[s] for s in range(num_stages)))
    if sorted(schedule) != ranks:
        raise ValueError(
            f"schedule has ranks {sorted(schedule)} but the stages live on ranks {ranks}; "
            "give one action list per rank"
        )

    parsed: dict[int, list[Action]] = {}
    for r in ranks:
        parsed[r] = []
        for i, text in enumerate(schedule[r]):
            try:
                a = parse_action(text)
            except ValueError as e:
                raise ValueError(f"rank {r}, action {i}: {e}") from None
            where = f"rank {r}, action {i} ({a})"
            if a.stage >= num_stages:
                raise ValueError(f"{where}: stage {a.stage} does not exist (num_stages={num_stages})")
            if stage_to_rank[a.stage] != r:
                raise ValueError(
                    f"{where}: stage {a.stage} belongs to rank {stage_to_rank[a.stage]}, "
                    f"not rank {r}; move the action to that rank's list"
                )
            if a.microbatch >= num_microbatches:
                raise ValueError(
                    f"{where}: microbatch {a.microbatch} out of range "
                    f"(num_microbatches={num_microbatches})"
                )
            parsed[r].append(a)

    _check_stage_order(parsed, num_stages, num_microbatches)
    _check_fifo(parsed, num_stages)
    _, stuck = _replay(parsed, num_stages, duration=lambda a: 1.0, comm=lambda a: 0.0)
    if stuck:
        raise ValueError(_deadlock_message(stuck, stage_to_rank))
    return parsed


def _check_stage_order(parsed: Mapping[int, list[Action]], num_stages: int, m: int) -> None:
    seen: dict[Action, int] = {}  # action -> its index in its rank's list
    for r, lst in parsed.items():
        for i, a in enumerate(lst):
            where = f"rank {r}, action {i} ({a})"
            if a in seen:
                raise ValueError(f"{where}: duplicate, already at action {seen[a]}; each "
                                 f"microbatch runs {a.kind} once per stage")
            need = {"B": "F", "W": "B"}.get(a.kind)
            if need and Action(a.stage, need, a.microbatch) not in seen:
                raise ValueError(f"{where}: {a.kind} before its {need} "
                                 f"({a.stage}{need}{a.microbatch}); move it after")
            seen[a] = i
    for s in range(num_stages):
        for kind in ("F", "B"):
            missing = [mb for mb in range(m) if Action(s, kind, mb) not in seen]
            if missing:
                raise ValueError(f"stage {s} has no {kind} for microbatches {missing}; every "
                                 f"microbatch needs one F and one B on every stage")


def _check_fifo(parsed: Mapping[int, list[Action]], num_stages: int) -> None:
    # Point-to-point messages between two ranks are matched in posting order (NCCL has no
    # tags), so the consumer must take a stage's outputs in the order they were produced;
    # otherwise microbatches are silently swapped or, with blocking sends, the pair hangs.
    order: dict[tuple[int, str], list[tuple[int, int]]] = {}  # (stage, kind) -> [(mb, rank)]
    for r, lst in parsed.items():
        for a in lst:
            if a.kind != "W":
                order.setdefault((a.stage, a.kind), []).append((a.microbatch, r))
    for (s, kind), seq in order.items():
        peer = s - 1 if kind == "F" else s + 1
        if not 0 <= peer < num_stages:
            continue
        mine, theirs = [mb for mb, _ in seq], [mb for mb, _ in order[(peer, kind)]]
        what = "activations" if kind == "F" else "gradients"
        if mine != theirs:
            raise ValueError(
                f"rank {seq[0][1]} consumes stage {peer}'s {what} in microbatch order {mine}, "
                f"but rank {order[(peer, kind)][0][1]} produces them in order {theirs}; p2p "
                f"messages arrive in send order, so run stage {s}'s {kind}s in order {theirs}"
            )


def _deadlock_message(stuck, stage_to_rank: Mapping[int, int]) -> str:
    lines = ["deadlock: every unfinished rank waits for an input no rank will produce"]
    for r, (i, a, dep) in sorted(stuck.items()):
        peer = stage_to_rank[dep.stage]
        why = f"rank {peer} is itself stuck at action {stuck[peer][0]} ({stuck[peer][1]})" \
            if peer in stuck else f"rank {peer} finished without running it"
        lines.append(f"  rank {r} waits at action {i} ({a}) for {dep} from rank {peer}; {why}")
    lines.append("fix: reorder so each rank runs the action its neighbour waits for first")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Printing.


def format_schedule(schedule: Schedule, num_stages: int | None = None) -> str:
    """A grid, one row per rank, one column per time step, for printing and debugging.

    Columns come from a replay with unit costs, so pipeline bubbles show as blanks ("."),
    the way the schedule would run with F = B = W. A list that cannot be replayed (e.g. it
    deadlocks) is shown in plain list order instead, with a note.
    """
    parsed = {r: [parse_action(a) for a in lst] for r, lst in sorted(schedule.items())}
    if num_stages is None:
        num_stages = 1 + max((a.stage for lst in parsed.values() for a in lst), default=0)
    timeline, stuck = _replay(parsed, num_stages, duration=lambda a: 1.0, comm=lambda a: 0.0)
    cells: dict[int, dict[int, str]] = {}
    if stuck:
        note = "(cannot be replayed: shown in list order)\n"
        cells = {r: {i: str(a) for i, a in enumerate(lst)} for r, lst in parsed.items()}
    else:
        note = ""
        cells = {r: {int(t0): str(a) for t0, _, a in spans} for r, spans in timeline.items()}
    steps = 1 + max((t for row in cells.values() for t in row), default=-1)
    width = max([len(c) for row in cells.values() for c in row.values()] + [len(str(steps))])
    head = "step    " + " ".join(f"{t:>{width}}" for t in range(steps))
    rows = [f"rank {r:<3}" + " ".join(f"{row.get(t, '.'):>{width}}" for t in range(steps))
            for r, row in cells.items()]
    return note + "\n".join([head] + rows)
