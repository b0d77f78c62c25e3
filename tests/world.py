"""Spawn a gloo world of N CPU processes and run one function in each.

    results = run_world(4, check_something, arg1, arg2)   # fn(rank, world_size, *args)

Each rank's return value comes back in rank order. Any rank's exception fails the caller
with that rank's traceback; a world that does not finish within ``timeout`` seconds is
killed and reported as a hang, naming the ranks still running. The function must live at
module level in a test file (it is pickled by name into freshly spawned interpreters).
"""
from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, collective_timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                      MEGALITE_DEVICE="cpu")
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megalite import parallel
            parallel.destroy()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn, *args, timeout: float = 180.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, fn, args, results, min(timeout, 60.0)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outputs, errors = {}, {}
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs) - set(errors))
                details = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
                raise TimeoutError(f"{fn.__name__} hung: ranks {missing} did not finish "
                                   f"within {timeout:.0f}s{details}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive()
                        and p.exitcode not in (0, None) and r not in outputs and r not in errors]
                if dead:
                    errors.update({r: f"process exited with code {procs[r].exitcode}"
                                   for r in dead})
                continue
            (outputs if status == "ok" else errors)[rank] = payload
            if errors:  # one failure usually stalls the others: report it now
                time.sleep(0.5)
                while True:
                    try:
                        rank, status, payload = results.get_nowait()
                    except queue_mod.Empty:
                        break
                    (outputs if status == "ok" else errors)[rank] = payload
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        details = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:{details}")
    return [outputs[r] for r in range(world_size)]
