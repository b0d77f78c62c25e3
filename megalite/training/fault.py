"""Ending a run on purpose, together: signals, time and step limits, bad numbers, stuck ranks.

* :class:`StopSignals` turns SIGTERM/SIGINT into a request to stop after the current step
  (a scheduler's preemption, Ctrl-C), instead of dying mid-step without a checkpoint.
* :class:`Stopper` decides once per step whether to stop: a signal, ``--max-time``,
  ``--exit-after``, or ``--max-skipped-steps`` non-finite steps in a row. The decision is an
  all-reduce (MAX) over every rank, so all ranks stop after the same step even when only one
  of them got the signal or ran out of time.
* :class:`StepWatchdog` is a thread that notices when a step takes far longer than it
  should (a deadlock, a rank spinning or waiting on a dead peer), prints this rank's Python
  stacks, says which rank did not arrive, and ends the process instead of hanging forever.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite.training.errors import (EXIT_NONFINITE, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_STUCK,
                                     claim_exit, write_launcher_error_file)


# ----------------------------------------------------------------------------- signals

class StopSignals:
    """Record the first SIGTERM/SIGINT instead of dying; the training loop stops after the
    step. Launchers often deliver one event twice (the terminal sends Ctrl-C to torchrun and
    to its workers, and torchrun forwards it again), so repeats within ``grace_s`` are the
    same request; a signal after that ends the process at once, without a checkpoint."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), grace_s: float = 3.0):
        self.signals, self.grace_s = signals, grace_s
        self.received: int | None = None
        self._first_at = 0.0
        self._previous = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.grace_s:
            signal.signal(signum, signal.SIG_DFL)  # asked again: die by the signal now
            os.kill(os.getpid(), signum)


# ----------------------------------------------------------------------------- stopping

# Reasons, by priority (the all-reduce keeps the largest on every rank).
_EXIT_AFTER, _MAX_TIME, _NONFINITE, _SIGNAL = 1, 2, 3, 4


@dataclass
class Stop:
    reason: str          # "signal" | "nonfinite" | "max-time" | "exit-after"
    exit_code: int
    message: str         # what stopped the run, for the final line
    advice: str = "run the same command to continue"


class Stopper:
    """Per-step stop decision shared by all ranks (one tiny all-reduce per step)."""

    def __init__(self, signals: StopSignals | None = None, *, max_time_min: float | None = None,
                 exit_after: int | None = None, max_skipped: int | None = None,
                 start_time: float | None = None, device=None):
        self.signals = signals
        self.max_time_s = max_time_min * 60 if max_time_min else None
        self.exit_after, self.max_skipped = exit_after, max_skipped
        self.start = time.monotonic() if start_time is None else start_time
        self.device = device or torch.device("cpu")
        self.steps_run = 0
        self.skipped_in_a_row = 0

    def after_step(self, nonfinite: bool, step_time_s: float) -> Stop | None:
        """Call on every rank after each optimizer step; the same answer everywhere."""
        self.steps_run += 1
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if nonfinite else 0
        reason, signum = 0, 0
        elapsed = time.monotonic() - self.start
        if self.exit_after and self.steps_run >= self.exit_after:
            reason = _EXIT_AFTER
        # Stop when one more step would end past the limit (the save still follows).
        if self.max_time_s and elapsed + step_time_s > self.max_time_s:
            reason = _MAX_TIME
        if self.max_skipped and self.skipped_in_a_row >= self.max_skipped:
            reason = _NONFINITE
        if self.signals is not None and self.signals.received is not None:
            reason, signum = _SIGNAL, int(self.signals.received)
        flags = torch.tensor([reason, signum], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        reason, signum = (int(v) for v in flags.tolist())
        if reason == _SIGNAL:
            name = signal.Signals(signum).name
            return Stop("signal", EXIT_SIGNAL_BASE + signum, f"stopped by {name}")
        if reason == _NONFINITE:
            return Stop("nonfinite", EXIT_NONFINITE,
                        f"stopped: {self.skipped_in_a_row} steps in a row had a non-finite loss "
                        f"or gradient norm (--max-skipped-steps {self.max_skipped})",
                        "it holds the weights of the last good step; check the data and "
                        "--lr (running the same command continues after the skipped batches)")
        if reason == _MAX_TIME:
            return Stop("max-time", EXIT_OK, f"stopped: --max-time {self.max_time_s / 60:g} "
                                             f"minutes reached")
        if reason == _EXIT_AFTER:
            return Stop("exit-after", EXIT_OK, f"stopped: --exit-after {self.exit_after} steps")
        return None


# ----------------------------------------------------------------------------- watchdog

def _in_collective(frame) -> bool:
    """Is this stack waiting inside torch.distributed or megalite's communication code?"""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/torch/distributed/" in path or path.endswith(("/megalite/parallel/comm.py",
                                                           "/megalite/pipeline/p2p.py")):
            return True
        frame = frame.f_back
    return False


