"""examples/pretrain_gpt.py end to end: layouts agree through --metrics-out, resume is exact,
resharding continues the curve, and the trace and verbose switches produce their output."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.training.cli import schedule_note

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "pretrain_gpt.py")
COMMON = ["--model", "tiny", "--seq-len", "32", "--global-batch-size", "8",
          "--micro-batch-size", "2", "--log-interval", "1", "--seed", "3"]


def run(tmp_path, name, *args, nproc=1, command=(sys.executable, SCRIPT), common=COMMON):
    """Run ``command`` (default: examples/pretrain_gpt.py) with ``common`` and ``args``."""
    metrics = tmp_path / f"{name}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALITE_DEVICE": "cpu"}
    if nproc == 1:
        cmd = list(command)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000), SCRIPT]
    proc = subprocess.run(cmd + list(common) + ["--metrics-out", str(metrics), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return rows, proc.stdout + proc.stderr


def losses(rows):
    return {r["step"]: r["loss"] for r in rows}


def plain_validation_loss(checkpoint, eval_data, batches):
    """The validation loss of a checkpoint by the single-process model's plain forward and
    torch's cross-entropy, on the held-out samples a run evaluates."""
    import torch
    import torch.nn.functional as F
    from megalite.models import GPT, GPTConfig
    from megalite.training.checkpoint import load_checkpoint
    from megalite.training.data import TokenDataset, get_batch
    model = GPT(GPTConfig.preset("tiny"))
    load_checkpoint(str(checkpoint), model)
    data = TokenDataset(eval_data, seq_len=32)
    with torch.no_grad():
        return torch.stack([F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                            for x, y in (get_batch(data, b) for b in batches)]).mean().item()


