"""Write pipeline timelines as Chrome-trace JSON and as PNG plots.

Both take a generic list of spans `(rank, name, kind, start, end)` so the same code draws a
simulated schedule (`SimResult.spans()`) and a timeline measured by the executor. Times are
in any unit; `unit_us` converts them to the microseconds Chrome traces use (1e6 for seconds).
kind is "F", "B", "I", "W" for compute, anything else (e.g. "send", "recv") for
communication. On a rank that owns several stages, its later stages are drawn lighter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch.distributed


class Span(NamedTuple):
    rank: int
    name: str
    kind: str
    start: float
    end: float


COMPUTE_KINDS = ("F", "B", "I", "W")
COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#2A9D8F", "W": "#8172B2", "send": "#DD8452",
          "recv": "#C44E52"}
OTHER_COLOR = "#999999"


def gather_spans(spans: list, ps) -> list | None:
    """Every pipeline rank's measured spans of one step, times from the earliest start (in
    the clock's unit); on global rank 0, None elsewhere. Collective over the pp group."""
    gathered = [spans]
    if ps.pp > 1:
        gathered = [None] * ps.pp
        torch.distributed.all_gather_object(gathered, spans, group=ps.pp_group)
    if ps.rank != 0:
        return None
    every = [s for rank_spans in gathered for s in rank_spans]
    t0 = min(s[3] for s in every)
    return [(r, n, k, a - t0, b - t0) for r, n, k, a, b in every]


def _spans(spans: Iterable) -> list[Span]:
    return [Span(*s) for s in spans]


def write_chrome_trace(spans: Iterable, path, unit_us: float = 1.0) -> None:
    """Write spans as a Chrome-trace event list (open in https://ui.perfetto.dev).

    One process per rank (pid = rank); compute on thread 0, communication on thread 1 so a
    send or recv that overlaps compute stays visible.
    """
    events = [
        {
            "name": s.name,
            "cat": s.kind,
            "ph": "X",
            "ts": s.start * unit_us,
            "dur": (s.end - s.start) * unit_us,
            "pid": int(s.rank),
            "tid": 0 if s.kind in COMPUTE_KINDS else 1,
        }
        for s in _spans(spans)
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # One event per line: valid JSON that still diffs and greps well.
    Path(path).write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + "\n]\n")


def _label(span: Span) -> str:
    # Action names like "2F13" are labelled by their microbatch; the colour gives the kind.
    match = re.fullmatch(r"\d+[FBIW](\d+)", span.name)
    return match.group(1) if match else span.name


def _stage(span: Span) -> int | None:
    match = re.fullmatch(r"(\d+)[FBIW]\d+", span.name)
    return int(match.group(1)) if match else None


def plot_timeline(spans: Iterable, path, title: str = "") -> None:
    """Draw one row per rank (rank 0 on top), one coloured box per span, labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = _spans(spans)
    ranks = sorted({s.rank for s in spans})
    end = max((s.end for s in spans), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(max(6.0, min(20.0, 0.35 * len(spans) / max(1, len(ranks)) + 4)),
                                    0.6 * len(ranks) + 1.4))
    row = {r: i for i, r in enumerate(ranks)}
    local_stages = {r: sorted({_stage(s) for s in spans if s.rank == r and _stage(s) is not None})
                    for r in ranks}
    # Compute fills the row; if there are comm spans they get a thin strip at its bottom,
    # since a send or recv may overlap compute on the same rank.
    has_comm = any(s.kind not in COMPUTE_KINDS for s in spans)
    compute_box, comm_box = ((-0.4, 0.6), (0.22, 0.16)) if has_comm else ((-0.4, 0.8), None)
    for s in spans:
        comm = s.kind not in COMPUTE_KINDS
        y0, h = comm_box if comm else compute_box
        chunk = local_stages[s.rank].index(_stage(s)) if not comm and _stage(s) is not None else 0
        ax.broken_barh([(s.start, s.end - s.start)], (row[s.rank] + y0, h),
                       facecolors=COLORS.get(s.kind, OTHER_COLOR), edgecolor="white",
                       linewidth=0.5, alpha=1.0 if chunk == 0 else 0.6)
        if not comm and (s.end - s.start) > 0.012 * end:
            ax.text((s.start + s.end) / 2, row[s.rank] + y0 + h / 2, _label(s), ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, end)
    ax.set_xlabel("time")
    kinds = [k for k in COLORS if any(s.kind == k for s in spans)]
    if kinds:  # outside the axes, right of rank 0, so it never hides a box
        ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds],
                  loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
