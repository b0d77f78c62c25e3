"""The planner's search, CLI, step-time model and the formulas of features other branches
build (distributed optimizer, recompute, fused loss): structure checks against independent
counts (GPTConfig.num_params, the schedule simulator), no processes."""
import pytest

from megalite.models import GPTConfig
from megalite.plan import Layout, invalid_reason, memory
from megalite.plan.__main__ import main
from megalite.plan.gpus import get_gpu
from megalite.plan.memory import _live_states_walk
from megalite.plan.speed import _makespan, _simulate, step_time

GIB = 2**30


def test_presets_have_llama2_shapes():
    # published sizes: 6.74B, 13.0B, 69.0B
    for name, billions in (("llama-7b", 6.74), ("llama-13b", 13.02), ("llama-70b", 68.98)):
        assert abs(GPTConfig.preset(name).num_params() / 1e9 - billions) < 0.01, name


def test_parameters_over_ranks_add_up_to_the_model():
    cfg = GPTConfig.preset("llama-7b")
    for tp, pp, schedule in ((1, 1, "1f1b"), (2, 4, "1f1b"), (4, 2, "interleaved-1f1b"),
                             (2, 2, "zbv")):
        m = memory(cfg, Layout(tp=tp, pp=pp, seq_len=4096, global_batch_size=8,
                               schedule=schedule))
        total = sum(r.counts["total"] for r in m.ranks) * tp
        norms = (2 * cfg.n_layers + 1) * cfg.d_model * (tp - 1)   # replicated over tp
        assert total - norms == cfg.num_params(), (tp, pp, schedule)


def test_bytes_per_parameter_distributed_optimizer_and_casts():
    cfg = GPTConfig.preset("llama-7b")
    base = Layout(tp=1, pp=1, dp=4, micro_batch_size=1, seq_len=4096, global_batch_size=8,
                  autocast=True)
    n = cfg.num_params()
    for dist, moments in ((False, 8), (True, 8 / 4)):
        r = memory(cfg, base.replace(distributed_optimizer=dist)).worst
        assert r.parameters == r.gradients == 4 * n
        assert abs(r.optimizer_state - moments * n) < 8
        assert r.weight_casts == 2 * (n - (2 * cfg.n_layers + 1) * cfg.d_model
                                      - cfg.vocab_size * cfg.d_model)  # no norm, no lookup
    assert memory(cfg, base.replace(dtype="fp32", autocast=False)).worst.weight_casts == 0


def test_recompute_and_fused_loss_shrink_activations_as_designed():
    cfg = GPTConfig.preset("llama-7b")
    base = Layout(tp=2, pp=2, micro_batch_size=1, seq_len=4096, global_batch_size=8,
                  sequence_parallel=True)
    acts = {r: memory(cfg, base.replace(recompute=r)).ranks[0].activations
            for r in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]
    half = memory(cfg, base.replace(recompute="full", recompute_layers=8)).ranks[0]
    assert acts["full"] < half.activations < acts["none"]
    last = [memory(cfg, base.replace(fused_loss=f)).ranks[1].activations for f in (0, 1)]
    # one live microbatch on the last 1F1B rank: the unfused head keeps its bf16 input, the
    # [tokens, V/tp] bf16 logits, targets and log-sum-exp; the fused one dx (fp32) and dW
    unfused = 4096 * (2 * 4096 + 2 * 32000 / 2 + 8 + 4)
    fused = 4 * 4096 * 4096 + 4 * (32000 / 2) * 4096
    assert abs(last[0] - last[1] - (unfused - fused)) < 1e3


def test_invalid_layouts_say_why():
    cfg = GPTConfig.preset("llama-70b")
    cases = {Layout(tp=16, global_batch_size=16): "does not divide n_heads",
             Layout(tp=3, global_batch_size=16): "does not divide n_heads",
             Layout(dp=3, global_batch_size=16): "not a multiple of micro-batch",
             Layout(pp=3, schedule="interleaved-1f1b", global_batch_size=16, seq_len=4096):
                 "multiple of pp=3",
             Layout(pp=1, recompute="full", recompute_layers=81, global_batch_size=1):
                 "exceeds the 80 layers",
             Layout(recompute_layers=2, global_batch_size=1): "needs recompute='full'",
             Layout(seq_len=8192, global_batch_size=1): "exceeds max_seq_len"}
    for layout, words in cases.items():
        assert words in (invalid_reason(cfg, layout) or ""), (layout, words)
        with pytest.raises(ValueError, match=words.split("=")[0]):
            memory(cfg, layout)