def test_layouts_resume_and_reshard_through_the_command_line(tmp_path):
    # validation on a token file of its own (the bundled corpus; training data unchanged)
    from megalite.training.data import default_corpus_path
    from megalite.training.sampler import heldout_batches
    evaluation = ("--eval-interval", "3", "--eval-iters", "2", "--eval-data",
                  default_corpus_path())
    single, out = run(tmp_path, "single", "--steps", "4", "--profile", "prof", *evaluation)
    assert [r["step"] for r in single] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(single[0])
    assert "done:" in out and single[-1]["loss"] < single[0]["loss"]
    # --profile: a Chrome trace of the last step and a table whose categories sum to the
    # profiled total (and the profiled step trains like the others: the tp2pp2 check below).
    trace = json.loads((tmp_path / "prof" / "trace_rank0.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    table = dict(re.findall(r"^([a-z/]+) +([0-9.]+) +[0-9.]+% +\d+$", out, re.M))
    assert set(table) == {"matmul", "attention", "copies/casts", "optimizer", "elementwise",
                          "norms", "communication", "other"}, out
    total = float(re.search(r"^total +([0-9.]+)", out, re.M).group(1))
    assert float(table["matmul"]) > 0 and abs(sum(map(float, table.values())) - total) < 0.05
    assert re.search(r"copy calls: copy_ \d+, to \d+, _to_copy \d+, cat \d+", out)
    # the planner's prediction first, the measured figures next to it at the end
    assert out.startswith("planner: peak ") and "measured vs planner: peak " in out

    # One command line, three ways to call it: python -m megalite.train, and megalite-train
    # reading the effective configuration the run above wrote beside its metrics.
    module, _ = run(tmp_path, "module", "--steps", "4", command=[sys.executable, "-m",
                                                                   "megalite.train"])
    effective = tmp_path / "single.config.toml"
    assert 'profile = "prof"' in effective.read_text()
    script, _ = run(tmp_path, "script", "--config", str(effective), common=[],
                    command=[str(Path(sys.executable).parent / "megalite-train")])
    assert losses(module) == losses(script) == losses(single)

    # tp=2, pp=2 on 4 processes: the single-process losses; save at step 2, then at 4.
    # The distributed optimizer at dp=1 runs and says it shards nothing.
    tp2pp2, out = run(tmp_path, "tp2pp2", "--tp", "2", "--pp", "2", "--steps", "4",
                      "--save", "ckpt", "--save-every", "2", "--distributed-optimizer",
                      *evaluation, nproc=4)
    assert out.count("dp=1 shards nothing") == 1, out
    for step, loss in losses(single).items():
        assert abs(losses(tp2pp2)[step] - loss) < 1e-4, (step, loss, losses(tp2pp2)[step])
    # Validation at step 3 and at the end; the same model state (step 4's checkpoint) gives
    # the plain forward's loss, and the layouts agree as their training losses do.
    for rows in (single, tp2pp2):
        assert [r["step"] for r in rows if "val_loss" in r] == [3, 4]
        assert all(abs(r["val_ppl"] - math.exp(r["val_loss"])) < 1e-6 * r["val_ppl"]
                   for r in rows if "val_loss" in r)
    batches = heldout_batches([30720], [1.0], 8, 2)  # the corpus's first 16 samples of 32
    plain = plain_validation_loss(tmp_path / "ckpt" / "step_00000004", default_corpus_path(),
                                  batches)
    assert abs(tp2pp2[-1]["val_loss"] - plain) <= 1e-5, (tp2pp2[-1], plain)
    assert abs(single[-1]["val_loss"] - tp2pp2[-1]["val_loss"]) < 1e-4
    assert "validation at step 3: loss " in out

    # Interrupted after step 4 but last saved at 2, resumed in another layout (pp=2, dp=2)
    # without the distributed optimizer, reducing gradients after the backward: same curve,
    # and the metrics file holds each step once.
    shutil.rmtree(tmp_path / "ckpt" / "step_00000004")
    cut_off = '{"step": 5, "loss": 2.'        # the dying run stopped mid-line
    (tmp_path / "resumed.jsonl").write_text((tmp_path / "tp2pp2.jsonl").read_text() + cut_off)
    resumed, out = run(tmp_path, "resumed", "--pp", "2", "--steps", "4", "--load", "ckpt",
                       "--no-overlap-grad-reduce", nproc=4)
    assert "resumed from" in out
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    resumed = resumed[2:]
    for row in resumed:
        assert abs(row["loss"] - losses(single)[row["step"]]) < 1e-4

    # Sampling from that checkpoint gives the same text at tp=1 and tp=2 (greedy).
    gen = [sys.executable, str(ROOT / "examples" / "generate.py"), "--load", "ckpt",
           "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    texts = []
    for prefix in ([], [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(29600 + os.getpid() % 1000)]):
        cmd = prefix + gen[1:] + ["--tp", "2"] if prefix else gen
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        texts.append(proc.stdout.split("\n", 1)[1])
    assert texts[0] == texts[1] and texts[0].startswith("def ") and len(texts[0]) > 10

    # Exact resume in one process (the lr schedule spans --steps 4 in both halves).
    run(tmp_path, "first_half", "--steps", "4", "--exit-after", "2", "--save", "half")
    second, _ = run(tmp_path, "second_half", "--steps", "4", "--load", "half")
    assert losses(second) == {s: losses(single)[s] for s in (3, 4)}


def test_trace_and_verbose_p2p(tmp_path):
    _, out = run(tmp_path, "traced", "--pp", "2", "--steps", "1", "--trace", "trace",
                 "--verbose-p2p", "--schedule", "gpipe", nproc=2)
    assert "[rank 0] send 0F0 -> rank 1" in out and "[rank 1] recv 1F0 <- rank 0" in out
    events = json.loads((tmp_path / "trace" / "timeline.json").read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["name"] for e in events}
    assert {"0F0", "0B3", "1F3", "1B0"} <= names
    assert (tmp_path / "trace" / "timeline.png").stat().st_size > 1000


def test_schedules_virtual_stages_and_schedule_files(tmp_path):
    from megalite.pipeline import build_schedule, save_schedule
    W1 = ("--warmup", "1")  # runs of different --steps then share their first lrs
    single, _ = run(tmp_path, "single", "--steps", "4", *W1)
    # Interleaved, 2 stages per rank, at pp=2: the single-process curve; saved at step 2.
    inter, out = run(tmp_path, "inter", "--pp", "2", "--schedule", "interleaved-1f1b",
                     "--virtual-stages", "2", "--steps", "2", "--save", "ckpt", *W1, nproc=2)
    assert "interleaved-1f1b (2 stages per rank)" in out
    # Checkpoints stay layout-free: resume the v=2 run at tp=2 pp=1, and at zbv (V placement).
    # (with activation recomputation, which changes no number)
    resumed, _ = run(tmp_path, "resumed", "--tp", "2", "--steps", "4", "--load", "ckpt",
                     "--recompute", "selective", *W1, nproc=2)
    zbv, out = run(tmp_path, "zbv", "--pp", "2", "--schedule", "zbv", "--steps", "4",
                   "--load", "ckpt", "--trace", "trace", "--recompute", "full",
                   "--recompute-layers", "1", *W1, nproc=2)
    assert "recompute full (first 1 layers of each stage)" in out
    for rows in (inter, resumed[2:], zbv[2:]):
        for row in rows:
            assert abs(row["loss"] - losses(single)[row["step"]]) < 1e-4, (row, single)
    names = {e["name"] for e in json.loads((tmp_path / "trace" / "timeline.json").read_text())}
    assert {"0F0", "3I0", "3W0", "1I3", "2W3"} <= names  # zbv's split backward, traced
    # A user's table: zb-h1 written to a CSV file, run from it.
    save_schedule(build_schedule("zb-h1", 2, 4), tmp_path / "mine.csv")
    from_file, _ = run(tmp_path, "file", "--pp", "2", "--schedule-file", "mine.csv",
                       "--steps", "2", *W1, nproc=2)
    assert losses(from_file) == pytest.approx({s: losses(single)[s] for s in (1, 2)}, abs=1e-4)


def test_bad_schedule_flags_fail_before_any_process_group(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "two.json").write_text('{"0": ["0F0", "0B0"], "1": ["1F0", "1B0"]}')
    (tmp_path / "bad.csv").write_text("0F0,0F1,0B1\n")
    for flags, message in (
            (["--schedule-file", "two.json"], "it has 2 rows \\(ranks\\) but the pipeline has 1"),
            (["--schedule-file", "bad.csv"], "stage 0 has no F for microbatches \\[2, 3\\]"),
            (["--schedule-file", "none.json"], "cannot read schedule file"),
            (["--schedule", "1f1b", "--virtual-stages", "2"], "1f1b runs 1 stage"),
            (["--schedule", "interleaved-1f1b", "--virtual-stages", "1"],
             "needs virtual stages >= 2"),
            (["--schedule", "zbv", "--recompute", "full", "--recompute-layers", "3"],
             r"--recompute-layers 3 exceeds the layers of a stage: tiny's 4 layers over 2 "
             r"stages are \[2, 2\] per stage; use --recompute-layers <= 2")):
        proc = subprocess.run([sys.executable, SCRIPT, "--steps", "1", "--global-batch-size",
                               "8", "--micro-batch-size", "2", *flags], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode != 0, flags
        assert re.search(message, proc.stderr), (flags, proc.stderr[-2000:])
        assert "initialize" not in proc.stderr  # raised before the process group starts


def test_bad_batch_sizes_fail_clearly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, "--global-batch-size", "7",
                           "--micro-batch-size", "2", "--steps", "1"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "must be a multiple of --micro-batch-size" in proc.stderr


def test_bad_arguments_fail_with_a_clear_message():
    spec = importlib.util.spec_from_file_location("pretrain_gpt", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv, message in ((["--micro-batch-size", "0"], "--micro-batch-size: must be an "
                                                        "integer >= 1, got 0"),
                          (["--steps", "-3"], "--steps: must be an integer >= 1"),
                          (["--save-every", "-1"], "--save-every: must be an integer >= 0"),
                          (["--lr", "-0.1"], "--lr: must be a number >= 0, got -0.1"),
                          (["--lr", "nan"], "--lr: must be a number >= 0, got nan"),
                          (["--weight-decay", "-1"], "--weight-decay: must be a number >= 0"),
                          (["--clip-grad", "-1"], "--clip-grad: must be a number >= 0"),
                          (["--warmup", "-1"], "--warmup: must be an integer >= 0"),
                          (["--dropout", "1"], "--dropout: must be a number in [0, 1), got 1"),
                          (["--min-lr-ratio", "1.5"], "--min-lr-ratio: must be a number in "
                                                      "[0, 1], got 1.5")):
        with pytest.raises(ValueError) as error:  # UsageError: run_cli prints it once
            script.parse_args(argv)
        assert message in str(error.value)
    for argv, world, message in (
            (["--recompute", "selective", "--recompute-layers", "1"], 1,
             "--recompute-layers 1 applies to full recompute: add --recompute full"),
            (["--recompute-layers", "1"], 1, "add --recompute full \\(it is none\\)"),
            (["--pp", "4", "--recompute", "full", "--recompute-layers", "2"], 4,
             r"over 4 stages are \[1, 1, 1, 1\] per stage; use --recompute-layers <= 1")):
        with pytest.raises(ValueError, match=message):  # before any process group
            script.check_args(script.parse_args(argv), world_size=world)
    for argv, message in (
            (["--eval-interval", "5"], "--eval-interval needs held-out data: --eval-split"),
            (["--eval-split", "0.1"], "--eval-split needs --eval-interval N"),
            (["--eval-interval", "0", "--eval-split", "0.00001"],
             "holds out 0; give a fraction that holds out at least one sample"),
            (["--eval-interval", "0", "--eval-split", "0.01", "--eval-iters", "8"],
             r"--eval-iters 8 x --global-batch-size 16 needs 128 held-out samples of \S+corpus "
             "but it has 76"),
            (["--eval-interval", "0", "--eval-split", "0.1", "--eval-data", "x"],
             "give one of --eval-split"),
            # blends (an unknown prefix in a blend: test_faults.py, through the exit code)
            (["--data", "0.5", "a", "0.5"], "--data: give one PREFIX or WEIGHT PREFIX pairs, "
                                            "got 3 values"),
            (["--data", "-1", "a", "2", "b"], "--data: weight -1 of 'a' must be a positive "
                                              "number"),
            (["--data", "a", "1", "b", "2"], "--data: expected a weight before '1', got 'a'")):
        with pytest.raises(ValueError, match=message):
            script.check_args(script.parse_args(argv), world_size=1)
    # Several stages per rank at pp=1 (zbv's V, interleaving) run, and say what they do.
    args = script.parse_args(["--schedule", "zbv"])
    note = schedule_note(args, script.check_args(args, world_size=1))
    assert note.startswith("note: zbv at --pp 1 runs the model as 2 stages"), note
    args = script.parse_args(["--schedule", "zbv", "--pp", "2"])
    assert schedule_note(args, script.check_args(args, world_size=2)) is None
    args = script.parse_args(["--global-batch-size", "6", "--micro-batch-size", "4"])
    with pytest.raises(ValueError, match="multiple of --micro-batch-size x dp = 4 x 1"):
        script.check_batch_sizes(args, dp=1)


def test_config_files(tmp_path):
    """Keys are flag names with - or _, values go through the flags' checks, the command
    line wins, unknown keys are refused by name."""
    from megalite.training.cli import parse_args
    config = tmp_path / "run.toml"
    config.write_text('seq-len = 64\nglobal_batch_size = 16\nsequence-parallel = true\n'
                      'lr = 1e-3\nschedule = "gpipe"\n')
    args = parse_args(["--config", str(config), "--seq-len", "32"])
    assert (args.seq_len, args.global_batch_size, args.sequence_parallel, args.lr,
            args.schedule) == (32, 16, True, 1e-3, "gpipe")
    assert parse_args([]).seq_len == 128
    for text, message in (("seq-len = 64\nbogus = 1\nother_key = 2\n",
                           "unknown key(s) bogus, other_key"),
                          ("lr = -1\n", "argument --lr: must be a number >= 0, got -1"),
                          ("steps = [1, 2]\n", "steps = [1, 2]: --steps takes one value"),
                          ("seq-len = \n", "--config")):
        config.write_text(text)
        with pytest.raises(ValueError) as error:  # UsageError: one line, exit 2
            parse_args(["--config", str(config)])
        assert message in str(error.value), str(error.value)


def test_the_written_config_reruns_without_one_launch_flags(tmp_path):
    """A run's effective config.toml leaves out --no-resume (rerun, it would delete the
    run's checkpoints), --exit-after and --layout (it records the layout chosen); reading it
    back gives the same flags otherwise. Layout flags cannot be abbreviated past --layout
    auto's conflict check."""
    from megalite.training.cli import parse_args
    from megalite.training.config_file import effective_config
    args = parse_args(["--save", str(tmp_path / "run"), "--no-resume", "--exit-after", "3",
                       "--seq-len", "64", "--lr", "1e-3", "--tp", "2"])
    config = tmp_path / "config.toml"
    config.write_text(effective_config(args))
    text = config.read_text()
    assert "no-resume" not in text and "exit-after" not in text, text
    again = parse_args(["--config", str(config)])
    assert (again.no_resume, again.exit_after) == (False, None)
    skip = {"config", "no_resume", "exit_after"}
    assert {k: v for k, v in vars(again).items() if k not in skip} == \
        {k: v for k, v in vars(args).items() if k not in skip}
    with pytest.raises(ValueError, match="unrecognized arguments: --micro"):
        parse_args(["--layout", "auto", "--micro", "4"])