def _where(frame) -> str:
    """Innermost frame outside the standard library: ``file.py:line in function``."""
    fallback = None
    while frame is not None:
        code = frame.f_code
        text = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        fallback = fallback or text
        if "/lib/python3" not in code.co_filename or "site-packages" in code.co_filename:
            return text
        frame = frame.f_back
    return fallback or "?"


# The watchdog's limit stays this far under the communication timeout: firing, collecting
# the other ranks' reports (report_wait_s) and exiting must end before a collective of the
# stuck step can time out, so a stuck step always ends the same way (exit 4, the report).
COMM_TIMEOUT_MARGIN_S = 10.0


def watchdog_ceiling(comm_timeout_s: float) -> float:
    """The longest step the watchdog may allow under ``--comm-timeout``; ValueError, naming
    the fix, when the timeout leaves it no room."""
    ceiling = comm_timeout_s - COMM_TIMEOUT_MARGIN_S
    if ceiling <= 0:
        raise ValueError(f"--comm-timeout {comm_timeout_s:g} leaves the step watchdog no time "
                         f"to report a stuck step before a collective times out: use "
                         f"--comm-timeout > {COMM_TIMEOUT_MARGIN_S:g}, or --step-timeout 0 "
                         f"to turn the watchdog off")
    return ceiling


def check_timeouts(step_timeout_s: float | None, comm_timeout_s: float) -> None:
    """The flags' part of the watchdog/communication-timeout rule (ValueError naming the
    fix): a fixed ``--step-timeout`` must leave COMM_TIMEOUT_MARGIN_S under it."""
    if step_timeout_s == 0:
        return
    ceiling = watchdog_ceiling(comm_timeout_s)
    if step_timeout_s is not None and step_timeout_s > ceiling:
        raise ValueError(f"--step-timeout {step_timeout_s:g} must be at most --comm-timeout "
                         f"{comm_timeout_s:g} - {COMM_TIMEOUT_MARGIN_S:g} s, so the watchdog "
                         f"(exit 4) ends a stuck step before a collective's timeout (exit 1) "
                         f"does: lower --step-timeout or raise --comm-timeout")


