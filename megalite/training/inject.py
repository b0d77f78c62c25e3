"""Fault injection, for testing only: make a run fail on purpose at a chosen step and rank.

Set ``MEGALITE_FAULT`` to a comma-separated list of ``KIND@STEPS[:rankR]``; STEPS is one step
(``3``) or a range (``3-5``); without ``:rankR`` every rank is affected.

    nan      the loss of the step's first microbatch is NaN (on last-stage ranks, where the
             loss is computed): the step must be skipped everywhere
    hang     the rank sleeps forever at the start of the step (a stuck rank)
    kill     the rank sends itself SIGKILL at the start of the step (a dead rank)
    sigterm  the rank sends itself SIGTERM at the start of the step (preemption of one rank)

    MEGALITE_FAULT=nan@3:rank3 torchrun ... examples/pretrain_gpt.py ...
    MEGALITE_FAULT=hang@4:rank1,nan@2-3 ...

Faults fire in a launcher's first attempt only (TORCHELASTIC_RESTART_COUNT 0), like a
transient failure: a ``torchrun --max-restarts`` restart runs clean.

tests/training/test_faults.py drives the reliability checks with it. Unset (the normal
case), every function here returns at once and changes nothing.
"""
from __future__ import annotations

import os
import re
import signal
import time

KINDS = ("nan", "hang", "kill", "sigterm")
_SPEC = re.compile(r"^(?P<kind>[a-z]+)@(?P<first>\d+)(-(?P<last>\d+))?(:rank(?P<rank>\d+))?$")


def parse(text: str) -> list[tuple[str, int, int, int | None]]:
    """``"nan@3-5:rank1,hang@4"`` -> ``[("nan", 3, 5, 1), ("hang", 4, 4, None)]``."""
    faults = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        m = _SPEC.match(item)
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"MEGALITE_FAULT: cannot read {item!r}; write KIND@STEP[-STEP]"
                             f"[:rankR] with KIND one of {KINDS}")
        first = int(m["first"])
        faults.append((m["kind"], first, int(m["last"] or first),
                       None if m["rank"] is None else int(m["rank"])))
    return faults


def active(kind: str, step: int, rank: int) -> bool:
    text = os.environ.get("MEGALITE_FAULT", "")
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    return any(k == kind and lo <= step <= hi and r in (None, rank)
               for k, lo, hi, r in parse(text))


def at_step_start(step: int, rank: int) -> None:
    """The process-level faults: hang, kill, sigterm."""
    if active("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if active("sigterm", step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if active("hang", step, rank):
        while True:  # like a rank spinning in a deadlock: only a watchdog gets it out
            time.sleep(1.0)


def poison_loss(loss_fn, step: int, rank: int):
    """``loss_fn`` whose first call in this step returns NaN when a ``nan`` fault is set."""
    if not active("nan", step, rank):
        return loss_fn
    calls = []

    def poisoned(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 1 else loss
    poisoned.accepts_head_input = getattr(loss_fn, "accepts_head_input", False)
    return poisoned