def test_steady_state_shortcuts_are_exact():
    """Live counts and makespans beyond the steady state equal the full walk/simulation."""
    for schedule, v in (("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4)):
        for p in (2, 4):
            walk = (lambda m: {r: set(s[1]) for r, s in
                               _live_states_walk(schedule, p, m, v, True).items()})
            assert walk(9 * p) == walk(4 * p)
            f, iw = (1.0,) * (p * v), (0.9,) * (p * v)
            exact = _simulate(schedule, p, 11 * p, v, f, iw, iw, 0.05)[0]
            assert abs(_makespan(schedule, p, 11 * p, v, f, iw, iw, 0.05)[0] - exact) < 1e-9


def test_llama1b_h200_step_time_against_the_measurement():
    """The one GPU measurement (590 ms, 47.3% MFU; matmuls ~317 ms; autocast): the
    calibration must keep reproducing it, and its matmul share."""
    cfg = GPTConfig.preset("llama-1b")
    measured = Layout(micro_batch_size=4, seq_len=2048, global_batch_size=16, autocast=True)
    t = step_time(cfg, measured, "h200")
    assert abs(t.step - 0.590) < 0.03 * 0.590, t.step
    assert abs(t.parts["matmul"] - 0.317) < 0.03 * 0.317, t.parts["matmul"]
    assert abs(t.mfu - 0.473) < 0.02
    # predicted peak vs the measured 34.7 GiB (torch.cuda.max_memory_allocated)
    m = memory(cfg, measured)
    assert abs(m.total / GIB - 34.7) < 0.10 * 34.7


def test_pipeline_bubble_and_dp_overlap_move_step_time_the_right_way():
    cfg = GPTConfig.preset("llama-7b")
    base = Layout(tp=2, pp=4, dp=1, micro_batch_size=1, seq_len=4096, global_batch_size=8)
    t1 = step_time(cfg, base, "h100")
    t2 = step_time(cfg, base.replace(schedule="interleaved-1f1b", virtual_stages=2), "h100")
    assert t2.bubble < t1.bubble and t2.step < t1.step
    dp = base.replace(pp=1, dp=4, global_batch_size=32)
    assert step_time(cfg, dp, "h100").step < step_time(
        cfg, dp.replace(overlap_grad_reduce=False), "h100").step


def test_cli_ranks_fitting_layouts_and_rejects_70b_on_one_node(capsys):
    assert main(["--model", "llama-70b", "--gpus", "8", "--gpu-memory", "80GB", "--seq-len",
                 "4096", "--global-batch-size", "64", "--top", "3"]) == 1
    out = capsys.readouterr().out
    assert "0 of " in out and "no layout fits" in out
    # the closest miss is FSDP at tp=4: 69.0e9 / 4 x 16 B / dp 2 + the working copies
    assert "does not fit: parameters + gradients + optimizer state + FSDP working copies " \
           "alone need 130.8 GiB" in out
    assert main(["--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--seq-len", "4096",
                 "--global-batch-size", "64", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert rows and "GiB" in out and "rejected:" in out
    budget = get_gpu("h100").memory / GIB
    assert float(rows[0].split("|")[7]) <= budget


def test_layout_auto_runs_what_the_planner_ranks_first(capsys):
    """A simulated world of 8 x 80 GB (no processes): the trainer's --layout auto sets
    exactly the flags of `python -m megalite.plan`'s first row and of its run-it line."""
    from megalite.training.cli import build_parser, check_args, parse_args, planned_layout

    # A trainer without --cp / --fsdp / --autocast (they arrive on their own branches) runs
    # none of them and bf16 under autocast: the planner is told the same.
    known = build_parser()._option_string_actions
    held = (["--cp", "1"] if "--cp" not in known else []) + \
        (["--no-fsdp"] if "--fsdp" not in known else []) + \
        (["--autocast"] if "--autocast" not in known else [])
    main(["--model", "llama-7b", "--gpus", "8", "--gpu-memory", "80GB", "--seq-len", "4096",
          "--global-batch-size", "128", "--rejected", "0", *held])
    out = capsys.readouterr().out
    first_row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    command = out.split("run it (or give --layout auto instead of the layout flags):\n")[1]
    command = command.splitlines()[0]
    assert command.startswith("torchrun --nproc-per-node 8 -m megalite.train --model llama-7b")
    flags = command.split(" -m megalite.train ")[1].split()
    printed = parse_args([f for f in flags if f in known or not f.startswith("--")])

    auto = parse_args(["--model", "llama-7b", "--layout", "auto", "--gpu-memory", "80GB",
                       "--seq-len", "4096", "--global-batch-size", "128", "--dtype", "bf16"])
    run = check_args(auto, 8)
    assert capsys.readouterr().out.startswith("--layout auto: ")
    assert f"| {planned_layout(auto, run.dp, run.cfg).describe()} |" in first_row, first_row
    for flag in ("tp", "pp", "micro_batch_size", "schedule", "virtual_stages",
                 "sequence_parallel", "recompute", "recompute_layers", "distributed_optimizer"):
        assert getattr(auto, flag) == getattr(printed, flag), flag


def test_launch_lines_that_torchrun_can_run(tmp_path, capsys):
    """The run-it line only names presets (the trainer's --model), and a multi-node line
    starts the same number of processes on every node or is not printed."""
    import json

    from megalite.plan.auto import launch_command
    cfg = tmp_path / "my.json"
    cfg.write_text(json.dumps(dict(vocab_size=256, n_layers=4, n_heads=4, d_model=128)))
    assert main(["--model", str(cfg), "--gpus", "2", "--gpu", "h100", "--seq-len", "128",
                 "--global-batch-size", "8", "--rejected", "0"]) == 0
    out = capsys.readouterr().out
    assert "run it" not in out and "the trainer builds presets" in out
    sixteen = launch_command("llama-7b", Layout(tp=8, pp=2, dp=1, micro_batch_size=1,
                                                seq_len=4096, global_batch_size=8), 8)
    assert sixteen.startswith("torchrun --nproc-per-node 8 --nnodes 2 ")
    with pytest.raises(ValueError, match="9 GPUs do not split evenly over 2 nodes of 8"):
        launch_command("llama-7b", Layout(tp=1, pp=1, dp=9, micro_batch_size=1, seq_len=4096,
                                          global_batch_size=9), 8)
