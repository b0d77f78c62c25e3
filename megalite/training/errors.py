"""How a training command ends: exit codes, and one line per mistake instead of a traceback.

A launcher prints, for each rank that fails, a traceback plus its own failure block; the cause
is then buried dozens of lines up. :func:`run_cli` runs a script's ``main`` and turns every
ending into a documented exit code and at most one line per rank:

* :class:`UsageError` (a bad flag, decided before anything started): printed once, by the
  process with ``LOCAL_RANK`` 0 (every rank sees the same flags), exit code 2;
* :class:`RunStopped` (a planned or forced stop; the stopping code printed its message):
  its code;
* any other exception: ``rank N: Type: message`` on the rank that raised it, exit code 1.
  A rank that fails only because another rank did (``comm.PeerFailure``) stays silent: the
  failing rank already said why.

``--debug`` (or ``MEGALITE_DEBUG=1``) prints the full traceback as well.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

from megalite.parallel.comm import PeerFailure

# Exit codes of megalite-train (and examples/pretrain_gpt.py; docs/reliability.md).
EXIT_OK = 0                 # trained to --steps, or a planned stop (--exit-after, --max-time)
EXIT_ERROR = 1              # a rank failed; the line "rank N: ..." says why
EXIT_USAGE = 2              # bad command line; nothing was started
EXIT_NONFINITE = 3          # --max-skipped-steps non-finite steps in a row; checkpoint saved
EXIT_STUCK = 4              # the step watchdog fired: a rank did not finish a step in time
EXIT_SIGNAL_BASE = 128      # stopped by signal N after saving: 128 + N (SIGTERM 143, SIGINT 130)
USAGE_GRACE_S = 5.0


_ENDING = threading.Lock()


def claim_exit() -> bool:
    """True for the first caller only: the code path that reports why the process ends (the
    main thread's error handler, or the step watchdog's thread). The other one must not
    print a second, derived cause (a peer vanishing because the watchdog ended it)."""
    return _ENDING.acquire(blocking=False)


class UsageError(ValueError):
    """A mistake in the command line, found before any process group, model or data."""


class RunStopped(Exception):
    """The run ended early on purpose (signal, limit, too many bad steps); ``code`` is the
    exit code. The code that raises it has already printed what happened."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


def debug_enabled(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("MEGALITE_DEBUG", "") not in ("", "0")


def process_rank() -> int:
    """Global rank: from torch.distributed once started, else from the launcher's env."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line; drops a leading ``rank N:`` the message may carry."""
    text = " ".join(str(error).split()) or "(no message)"
    if text.startswith("rank ") and ":" in text:
        head, rest = text.split(":", 1)
        if head[5:].strip().isdigit():
            text = rest.strip()
    return f"{type(error).__name__}: {text}"


def report(error: BaseException, debug: bool = False) -> int:
    """Print what ended the run the way a user can act on it; returns the exit code."""
    if isinstance(error, RunStopped):
        return error.code
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stopped without saving
        print(f"rank {process_rank()}: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + 2
    if isinstance(error, UsageError):
        if is_local_leader():
            if debug:
                traceback.print_exception(error, file=sys.stderr)
            print(f"error: {error}", file=sys.stderr, flush=True)
            write_launcher_error_file(f"error: {error}")
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun ends every worker as soon as one exits: give the rank that prints
            # the message time to do so (it ends us sooner by exiting itself).
            time.sleep(USAGE_GRACE_S)
        return EXIT_USAGE
    if isinstance(error, PeerFailure) and not debug:
        return EXIT_ERROR
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    rank = process_rank()
    line = f"rank {rank}: {one_line(error)}"
    print(line, file=sys.stderr, flush=True)
    write_launcher_error_file(line)
    return EXIT_ERROR


def write_launcher_error_file(line: str) -> None:
    """torchrun names the first failing rank in its summary and shows what that rank wrote
    to TORCHELASTIC_ERROR_FILE (else a generic "To enable traceback see ..."): give it the
    one line."""
    import json
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


def run_cli(main, argv=None) -> None:
    """Run ``main(argv)`` (which returns an exit code or None) and exit the process with the
    documented code. Error paths leave with ``os._exit`` after flushing: interpreter shutdown
    would otherwise wait on communication threads of a broken process group."""
    debug = debug_enabled(argv)
    try:
        code = main(argv) or EXIT_OK
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every ending gets one line and a code
        if not claim_exit():  # the watchdog is ending the process and says why
            time.sleep(60)
        code = report(e, debug)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
