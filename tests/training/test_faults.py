"""Runs that survive, through the real command line (torchrun, gloo, CPU): preemption, a dead
rank, a stuck rank, corrupt checkpoints, a read-only save directory, NaNs, and bad flags.
Each case checks what happened and how long the processes took to exit.

Faults are injected with MEGALITE_FAULT (megalite/training/inject.py) or from outside
(SIGTERM to torchrun, damaged files). `pytest -s tests/training/test_faults.py` prints the
rows of the table in docs/reliability.md ("RELIABILITY | fault | outcome | s | steps lost").
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megalite.training.checkpoint_dir import verify_checkpoint
from megalite.training.errors import EXIT_NONFINITE
from megalite.training import inject
from megalite.training.fault import (COMM_TIMEOUT_MARGIN_S, StepWatchdog, Stopper,
                                     check_timeouts, summarize)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "pretrain_gpt.py")
COMMON = ["--model", "tiny", "--seq-len", "32", "--global-batch-size", "8",
          "--micro-batch-size", "2", "--log-interval", "1", "--seed", "5"]
EXIT_BOUND_S = 30.0  # the bound for every process to be gone after a fault


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALITE_DEVICE": "cpu", **extra}
    for key in ("MEGALITE_FAULT", "TRITON_INTERPRET", "MEGALITE_DEBUG"):
        if key not in extra:
            env.pop(key, None)
    return env


def _cmd(nproc: int, args) -> list[str]:
    launch = [sys.executable, SCRIPT] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), SCRIPT]
    return launch + COMMON + [str(a) for a in args]


class Run:
    """One launch: exit code, combined output, seconds it ran."""

    def __init__(self, proc, seconds):
        self.rc, self.out, self.seconds = proc.returncode, proc.stdout, seconds

    def __repr__(self):
        return f"rc={self.rc} after {self.seconds:.1f}s:\n{self.out[-4000:]}"


def launch(cwd, *args, nproc=1, fault=None, timeout=120):
    t0 = time.monotonic()
    env = _env(MEGALITE_FAULT=fault) if fault else _env()
    proc = subprocess.run(_cmd(nproc, args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return Run(proc, time.monotonic() - t0)


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(path)}


def table(fault, outcome, seconds, lost):
    print(f"\nRELIABILITY | {fault} | {outcome} | {seconds:.1f} | {lost}")


# ----------------------------------------------------------------------------- flags

BAD_FLAGS = [  # (WORLD_SIZE, flags, the one line it must print)
    (2, ["--tp", "3"], "world size 2 is not divisible by tp*pp = 3*1 = 3"),
    (2, ["--global-batch-size", "6"],
     "--global-batch-size 6 must be a multiple of --micro-batch-size x dp = 2 x 2"),
    (2, ["--seq-len", "300"], "--seq-len 300 exceeds the tiny preset's max_seq_len 256"),
    (2, ["--tp", "2", "--sequence-parallel", "--seq-len", "33"],
     "--seq-len 33 must be divisible by --tp 2"),
    (2, ["--model", "nope"], "--model nope: unknown preset 'nope'"),
    (2, ["--data", "1", "short", "1", "missing/corpus"],
     "--data: token file 'missing/corpus.bin' not found"),
    (2, ["--kernels", "triton"], "--kernels triton needs"),
    (8, ["--pp", "8"], "n_layers=4 < 8 pipeline stages"),
    (8, ["--tp", "8"], "--tp 8 must divide the tiny preset's n_heads 4"),
    (2, ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (2, ["--max-time", "0"], "argument --max-time: must be a number > 0"),
    (2, ["--bogus"], "unrecognized arguments: --bogus"),
    (2, ["--lr", "-1"], "argument --lr: must be a number >= 0, got -1"),
    (2, ["--save-every", "5"], "--save-every needs --save DIR"),
    (2, ["--load", "nowhere"], "--load nowhere does not exist"),
    (2, ["--data", "wide"], "the data's tokenizer has 50257 tokens but the tiny model only 256"),
    (2, ["--data", "short"], "--data short has 7 samples of --seq-len 128, fewer than one "
                             "--global-batch-size 16"),
    # the planner's verdict, before anything is allocated (a 70B model on one 8-GPU node)
    (8, ["--model", "llama-70b", "--check-memory", "--gpu-memory", "80GB"],
     "--check-memory: tp=1 pp=1 dp=8 mbs=2 1f1b recompute=none does not fit: parameters + "
     "gradients + optimizer state alone need 1027.8 GiB on pipeline rank 0 (> 74.5 GiB)"),
    (2, ["--check-memory"], "--check-memory on CPU needs --gpu-memory SIZE"),
    (2, ["--layout", "auto", "--tp=2", "--distributed-optimizer"],
     "--layout auto chooses --tp, --distributed-optimizer: drop --tp --distributed-optimizer, "
     "or drop --layout auto"),
    (2, ["--step-timeout", "700"],
     "--step-timeout 700 must be at most --comm-timeout 600 - 10 s"),
]


def _token_file(prefix: Path, num_tokens: int, vocab_size: int) -> None:
    np.zeros(num_tokens, dtype=np.uint16).tofile(f"{prefix}.bin")
    Path(f"{prefix}.json").write_text(json.dumps({
        "format": "megalite-tokens", "version": 1, "dtype": "uint16",
        "num_tokens": num_tokens, "vocab_size": vocab_size, "tokenizer": "byte"}))


def test_bad_flags_one_line_exit_2_before_any_process_group(tmp_path):
    """Each bad flag runs as rank 0 of a world whose other ranks never come: had the script
    started a process group, it would wait for them (600 s) instead of exiting at once."""
    _token_file(tmp_path / "wide", 10_000, vocab_size=50257)   # a GPT-2 tokenized corpus
    _token_file(tmp_path / "short", 1_000, vocab_size=256)     # 7 samples of 128 + 1
    cases = [(world, flags, message, "0") for world, flags, message in BAD_FLAGS]
    # A LOCAL_RANK other than 0 stays silent (and lingers a few seconds, so that under
    # torchrun the rank that prints is not stopped before it has printed).
    cases.insert(0, (2, ["--tp", "3"], None, "1"))
    for batch in range(0, len(cases), 4):  # a few at a time: each one imports torch
        procs = []
        for world, flags, message, rank in cases[batch:batch + 4]:
            env = _env(WORLD_SIZE=str(world), RANK=rank, LOCAL_RANK=rank,
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            procs.append((subprocess.Popen([sys.executable, SCRIPT] + flags, cwd=tmp_path,
                                           env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True),
                          time.monotonic(), flags, message))
        for proc, t0, flags, message in procs:
            out, err = proc.communicate(timeout=120)
            assert time.monotonic() - t0 < 60, f"{flags}: did it wait for a process group?"
            assert proc.returncode == 2, (flags, proc.returncode, out, err)
            assert out == "" and "Traceback" not in err, (flags, out, err)
            if message is None:
                assert err == "", f"LOCAL_RANK 1 printed: {err}"
            else:
                assert err.count("\n") == 1 and err.startswith("error: ") and \
                    message in err, (flags, err)

    # Under torchrun: the line once, before torchrun's failure summary, which quotes it.
    run = launch(tmp_path, "--tp", "3", nproc=2)
    said = [line for line in run.out.splitlines() if line.startswith("error: world size 2")]
    assert run.rc != 0 and len(said) == 1, run
    assert "exitcode  : 2" in run.out and f'File "{SCRIPT}"' not in run.out, run
    assert run.out.split("Root Cause")[1].count("error: world size 2") == 1, run


# ----------------------------------------------------------------------------- one process

def test_stop_resume_and_the_save_directory_in_one_process(tmp_path):
    """SIGTERM, --exit-after and --max-time stop with a checkpoint; the same command
    resumes (auto-resume from --save) and the curve is the uninterrupted one; --keep-last,
    nothing-to-do, --steps in the past, --no-resume."""
    launch(tmp_path, "--steps", "6", "--metrics-out", "ref.jsonl")
    same = ["--steps", "6", "--save", "ck", "--save-every", "1", "--keep-last", "2",
            "--metrics-out", "m.jsonl"]

    run = launch(tmp_path, *same, fault="sigterm@2")
    assert run.rc == 128 + signal.SIGTERM, run
    assert run.out.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 2;"), run
    table("SIGTERM (1 process)", f"stop after step 2, checkpoint, exit {run.rc}",
          run.seconds, 0)
    run = launch(tmp_path, *same, "--exit-after", "1")
    assert run.rc == 0 and "stopped: --exit-after 1 steps after step 3" in run.out, run
    run = launch(tmp_path, *same, "--max-time", "0.0001")
    assert run.rc == 0 and "stopped: --max-time 0.0001 minutes reached after step 4" \
        in run.out, run
    run = launch(tmp_path, *same)
    assert run.rc == 0 and f"resuming from {Path('ck', 'step_00000004')}" in run.out, run
    # Each step once in the metrics, with exactly the uninterrupted losses (fp32).
    assert [r["step"] for r in rows(tmp_path / "m.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "m.jsonl") == losses(tmp_path / "ref.jsonl")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.toml", "latest", "step_00000005",
                                                   "step_00000006"]  # config: the flags
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000006"

    run = launch(tmp_path, *same)
    assert run.rc == 0 and "already at --steps 6: nothing to train" in run.out, run
    run = launch(tmp_path, *same[:-2], "--steps", "4")
    assert run.rc == 2 and run.out.strip().splitlines()[-1] == (
        f"error: {Path('ck', 'step_00000006')} is at step 6, past --steps 4 (--steps is the "
        "step to train until): pass a larger --steps, or --no-resume to start over"), run
    run = launch(tmp_path, *same[2:], "--steps", "2", "--no-resume")
    assert run.rc == 0 and "--no-resume: deleted 2 checkpoint(s) after step 0" in run.out, run
    assert [r["step"] for r in rows(tmp_path / "m.jsonl")] == [1, 2]
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.toml", "latest", "step_00000001",
                                                   "step_00000002"]


def test_stopper_counts_non_finite_steps_in_a_row():
    stopper = Stopper(max_skipped=2)
    assert stopper.after_step(True, 0.1) is None
    assert stopper.after_step(False, 0.1) is None  # a good step resets the count
    assert stopper.after_step(True, 0.1) is None
    stop = stopper.after_step(True, 0.1)
    assert stop.reason == "nonfinite" and stop.exit_code == EXIT_NONFINITE


def test_watchdog_summary_names_who_did_not_arrive():
    reports = {0: {"waiting": True, "where": "p2p.py:67 in recv"},
               2: {"waiting": False, "where": "data.py:9 in read"},
               3: {"waiting": True, "where": "distributed_c10d.py:1 in all_reduce"}}
    line = summarize(7, 60, reports, 4)
    assert line.startswith("step 7 stuck for 60 s: rank(s) [1, 2] did not arrive; "
                           "rank 2 is at data.py:9 in read; rank(s) [1] did not report"), line
    assert "rank(s) [0, 3] wait in a collective" in line
    deadlock = summarize(7, 60, {0: {"waiting": True}, 1: {"waiting": True}}, 2)
    assert "every rank waits in a collective" in deadlock and "did not arrive" not in deadlock


def test_watchdog_limit_follows_the_median_step_after_warmup():
    dog = StepWatchdog(timeout_s=None, startup_s=600, warmup=3, floor_s=60, factor=10)
    assert dog.limit_s() == 600  # compiling, allocating: the first steps get --comm-timeout
    for seconds in (50.0, 1.0, 2.0, 3.0):  # the launch's first step is not counted
        dog.step_started(1)
        dog.step_finished(seconds)
    assert dog.times == [1.0, 2.0, 3.0] and dog.limit_s() == 60  # max(60, 10 x 2)
    for seconds in (20.0, 20.0, 20.0):
        dog.step_started(1)
        dog.step_finished(seconds)
    assert dog.limit_s() == 115  # 10 x median(1, 2, 3, 20, 20, 20)
    assert StepWatchdog(timeout_s=5).limit_s() == 5


def test_watchdog_fires_before_a_collective_times_out():
    """A stuck step must end one way: the watchdog's report and exit 4. So its limit stays
    COMM_TIMEOUT_MARGIN_S under --comm-timeout however slow the steps were, and a fixed
    --step-timeout that does not is refused."""
    dog = StepWatchdog(timeout_s=None, startup_s=600, warmup=3, comm_timeout_s=600)
    assert dog.limit_s() == 600 - COMM_TIMEOUT_MARGIN_S  # the first steps: not the same 600
    for seconds in (1.0, 100.0, 100.0, 100.0):
        dog.step_started(1)
        dog.step_finished(seconds)
    assert dog.limit_s() == 600 - COMM_TIMEOUT_MARGIN_S  # 10 x 100 s, capped
    assert StepWatchdog(timeout_s=590, comm_timeout_s=600).limit_s() == 590
    with pytest.raises(ValueError, match=r"--step-timeout 595 must be at most --comm-timeout "
                                         r"600 - 10 s"):
        check_timeouts(595, 600)
    with pytest.raises(ValueError, match="--comm-timeout 8 leaves the step watchdog no time"):
        check_timeouts(None, 8)
    check_timeouts(0, 8)  # the watchdog off: any --comm-timeout
    assert StepWatchdog(timeout_s=0, comm_timeout_s=8).ceiling_s == float("inf")


def test_fault_specs():
    assert inject.parse("nan@3-5:rank1, hang@4") == [("nan", 3, 5, 1), ("hang", 4, 4, None)]
    with pytest.raises(ValueError, match="cannot read 'oops@2'"):
        inject.parse("oops@2")


# ----------------------------------------------------------------------------- torchrun

def _start_ranks(cwd, nproc: int, args, fault: str) -> list[subprocess.Popen]:
    """``nproc`` ranks of the command, started as a launcher would (RANK, WORLD_SIZE, ...)
    but without torchrun, each with its own stdout and stderr."""
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, SCRIPT] + COMMON + [str(a) for a in args], cwd=cwd, text=True,
        env=_env(MEGALITE_FAULT=fault, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                 LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(nproc)]


def _wait_for_rows(proc, metrics: Path, count: int, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} metric rows within {timeout}s (exit {proc.poll()})")


def test_sigterm_and_kill_at_tp2_pp2_then_resume_exactly(tmp_path):
    layout = ["--tp", "2", "--pp", "2", "--steps", "8"]  # long enough to stop mid-run
    ref = launch(tmp_path, *layout, "--metrics-out", "ref.jsonl", nproc=4)
    assert ref.rc == 0, ref
    ref = losses(tmp_path / "ref.jsonl")
    cmd = layout + ["--save", "ck", "--save-every", "2", "--metrics-out", "m.jsonl"]

    # Preemption: the cluster sends SIGTERM to torchrun, which forwards it to the workers.
    proc = subprocess.Popen(_cmd(4, cmd), cwd=tmp_path, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_rows(proc, tmp_path / "m.jsonl", 2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    seconds = time.monotonic() - t0
    stopped = rows(tmp_path / "m.jsonl")[-1]["step"]
    assert stopped <= 5 and seconds < EXIT_BOUND_S and out.count("stopped by SIGTERM") == 1, out
    assert f"stopped by SIGTERM after step {stopped}; saved ck/step_{stopped:08d}" in out, out
    assert verify_checkpoint(str(tmp_path / "ck" / f"step_{stopped:08d}")) == []
    table("SIGTERM to torchrun, tp=2 pp=2", f"finish step {stopped}, checkpoint, exit 143",
          seconds, 0)

    # A rank dies (kill -9) at the start of a step. The ranks are started without torchrun,
    # which would end the survivors itself: this is what megalite does under any launcher.
    # Every survivor's next collective or receive fails; each says one line naming the
    # operation (and whom it waited for) and exits 1, within the bound.
    dies_at = stopped + 2
    procs = _start_ranks(tmp_path, 4, cmd, fault=f"kill@{dies_at}:rank1")
    _wait_for_rows(procs[0], tmp_path / "m.jsonl", dies_at - 1)
    t0 = time.monotonic()
    ends = [p.communicate(timeout=60) for p in procs]
    seconds = time.monotonic() - t0
    assert procs[1].returncode == -signal.SIGKILL and seconds < EXIT_BOUND_S, ends
    lines = {}
    for rank in (0, 2, 3):
        err = ends[rank][1].strip()
        assert procs[rank].returncode == 1 and len(err.splitlines()) == 1, (rank, ends[rank])
        assert re.match(rf"rank {rank}: RuntimeError: .+ failed: ", err), err
        lines[rank] = err
    # Rank 1's peers name it: its TP partner's all-reduce, its next stage's receive.
    assert "all_reduce of (2, 32, 128) torch.float32 over ranks [0, 1] failed" in lines[0]
    assert "waiting for 1F0 from rank 1" in lines[3], lines[3]
    last_saved = max(s for s in range(stopped, dies_at) if s % 2 == 0 or s == stopped)
    table("kill -9 of rank 1, tp=2 pp=2 (no torchrun)", "each survivor: one line, exit 1",
          seconds, dies_at - 1 - last_saved)

    # The same command again: resumes from the newest checkpoint, the same losses.
    run = launch(tmp_path, *cmd, nproc=4)
    assert run.rc == 0 and f"resuming from ck/step_{last_saved:08d}" in run.out, run
    assert [r["step"] for r in rows(tmp_path / "m.jsonl")] == list(range(1, 9))
    assert losses(tmp_path / "m.jsonl") == ref


def test_stuck_rank_ends_every_rank_within_the_step_timeout(tmp_path):
    # No --step-timeout: the first steps' limit is --comm-timeout less the margin (5 s), so
    # the watchdog, not rank 0's receive timing out at 15 s, ends the stuck step.
    run = launch(tmp_path, "--pp", "2", "--steps", "6", "--comm-timeout", "15", nproc=2,
                 fault="hang@3:rank1")
    assert run.rc != 0 and run.seconds < 5 + EXIT_BOUND_S, run
    assert "rank 1: step 3 did not finish within 5 s (--step-timeout); main thread at " \
           "inject.py" in run.out, run
    assert "rank 0: step 3 stuck for 5 s: rank(s) [1] did not arrive; rank 1 is at inject.py" \
        in run.out, run
    # Both ranks' Python stacks: the stuck one in the injected hang, the other in a receive.
    assert run.out.count("most recent call first") >= 4, run
    assert "in at_step_start" in run.out and "in recv" in run.out, run
    assert "exitcode  : 4" in run.out, run
    table("rank 1 stuck (pp=2, --comm-timeout 15)", "stacks printed, rank 1 named, all exit 4",
          run.seconds, 1)


def _model_tensors(ckpt: Path) -> dict:
    return {f"{f.name}:{k}": v for f in sorted(ckpt.glob("model_stage*.safetensors"))
            for k, v in load_file(f).items()}


def test_nan_loss_skips_the_step_everywhere_and_k_in_a_row_stop(tmp_path):
    run = launch(tmp_path, "--pp", "2", "--steps", "8", "--save", "ck", "--save-every", "1",
                 "--max-skipped-steps", "3", "--metrics-out", "m.jsonl", nproc=2,
                 fault="nan@3-5:rank1")  # the loss is computed on rank 1 (last stage) only
    # torchrun lists each rank that failed before it stopped the others (exit code 3 here).
    assert run.rc != 0 and "exitcode  : 3" in run.out, run
    said = [line for line in run.out.splitlines()
            if line.startswith("stopped: 3 steps in a row had a non-finite loss")]
    assert len(said) == 1, run  # printed once (torchrun's summary quotes it again)
    got = rows(tmp_path / "m.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r.get("skipped", False) for r in got] == [False, False, True, True, True]
    assert got[2]["skip_reason"] == "non-finite loss or grad norm"
    # Skipped steps keep the learning rate (the schedule counts updates; the default warmup
    # of 4 steps is still rising here) but consume their batches, as in Megatron.
    lrs = [r["lr"] for r in got]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == lrs[4], lrs
    sampler = json.loads((tmp_path / "ck" / "step_00000005" / "meta.json").read_text())["sampler"]
    assert sampler["consumed_samples"] == 5 * 8, sampler  # --global-batch-size 8
    # Both stages (written by ranks 0 and 1) kept the weights of step 2: nobody updated.
    good = _model_tensors(tmp_path / "ck" / "step_00000002")
    assert any(not torch.equal(v, _model_tensors(tmp_path / "ck" / "step_00000001")[k])
               for k, v in good.items())
    for step in (3, 5):
        later = _model_tensors(tmp_path / "ck" / f"step_{step:08d}")
        assert later.keys() == good.keys() and all(torch.equal(v, good[k])
                                                   for k, v in later.items()), step
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000005"
    table("NaN loss at steps 3-5 on rank 1 (pp=2, --max-skipped-steps 3)",
          "3 steps skipped on all ranks, checkpoint of the last good weights, exit 3",
          run.seconds, 0)


@pytest.fixture
def read_only_copy(tmp_path):
    """A read-only copy of a checkpoint directory: chmod for a normal user; root writes
    anywhere, so for root a read-only bind mount (skipped where mounting is not allowed)."""
    mounted, made = [], []

    def make(from_dir: Path, to_dir: Path) -> Path:
        shutil.copytree(from_dir, to_dir)
        made.append(to_dir)
        if os.geteuid() != 0:
            for path in [to_dir, *to_dir.rglob("*")]:
                if path.is_dir():
                    path.chmod(0o555)
            return to_dir
        if subprocess.run(["mount", "--bind", str(to_dir), str(to_dir)],
                          capture_output=True).returncode != 0:
            return None
        mounted.append(to_dir)
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(to_dir)],
                          capture_output=True).returncode != 0:
            return None
        return to_dir

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)
    for root in made:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


def test_corrupt_newest_checkpoint_falls_back_and_read_only_save_fails(tmp_path,
                                                                       read_only_copy):
    cmd = ["--pp", "2", "--steps", "6", "--save-every", "2"]
    first = launch(tmp_path, *cmd, "--save", "ck", "--exit-after", "4",
                   "--metrics-out", "first.jsonl", nproc=2)
    assert first.rc == 0, first
    ro = read_only_copy(tmp_path / "ck", tmp_path / "ro")  # intact steps 2 and 4

    # The newest checkpoint loses one byte: a warning, set aside, the previous one used.
    newest = tmp_path / "ck" / "step_00000004"
    with open(newest / "model_stage1.safetensors", "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    run = launch(tmp_path, *cmd, "--save", "ck", "--metrics-out", "second.jsonl", nproc=2)
    assert run.rc == 0, run
    warning = (f"warning: checkpoint {Path('ck', 'step_00000004')} is corrupt or incomplete "
               f"(model_stage1.safetensors does not match its sha256 in meta.json); falling "
               f"back to {Path('ck', 'step_00000002')}")
    assert run.out.count(warning) == 1, run
    assert f"resuming from {Path('ck', 'step_00000002')}" in run.out, run
    assert {s: l for s, l in losses(tmp_path / "second.jsonl").items() if s <= 4} == \
        {s: l for s, l in losses(tmp_path / "first.jsonl").items() if s > 2}
    kept = sorted(os.listdir(tmp_path / "ck"))
    assert [k for k in kept if k.startswith("step_00000004.corrupt-")], kept  # set aside
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000006"
    table("corrupt newest checkpoint (1 byte flipped)", "warning, fallback to the previous one",
          run.seconds, 2)

    # A read-only --save: it finds step 4 there, and fails before training, on writing the
    # run's effective flags (ro/config.toml), instead of at its first save.
    if ro is None:
        pytest.skip("running as root without permission to mount read-only")
    run = launch(tmp_path, *cmd, "--save", "ro", nproc=2)
    assert run.rc != 0 and run.seconds < 60, run
    lines = [line for line in run.out.splitlines() if line.startswith("rank ")]
    assert len(lines) == 1 and lines[0].startswith("rank 0: ") and (
        "Read-only file system" in lines[0] or "Permission denied" in lines[0]), run
    assert "exitcode  : 1" in run.out, run  # and within the time bound: nobody hangs
    assert (ro / "latest").read_text().strip() == "step_00000004"
    assert verify_checkpoint(str(ro / "step_00000004")) == []
    table("save into a read-only directory (pp=2)", "one line from rank 0, all ranks exit 1, "
          "previous checkpoint intact", run.seconds, 2)