class StepWatchdog:
    """A thread that ends the process when a step does not finish in time.

    ``timeout_s`` > 0 is a fixed limit; None derives it: ``startup_s`` until ``warmup``
    steps have been timed (the first steps include compilation and allocation), then
    ``max(floor_s, factor * median step time)``. With ``comm_timeout_s`` (the process
    groups' timeout) the limit never exceeds ``watchdog_ceiling(comm_timeout_s)``: a stuck
    step is always reported by the watchdog (exit 4), never by a collective timing out
    first on some ranks (exit 1, or an abort under NCCL). When it fires, every rank's watchdog
    (they fire within about a second of each other, as steps start together) posts where its
    main thread is to the process group's key-value store, prints its Python stacks
    (faulthandler) and exits with ``EXIT_STUCK``; the lowest rank that reported names the
    ranks that did not arrive: those not waiting in a collective, or silent.
    Checkpoint saves run with the watchdog paused (they have the process-group timeout).
    A thread needs the GIL, which a hung C extension may hold: as a backstop, faulthandler's
    own C-level timer dumps the stacks and exits (code 1) ``backstop_s`` after the limit.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, timeout_s: float | None = None, *,
                 startup_s: float = 600.0, warmup: int = 3, floor_s: float = 60.0,
                 factor: float = 10.0, exit_code: int = EXIT_STUCK, report_wait_s: float = 3.0,
                 backstop_s: float = 60.0, comm_timeout_s: float | None = None):
        self.rank, self.world_size = rank, world_size
        self.ceiling_s = float("inf")
        if comm_timeout_s is not None and timeout_s != 0:  # 0: the watchdog is off
            check_timeouts(timeout_s, comm_timeout_s)
            self.ceiling_s = watchdog_ceiling(comm_timeout_s)
        self.timeout_s, self.startup_s = timeout_s, startup_s
        self.warmup, self.floor_s, self.factor = warmup, floor_s, factor
        self.exit_code, self.report_wait_s = exit_code, report_wait_s
        self.backstop_s, self._running = backstop_s, False
        self.times: list[float] = []
        self._finished = 0
        self.step, self.started_at = None, None   # armed while a step runs
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megalite-step-watchdog",
                                        daemon=True)
        self.store = _default_store()

    def limit_s(self) -> float:
        if self.timeout_s:
            return self.timeout_s
        if len(self.times) < self.warmup:
            return min(self.startup_s, self.ceiling_s)
        return min(max(self.floor_s, self.factor * statistics.median(self.times[-100:])),
                   self.ceiling_s)

    def start(self) -> "StepWatchdog":
        self._running = True
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._disarm()

    def step_started(self, step: int) -> None:
        self.step, self.started_at = step, time.monotonic()
        if self._running:
            faulthandler.dump_traceback_later(self.limit_s() + self.backstop_s, exit=True)

    def _disarm(self) -> None:
        if self._running:
            faulthandler.cancel_dump_traceback_later()

    def step_finished(self, step_time_s: float | None = None) -> None:
        if step_time_s is not None and self.step is not None:
            self._finished += 1
            if self._finished > 1:  # a launch's first step (compilation, allocation) is slow
                self.times.append(step_time_s)
        self.step, self.started_at = None, None
        self._disarm()

    @contextmanager
    def paused(self):
        step = self.step
        self.step, self.started_at = None, None
        self._disarm()
        try:
            yield
        finally:
            if step is not None:
                self.step_started(step)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            started, step = self.started_at, self.step
            if started is None or step is None:
                continue
            limit = self.limit_s()
            if time.monotonic() - started > limit:
                self._fire(step, limit)

    def _fire(self, step: int, limit: float) -> None:
        if not claim_exit():  # the main thread is already ending the process with an error
            self._stop.set()
            return
        frame = sys._current_frames().get(self._main)
        report = {"step": step, "where": _where(frame), "waiting": _in_collective(frame)}
        self._post(report)
        line = (f"rank {self.rank}: step {step} did not finish within {limit:.0f} s "
                f"(--step-timeout); main thread at {report['where']}")
        print(f"{line}; Python stacks:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        reports = self._collect(report)
        if min(reports, default=self.rank) == self.rank:
            line = f"rank {self.rank}: {summarize(step, limit, reports, self.world_size)}"
            print(line, file=sys.stderr, flush=True)
        write_launcher_error_file(line)
        sys.stdout.flush()
        os._exit(self.exit_code)

    def _key(self, rank: int) -> str:
        # torchrun keeps its store across worker restarts (--max-restarts): one key space
        # per attempt.
        return f"megalite/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"

    def _post(self, report: dict) -> None:
        if self.store is not None:
            try:
                self.store.set(self._key(self.rank), json.dumps(report))
            except Exception:  # noqa: BLE001 - the store may be gone with a dead launcher
                self.store = None

    def _collect(self, own: dict) -> dict[int, dict]:
        """Reports of every rank that posted one within ``report_wait_s``."""
        if self.store is None:
            return {self.rank: own}
        reports, deadline = {self.rank: own}, time.monotonic() + self.report_wait_s
        while time.monotonic() < deadline and len(reports) < self.world_size:
            for r in range(self.world_size):
                key = self._key(r)
                try:
                    if r not in reports and self.store.check([key]):
                        reports[r] = json.loads(self.store.get(key))
                except Exception:  # noqa: BLE001
                    return reports
            time.sleep(0.1)
        return reports


def summarize(step: int, limit: float, reports: dict[int, dict], world_size: int) -> str:
    """One line: which ranks did not arrive at the step's collectives, and where they are."""
    silent = [r for r in range(world_size) if r not in reports]
    busy = {r: rep.get("where", "?") for r, rep in sorted(reports.items())
            if not rep.get("waiting", True)}
    waiting = [r for r, rep in sorted(reports.items()) if rep.get("waiting", True)]
    culprits = sorted(set(silent) | set(busy))
    details = [f"rank(s) {culprits} did not arrive"] if culprits else [
        "every rank waits in a collective: mismatched collectives (a deadlock) or a lost "
        "peer; the stacks above show which"]
    details += [f"rank {r} is at {where}" for r, where in busy.items()]
    if silent:
        details.append(f"rank(s) {silent} did not report (dead, or holding the GIL)")
    if waiting and culprits:
        details.append(f"rank(s) {waiting} wait in a collective")
    return f"step {step} stuck for {limit:.0f} s: {'; '.join(details)}; all ranks exit"


def _default_store():
    """The default process group's key-value store (torchrun's), reachable even while the
    main thread is blocked in a collective; None without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it, no cross-rank summary
        return None
