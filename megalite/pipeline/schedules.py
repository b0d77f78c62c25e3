"""Pipeline schedules as data: builders, schedule files, and a printer.

``build_schedule(name, num_ranks, num_microbatches, virtual=None)`` returns
``{rank: ["0F0", "0F1", "0B0", ...]}`` (grammar in :mod:`megalite.pipeline.actions`):

    name               placement  stages per rank  backward
    gpipe              loop       v (default 1)    B      all F, then all B
    1f1b               loop       1                B      warmup, one F one B, cooldown
    interleaved-1f1b   loop       v (default 2)    B      Megatron-Core's virtual pipeline
    zb-h1              loop       1                I + W  zero bubble, 1F1B's memory
    interleaved-zb     loop       v (default 2)    I + W  zero bubble, interleaved memory
    zbv                V          2                I + W  zero bubble, V-shaped

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
from pathlib import Path
from typing import Callable

from megalite.pipeline.actions import Action, Schedule, parse_action, stage_to_rank
from megalite.pipeline.validate import check_sizes, replay, validate_schedule


def placement(kind: str, num_ranks: int, virtual: int) -> dict[int, int]:
    """{stage: rank} of a "loop" or "V" placement of num_ranks * virtual stages."""
    if kind == "loop":
        return {s: s % num_ranks for s in range(num_ranks * virtual)}
    if kind == "V":
        if virtual != 2:
            raise ValueError(f"V placement holds exactly 2 stages per rank, got virtual={virtual}")
        return {s: s if s < num_ranks else 2 * num_ranks - 1 - s for s in range(2 * num_ranks)}
    raise ValueError(f"unknown placement {kind!r}; 'loop' or 'V'")


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


def _interleaved_1f1b(p: int, m: int, v: int) -> dict[int, list[Action]]:
    """Megatron-Core's interleaved 1F1B (virtual pipeline), microbatch groups of size p.

    Virtual microbatch k runs model chunk c on microbatch i, where the table walks groups of
    p microbatches through chunk 0, then chunk 1, ...; m must be a multiple of p;
    the backward walks the same table with the chunks reversed. Warmup on rank r:
    2(p-r-1) + (v-1)p forwards, then one forward one backward, then the cooldown.
    """
    if m % p:
        raise ValueError(f"interleaved schedules need num_microbatches divisible by the "
                         f"pipeline size: got m={m}, p={p} (as in Megatron-Core: the number of "
                         f"microbatches is not divisible by pipeline-model-parallel-size); "
                         f"change --global-batch-size or --micro-batch-size, or use 1f1b")
    table = []  # virtual microbatch -> (microbatch, chunk)
    for first in range(0, m, p):
        table += [(i, c) for c in range(v) for i in range(first, first + p)]
    total = m * v
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


# ---------------------------------------------------------------------------------------
# Zero-bubble orders by list scheduling.


def _list_schedule(p: int, m: int, owner: dict[int, int], cap: int,
                   priority: str) -> dict[int, list[Action]]:
    """Zero-bubble order for any placement, by list scheduling at unit costs (F = I = W).

    At each time step every idle rank takes the first available kind in ``priority`` (e.g.
    "IFW"): an I whose gradient has arrived (highest stage first: it unblocks the ranks
    upstream), a forward whose input has arrived while the rank holds fewer than ``cap``
    stage-microbatches (from F until W), or the oldest pending W, which fills what would
    otherwise be a bubble. This is the greedy heuristic of Qi et al. (arXiv 2401.10241,
    sec. 3) with a memory limit taken from the schedule it replaces; the result is then
    validated like any other list.
    """
    n = len(owner)
    stages = {r: sorted((s for s in owner if owner[s] == r), reverse=True) for r in range(p)}
    next_f, next_i = [0] * n, [0] * n
    ready: dict[tuple, int] = {}  # ("act"|"grad", stage, mb) -> time it exists
    pending_w: dict[int, list[Action]] = {r: [] for r in range(p)}
    live = {r: 0 for r in range(p)}
    out: dict[int, list[Action]] = {r: [] for r in range(p)}
    left, t, never = 3 * n * m, 0, float("inf")
    while left:
        made = {}
        for r in range(p):
            options = {}
            for s in stages[r]:
                i = next_i[s]
                if i < m and ready.get(("act", s, i), never) <= t and \
                        (s == n - 1 or ready.get(("grad", s + 1, i), never) <= t):
                    options["I"] = Action(s, "I", i)
                    break
            if live[r] < cap:
                for s in stages[r]:
                    i = next_f[s]
                    if i < m and (s == 0 or ready.get(("act", s - 1, i), never) <= t):
                        options["F"] = Action(s, "F", i)
                        break
            if pending_w[r]:
                options["W"] = pending_w[r][0]
            pick = next((options[k] for k in priority if k in options), None)
            if pick is None:
                continue
            out[r].append(pick)
            left -= 1
            s, i = pick.stage, pick.microbatch
            if pick.kind == "F":
                next_f[s] += 1
                live[r] += 1
                made[("act", s, i)] = t + 1
            elif pick.kind == "I":
                next_i[s] += 1
                pending_w[r].append(Action(s, "W", i))
                made[("grad", s, i)] = t + 1
            else:
                pending_w[r].pop(0)
                live[r] -= 1
        ready.update(made)
        t += 1
        if t > 10 * n * m + 100:  # a cap too small to make progress; never for ours
            raise RuntimeError(f"zero-bubble list scheduling is stuck (cap={cap})")
    return out


def _best_list_schedule(p: int, m: int, owner: dict[int, int], max_cap: int):
    """The shortest list schedule at unit costs over two priority rules ("I first" drains
    gradients early, "F first" keeps a V's second half busy) with at most ``max_cap`` live
    stage-microbatches per rank; then the cap is lowered while that stays as short, so the
    schedule holds no more activations than its speed needs."""
    def attempt(cap):
        found = None
        for priority in ("IFW", "FIW"):
            try:
                order = _list_schedule(p, m, owner, cap, priority)
            except RuntimeError:
                continue
            timeline, _ = replay(order, len(owner), duration=lambda a: 1.0, comm=lambda a: 0.0)
            makespan = max(end for spans in timeline.values() for _, end, _ in spans)
            if found is None or makespan < found[0]:
                found = (makespan, order)
        return found

    best = attempt(max_cap)
    for cap in range(max_cap - 1, len(owner) // p - 1, -1):
        found = attempt(cap)
        if found is None or found[0] > best[0]:
            break
        best = found
    return best[1]


def _zb_h1(p: int, m: int, v: int) -> dict[int, list[Action]]:
    """ZB-H1 (Qi et al., sec. 3.1): 1F1B with each B split into I and W, where rank r
    postpones its first r W's. The later ranks then run their I's back to back, gradients
    reach rank 0 sooner, and the postponed W's fill the cooldown. Peak memory is 1F1B's
    (p microbatches), now on every rank."""
    out = {}
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action(r, "F", i) for i in range(warmup)]
        w_next = 0

        def backward(i):
            nonlocal w_next
            actions.append(Action(r, "I", i))
            if i >= r:  # W of the microbatch r places back
                actions.append(Action(r, "W", w_next))
                w_next += 1

        for i in range(m - warmup):
            actions.append(Action(r, "F", warmup + i))
            backward(i)
        for i in range(m - warmup, m):
            backward(i)
        actions += [Action(r, "W", i) for i in range(w_next, m)]
        out[r] = actions
    return out


def _interleaved_zb(p: int, m: int, v: int) -> dict[int, list[Action]]:
    # At most interleaved 1F1B's peak memory (on its rank 0), on every rank.
    base = _interleaved_1f1b(p, m, v)
    cap = max(_peak_live(base[r]) for r in range(p))
    return _best_list_schedule(p, m, placement("loop", p, v), cap)


def _zbv(p: int, m: int, v: int) -> dict[int, list[Action]]:
    # At most 1F1B's peak on rank 0 (p microbatches of a whole rank's layers = 2p half-size
    # stage activations), on every rank: the V shape balances memory.
    return _best_list_schedule(p, m, placement("V", p, 2), 2 * p)


def _peak_live(actions: list[Action]) -> int:
    live = peak = 0
    for a in actions:
        live += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak


# name -> (builder, placement, default virtual, allowed virtual (None: any >= 1))
_BUILDERS: dict[str, tuple[Callable, str, int, tuple | None]] = {
    "1f1b": (_one_f_one_b, "loop", 1, (1,)),
    "gpipe": (_gpipe, "loop", 1, None),
    "interleaved-1f1b": (_interleaved_1f1b, "loop", 2, "2+"),
    "zb-h1": (_zb_h1, "loop", 1, (1,)),
    "interleaved-zb": (_interleaved_zb, "loop", 2, "2+"),
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


# ---------------------------------------------------------------------------------------
# Schedule files.


def load_schedule(path, num_ranks: int | None = None,
                  num_microbatches: int | None = None) -> dict[int, list[str]]:
    """Read a user's schedule table and validate it.

    JSON: ``{"0": ["0F0", ...], "1": [...]}`` or a list of lists (row i = rank i).
    CSV: one row per rank, one action per cell (an optional first cell "rank 0" / "0:" is
    skipped; empty cells are ignored). Placement is what the table says (which rank lists
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
            rows = []
            for row in csv.reader(io.StringIO(text)):
                cells = [c.strip() for c in row if c.strip()]
                if cells and (cells[0].lower().startswith("rank") or cells[0].endswith(":")):
                    cells = cells[1:]
                if cells:
                    rows.append(cells)
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
        validate_schedule(schedule, None, num_microbatches)
        m = 1 + max(parse_action(a).microbatch for row in schedule.values() for a in row)
        if num_microbatches is not None and m != num_microbatches:
            raise ValueError(f"it schedules {m} microbatches but the run has "
                             f"{num_microbatches}")
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
           "parse_action", "placement", "save_schedule", "schedule_info", "stage_to_rank",
           "validate_schedule"]
