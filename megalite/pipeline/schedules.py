"""Pipeline schedules as data: builders, schedule files, and a printer.

``build_schedule(name, num_ranks, num_microbatches, virtual=None)`` returns
``{rank: ["0F0", "0F1", "0B0", ...]}`` (grammar in :mod:`megalite.pipeline.actions`):

    name               placement  stages per rank  backward
    gpipe              loop       v (default 1)    B      all F, then all B
    1f1b               loop       1                B      warmup, one F one B, cooldown
    interleaved-1f1b   loop       v (default 2)    B      Megatron-Core's virtual pipeline
    zb-h1              loop       1                I + W  zero bubble (ZB-H1), 1F1B's memory
    interleaved-zb     loop       v (default 2)    I + W  the same interleaved (torch's ZB1P)
    zbv                V          2                I + W  zero bubble, V-shaped (ZB-V)

"loop": stage s on rank s mod p (p * v stages). "V": rank r owns stages r and 2p-1-r, so
the first and the last stage (embedding and head) share rank 0 and the turn at stage p-1 ->
p stays on rank p-1. ``load_schedule`` reads a user's table (CSV or JSON, one row per rank)
and ``format_schedule`` prints any schedule as a time grid.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import re
from pathlib import Path
from typing import Callable

from megalite.pipeline.actions import Action, Schedule, parse_action, stage_to_rank
from megalite.pipeline.validate import check_sizes, replay, validate_schedule


# ---------------------------------------------------------------------------------------
# Hand-written orders.


def _gpipe(p: int, m: int, v: int) -> dict[int, list[Action]]:
    # Fill the pipeline with every forward, then drain it with every backward: simple, but
    # all m activations of every stage are alive at once. With v > 1 stages per rank it is
    # the "looped BFS" order: each local stage's forwards in turn, backwards in reverse.
    out = {}
    for r in range(p):
        stages = [c * p + r for c in range(v)]
        out[r] = [Action(s, "F", i) for s in stages for i in range(m)] + \
                 [Action(s, "B", i) for s in reversed(stages) for i in range(m)]
    return out


def _one_f_one_b(p: int, m: int, v: int) -> dict[int, list[Action]]:
    out = {}
    for r in range(p):
        # Warmup: the forwards that must run before the first gradient can come back from
        # the last stage (p-r-1 of them; fewer when there are fewer microbatches).
        warmup = min(p - r - 1, m)
        actions = [Action(r, "F", i) for i in range(warmup)]
        # Steady state: each new forward is followed by the oldest pending backward, so at
        # most warmup+1 = min(p-r, m) activations are alive at any time.
        for i in range(m - warmup):
            actions += [Action(r, "F", warmup + i), Action(r, "B", i)]
        # Cooldown: drain the backwards still owed for the warmup forwards.
        actions += [Action(r, "B", i) for i in range(m - warmup, m)]
        out[r] = actions
    return out


# ---------------------------------------------------------------------------------------
# Zero-bubble orders (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241).


def _interleaved_table(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """Megatron-Core's virtual-microbatch table: k -> (microbatch, model chunk). Groups of p
    microbatches walk through chunk 0, chunk 1, ...; needs m divisible by p when v > 1."""
    if v > 1 and m % p:
        raise ValueError(f"interleaved schedules need num_microbatches divisible by the "
                         f"pipeline size: got m={m}, p={p} (as in Megatron-Core: the number of "
                         f"microbatches is not divisible by pipeline-model-parallel-size); "
                         f"change --global-batch-size or --micro-batch-size, or use 1f1b")
    group = p if v > 1 else m
    return [(i, c) for first in range(0, m, group) for c in range(v)
            for i in range(first, min(first + group, m))]


def _interleaved_1f1b(p: int, m: int, v: int) -> dict[int, list[Action]]:
    """Megatron-Core's interleaved 1F1B (virtual pipeline).

    Virtual microbatch k runs table[k] (`_interleaved_table`); the k-th backward walks the
    same table with the chunks reversed. Warmup on rank r: 2(p-r-1) + (v-1)p forwards, then
    one forward one backward, then the cooldown.
    """
    table, total = _interleaved_table(p, m, v), m * v
    out = {}
    for r in range(p):
        def fwd(k):
            i, c = table[k]
            return Action(c * p + r, "F", i)

        def bwd(k):
            i, c = table[k]
            return Action((v - 1 - c) * p + r, "B", i)

        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
        actions = [fwd(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [fwd(warmup + k), bwd(k)]
        actions += [bwd(k) for k in range(total - warmup, total)]
        out[r] = actions
    return out


def _zero_bubble_loop(p: int, m: int, v: int) -> dict[int, list[Action]]:
    """ZB-H1 (v = 1) and its interleaved form (v > 1, PyTorch's ZB1P): interleaved 1F1B's
    order with a shorter warmup, (v-1)p + p-r-1 forwards, each backward split into I and W,
    and rank r postponing its first r W's. The later ranks then run their I's back to
    back, gradients reach rank 0 sooner, and the postponed W's fill the cooldown; peak
    memory is the first rank's, now on every rank."""
    table, total = _interleaved_table(p, m, v), m * v
    out = {}
    for r in range(p):
        warmup = min((v - 1) * p + p - r - 1, total)
        actions = [Action(c * p + r, "F", i) for i, c in table[:warmup]]
        weights = []  # I's whose W is still owed, oldest first

        def backward(k):
            i, c = table[k]
            actions.append(Action((v - 1 - c) * p + r, "I", i))
            weights.append(actions[-1])
            if k >= r:  # W of the microbatch r places back
                a = weights.pop(0)
                actions.append(Action(a.stage, "W", a.microbatch))

        for k in range(total - warmup):
            i, c = table[warmup + k]
            actions.append(Action(c * p + r, "F", i))
            backward(k)
        for k in range(total - warmup, total):
            backward(k)
        actions += [Action(a.stage, "W", a.microbatch) for a in weights]
        out[r] = actions
    return out


def _zbv(p: int, m: int, v: int) -> dict[int, list[Action]]:
    """ZB-V (Qi et al., sec. 6): V placement, rank r owns chunk 0 = stage r and chunk 1 =
    stage 2p-1-r. Phases per rank: 2(p-r)-1 forwards of chunk 0; r times (F1, F0); p-r times
    (F1, I1, W1); steady (F0, I0, W0, F1, I1, W1) until every forward is done; cooldown r
    times (I0, I1), p-r times (I0, W0); then the W's still owed, chunk 1's first. Planned
    for max(m, 2p-1) microbatches, the extra ones dropped. Peak memory is 1F1B's (2p
    half-size stages, i.e. p microbatches of a rank's layers) on every rank."""
    n = max(m, 2 * p - 1)
    out = {}
    for r in range(p):
        stage = (r, 2 * p - 1 - r)
        count: dict[tuple[int, str], int] = {}
        plan: list[tuple[int, str]] = []

        def emit(*items):
            for item in items:
                plan.append((int(item[1]), item[0]))  # "F0" -> (chunk 0, "F")

        emit(*["F0"] * (2 * (p - r) - 1))
        for _ in range(r):
            emit("F1", "F0")
        for _ in range(p - r):
            emit("F1", "I1", "W1")
        f0 = (2 * (p - r) - 1) + r
        f1 = r + (p - r)
        while f1 < f0 or f0 < n:
            if f0 < n:
                emit("F0")
                f0 += 1
            emit("I0", "W0", "F1", "I1", "W1")
            f1 += 1
        for _ in range(r):
            emit("I0", "I1")
        for _ in range(p - r):
            emit("I0", "W0")
        actions = []
        for chunk, kind in plan:
            i = count.get((chunk, kind), 0)
            count[(chunk, kind)] = i + 1
            actions.append(Action(stage[chunk], kind, i))
        owed = {c: count.get((c, "I"), 0) - count.get((c, "W"), 0) for c in (0, 1)}
        for chunk in (1, 0):
            start = count.get((chunk, "W"), 0)
            actions += [Action(stage[chunk], "W", i) for i in range(start, start + owed[chunk])]
        out[r] = [a for a in actions if a.microbatch < m]
    return out


# name -> (builder, placement, default virtual, allowed virtual (None: any >= 1))
_BUILDERS: dict[str, tuple[Callable, str, int, tuple | None]] = {
    "1f1b": (_one_f_one_b, "loop", 1, (1,)),
    "gpipe": (_gpipe, "loop", 1, None),
    "interleaved-1f1b": (_interleaved_1f1b, "loop", 2, "2+"),
    "zb-h1": (_zero_bubble_loop, "loop", 1, (1,)),
    "interleaved-zb": (_zero_bubble_loop, "loop", 2, "2+"),
    "zbv": (_zbv, "V", 2, (2,)),
}
SCHEDULE_NAMES = tuple(_BUILDERS)


def schedule_info(name: str, virtual: int | None = None) -> tuple[str, int]:
    """(placement, virtual stages per rank) of a named schedule; raises for a bad pair."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULE_NAMES)} "
                         f"or pass a schedule file")
    _, kind, default, allowed = _BUILDERS[key]
    v = default if virtual is None else virtual
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"virtual stages must be an int >= 1, got {virtual!r}")
    if allowed == "2+" and v < 2:
        raise ValueError(f"{key} needs virtual stages >= 2 (got {v}); for one stage per rank "
                         f"use {'1f1b' if key == 'interleaved-1f1b' else 'zb-h1'}")
    if isinstance(allowed, tuple) and v not in allowed:
        raise ValueError(f"{key} runs {allowed[0]} stage(s) per rank, got virtual={v}"
                         + ("; for several stages per rank use interleaved-1f1b or "
                            "interleaved-zb" if key in ("1f1b", "zb-h1") else ""))
    return kind, v


def build_schedule(name: str, num_ranks: int, num_microbatches: int,
                   virtual: int | None = None) -> dict[int, list[str]]:
    """Return {rank: ["0F0", "0F1", "0B0", ...]}, each rank's compute actions in order.

    num_ranks is the pipeline size p; ``virtual`` the stages per rank (default per schedule,
    see the module docstring), so there are p * virtual stages. num_microbatches < p is
    allowed except for the interleaved schedules, which need m divisible by p
    (Megatron-Core's rule). Every result passes
    `validate_schedule`.
    """
    kind, v = schedule_info(name, virtual)
    check_sizes(num_ranks, num_microbatches)
    built = _build(name.lower(), num_ranks, num_microbatches, v)
    return {r: list(actions) for r, actions in built.items()}


@functools.lru_cache(maxsize=64)
def _build(name: str, p: int, m: int, v: int) -> dict[int, tuple[str, ...]]:
    # Cached: a training loop asks for the same schedule every step.
    actions = _BUILDERS[name][0](p, m, v)
    return {r: tuple(str(a) for a in actions[r]) for r in range(p)}


def forward_schedule(schedule: Schedule) -> dict[int, list[str]]:
    """The F actions of ``schedule``, in each rank's order: the same stages, placement and
    transfers without any backward, for evaluation (``run_schedule(..., forward_only=True)``).
    Runnable whenever ``schedule`` is, since an F waits only for earlier Fs."""
    return {r: [str(a) for a in map(parse_action, actions) if a.kind == "F"]
            for r, actions in schedule.items()}


# ---------------------------------------------------------------------------------------
# Schedule files.


def load_schedule(path, num_ranks: int | None = None,
                  num_microbatches: int | None = None) -> dict[int, list[str]]:
    """Read a user's schedule table and validate it.

    JSON: ``{"0": ["0F0", ...], "1": [...]}`` or a list of lists (row i = rank i).
    CSV: one row per rank, one action per cell, empty cells ignored; a first cell "rank N"
    (or "N:") on every row says which rank the row is, else rows are ranks 0, 1, ... Placement is what the table says (which rank lists
    which stage). With num_ranks / num_microbatches the table must match them.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read schedule file {str(path)!r}: {e.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data[k] for k in sorted(data, key=int)]
            if isinstance(data, dict) and sorted(int(k) for k in data) != list(range(len(data))):
                raise ValueError(f"ranks {sorted(data)} must be 0..{len(data) - 1}")
        elif path.suffix.lower() == ".csv":
            labels, rows = [], []
            for row in csv.reader(io.StringIO(text)):
                cells = [c.strip() for c in row if c.strip()]
                if not cells:
                    continue
                label = re.fullmatch(r"(?:rank\s*)?(\d+):?", cells[0], re.IGNORECASE)
                if label and (cells[0].lower().startswith("rank") or cells[0].endswith(":")):
                    labels.append(int(label.group(1)))
                    cells = cells[1:]
                rows.append(cells)
            if labels:  # "rank N" cells say which row is which rank
                if len(labels) != len(rows) or sorted(labels) != list(range(len(rows))):
                    raise ValueError(f"rank labels {labels} must number the {len(rows)} rows "
                                     f"0..{len(rows) - 1}, each once; label every row or none")
                rows = [row for _, row in sorted(zip(labels, rows))]
        else:
            raise ValueError("use a .json or .csv file")
        schedule = {r: [str(a) for a in row] for r, row in enumerate(rows)}
        if not all(isinstance(row, list) for row in rows):
            raise ValueError("each rank's row must be a list of actions")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"schedule file {str(path)!r}: {e}") from None
    try:
        if num_ranks is not None and len(schedule) != num_ranks:
            raise ValueError(f"it has {len(schedule)} rows (ranks) but the pipeline has "
                             f"{num_ranks}; write one row per pipeline rank")
        validate_schedule(schedule, None, num_microbatches)  # every microbatch < m, all there
    except ValueError as e:
        raise ValueError(f"schedule file {str(path)!r}: {e}") from None
    return schedule


def save_schedule(schedule: Schedule, path) -> None:
    """Write a schedule as JSON or CSV (by suffix), readable by `load_schedule`."""
    path = Path(path)
    rows = {int(r): [str(parse_action(a)) for a in lst] for r, lst in schedule.items()}
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({str(r): rows[r] for r in sorted(rows)}, indent=1) + "\n")
    else:
        out = io.StringIO()
        csv.writer(out).writerows([f"rank {r}"] + rows[r] for r in sorted(rows))
        path.write_text(out.getvalue())


# ---------------------------------------------------------------------------------------
# Printing.


def format_schedule(schedule: Schedule, num_stages: int | None = None) -> str:
    """A grid, one row per rank, one column per time step, for printing and debugging.

    Columns come from a replay with unit costs (every action, B included, takes one step),
    so pipeline bubbles show as blanks ("."). A list that cannot be replayed (e.g. it
    deadlocks) is shown in plain list order instead, with a note.
    """
    parsed = {r: [parse_action(a) for a in lst] for r, lst in sorted(schedule.items())}
    if num_stages is None:
        num_stages = 1 + max((a.stage for lst in parsed.values() for a in lst), default=0)
    timeline, stuck = replay(parsed, num_stages, duration=lambda a: 1.0, comm=lambda a: 0.0)
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


__all__ = ["Action", "SCHEDULE_NAMES", "build_schedule", "format_schedule", "load_schedule",
           "parse_action", "save_schedule", "schedule_info", "stage_to_rank",
           "validate_schedule"]
