"""FSDP (torch's fully_shard over the dp group) trains the single-process model on gloo.

One world of 4 runs, in sequence: dp = 4; tp = 2 x dp = 2 (sequence parallel); pp = 2 x
dp = 2 with 1F1B, interleaved 1F1B (full recompute, gradients reduced once a step, blocks
kept gathered from forward to backward) and the split backward of zbv; each against the
same model trained in one process (fp32, 3 steps: losses, grad norms, final weights
<= 1e-5). Then the bytes a rank holds per parameter at dp = 4 in fp32 and bf16 (and the
bf16 loss near the fp32 one), checkpoints between FSDP and non-FSDP layouts in both
directions (AdamW state included), and the trainer's --fsdp beside the same run without it.
"""
import types

import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState, fsdp
from megalite.parallel.sharding import gather_full
from megalite.pipeline import build_schedule, rank_stages
from megalite.training.checkpoint import load_checkpoint, save_checkpoint
from megalite.training.cli import check_fsdp
from megalite.training.errors import UsageError
from megalite.training.optim import build_optimizer, build_scheduler
from world import run_world

CFG = GPTConfig(vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch")
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 8, 1, 8, 3
_REFERENCE = {}


def _batches(steps=STEPS, seed=7):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        data = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
        yield data[:, :-1], data[:, 1:]


def _build(cfg, ps, schedule, use_fsdp, param_dtype=None, **options):
    torch.manual_seed(0)
    table = build_schedule(schedule, ps.pp, GLOBAL_BATCH // (MICRO_BATCH * ps.dp))
    placement = rank_stages(table)
    model = GPT(cfg, state=ps, stages=placement[ps.pp_rank],
                num_stages=sum(map(len, placement.values())))
    if use_fsdp:
        fsdp.fully_shard_model(model, ps, param_dtype=param_dtype, **options)
    return model, table


def _whole(model, ps):
    """Every parameter of this rank's stages as the full tp = 1 tensor."""
    return {n: gather_full(p, ps, fsdp.full_tensor(p.detach())).clone()
            for n, p in model.named_parameters()}


def _steps(model, opt, table, ps, batches, dtype="fp32"):
    from megalite.training.step import train_step
    per_rank = GLOBAL_BATCH // ps.dp
    out = []
    for tokens, targets in batches:
        mine = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
        r = train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH,
                       schedule=table, max_grad_norm=0.5, dtype=dtype)
        out.append((r.loss, r.grad_norm))
    return out


def _train(cfg, ps, schedule, use_fsdp, dtype="fp32", **options):
    model, table = _build(cfg, ps, schedule, use_fsdp,
                          torch.bfloat16 if dtype == "bf16" else None, **options)
    # SGD: Adam would turn float-reassociation noise in tiny gradients into lr-sized steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return _steps(model, opt, table, ps, _batches(), dtype), _whole(model, ps), model, opt


def _reference(cfg):
    key = (cfg.tie_embeddings,)
    if key not in _REFERENCE:
        _REFERENCE[key] = _train(cfg.replace(recompute="none"), ParallelState(), "1f1b",
                                 False)[:2]
    return _REFERENCE[key]


def check_exact(tp, pp, schedule, cfg, **options):
    ps = parallel.initialize(tp=tp, pp=pp)
    records, weights, model, _ = _train(cfg, ps, schedule, True, **options)
    ref_records, ref_weights = _reference(cfg)
    where = f"(tp={tp}, pp={pp}, dp={ps.dp}, {schedule}, tied={cfg.tie_embeddings}, {options})"
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), where
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(records, ref_records)):
        assert abs(loss - ref_loss) <= 1e-5, f"step {step} loss {loss} != {ref_loss} {where}"
        assert abs(norm - ref_norm) <= 1e-5, f"step {step} norm {norm} != {ref_norm} {where}"
    for name, w in weights.items():
        err = (w - ref_weights[name]).abs().max().item()
        assert err <= 1e-5, f"{name} off by {err:.2e} after {STEPS} steps {where}"
    parallel.destroy()


def bytes_per_param(dtype):
    """dp = 4: a rank holds a quarter of every parameter, gradient and AdamW moment (fp32
    shards in both modes: bf16 changes only the gathered copies)."""
    ps = parallel.initialize(tp=1, pp=1)
    model, table = _build(CFG, ps, "1f1b", True, torch.bfloat16 if dtype == "bf16" else None)
    opt = build_optimizer(model, lr=1e-3)
    (loss, _), = _steps(model, opt, table, ps, _batches(1), dtype)
    n = sum(p.numel() for p in model.parameters())
    held = fsdp.local_bytes(model, opt)
    total = parallel.comm.all_reduce(torch.tensor([held["params"]]), ps.dp_group).item()
    assert total == 4 * n  # the shards are disjoint and cover every parameter
    slack = 4 * sum(p.shape[0] for p in model.parameters())  # uneven dim-0 chunks
    for kind, per_param in (("params", 4), ("grads", 4), ("optimizer", 8)):
        assert abs(held[kind] - per_param * n / ps.dp) <= per_param / 4 * slack, (kind, held)
    parallel.destroy()
    return {k: v / n for k, v in held.items()}, loss


def check_checkpoints(tmp):
    """FSDP (pp = 2, dp = 2) saves; a non-FSDP layout (tp = 2, pp = 2) loads it and both
    continue alike; an FSDP dp = 4 run loads the non-FSDP checkpoint back."""
    cfg = CFG.replace(tie_embeddings=True)
    batches = list(_batches(3, seed=11))

    def run(tp, pp, use_fsdp, load=None, save=None, steps=()):
        ps = parallel.initialize(tp=tp, pp=pp)
        model, table = _build(cfg, ps, "1f1b", use_fsdp)
        opt = build_optimizer(model, lr=1e-2)
        sched = build_scheduler(opt, 1, 10)
        sampler = types.SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda s: None)
        if load:
            load_checkpoint(load, model, opt, sched, sampler)
        losses = _steps(model, opt, table, ps, [batches[i] for i in steps])
        for _ in steps:
            sched.step()
        if save:
            save_checkpoint(save, len(steps) + (1 if load else 0), model, opt, sched, sampler)
        state = {n: gather_full(p, ps, fsdp.full_tensor(opt.state[p]["exp_avg"])).clone()
                 for n, p in model.named_parameters()}
        weights = _whole(model, ps)
        parallel.destroy()
        return losses, weights, state

    _, saved_w, saved_m = run(1, 2, True, save=f"{tmp}/fsdp", steps=(0,))
    plain_losses, plain_w, plain_m = run(2, 2, False, load=f"{tmp}/fsdp",
                                         save=f"{tmp}/plain", steps=(1,))
    fsdp_losses, fsdp_w, _ = run(1, 2, True, load=f"{tmp}/fsdp", steps=(1,))
    assert abs(plain_losses[0][0] - fsdp_losses[0][0]) <= 1e-5, (plain_losses, fsdp_losses)
    for name, w in plain_w.items():
        assert (w - fsdp_w[name]).abs().max() <= 1e-5, name
    _, back_w, back_m = run(1, 1, True, load=f"{tmp}/plain")  # FSDP dp = 4, no step
    for name, w in back_w.items():  # the stage-0 rank of pp = 2 holds a subset of the names
        if name in plain_w:
            assert torch.equal(w, plain_w[name]) and torch.equal(back_m[name], plain_m[name])
    return True


def check_trainer(tmp):
    """The command line's --fsdp: the trainer shards the model, evaluates, saves, exports a
    Hugging Face directory, and trains the losses of the same run without --fsdp; both
    exports hold the same weights."""
    import json
    import os
    from megalite.training import Trainer, parse_args
    flags = ["--pp", "2", "--seq-len", "16", "--global-batch-size", "4", "--micro-batch-size",
             "1", "--steps", "2", "--lr", "3e-4", "--warmup", "1", "--seed", "3",
             "--eval-interval", "2", "--eval-iters", "1", "--eval-split", "0.05"]
    rows = {}
    for sharded in (True, False):
        out = os.path.join(tmp, f"metrics_{sharded}.jsonl")
        extra = ["--fsdp", "--save", os.path.join(tmp, "run")] if sharded else []
        extra += ["--export-hf", os.path.join(tmp, f"hf_{sharded}")]
        assert Trainer(parse_args(flags + extra + ["--metrics-out", out])).run() == 0
        with open(out) as f:
            rows[sharded] = [json.loads(line) for line in f]
    assert abs(rows[True][0]["loss"] - rows[False][0]["loss"]) <= 1e-5, rows
    assert abs(rows[True][1]["val_loss"] - rows[False][1]["val_loss"]) <= 1e-4, rows
    with open(os.path.join(tmp, "run", "step_00000002", "meta.json")) as f:
        assert json.load(f)["layout"]["fsdp"] is True
    from safetensors.torch import load_file
    exported = [load_file(os.path.join(tmp, f"hf_{s}", "model.safetensors")) for s in (True, False)]
    assert exported[0].keys() == exported[1].keys()
    for name, w in exported[0].items():
        assert (w - exported[1][name]).abs().max() <= 1e-5, name


def _world(rank, world, tmp):
    check_exact(1, 1, "1f1b", CFG.replace(tie_embeddings=True))           # dp = 4
    check_exact(2, 1, "1f1b", CFG.replace(sequence_parallel=True))        # tp 2 x dp 2
    check_exact(1, 2, "1f1b", CFG.replace(tie_embeddings=True))           # tied across stages
    check_exact(1, 2, "interleaved-1f1b", CFG.replace(recompute="full"),  # 2 stages per rank
                reduce_every_microbatch=False, reshard_after_forward=False)
    check_exact(1, 2, "zbv", CFG.replace(tie_embeddings=True))            # split I/W backward
    (figures, loss), (figures16, loss16) = (bytes_per_param(d) for d in ("fp32", "bf16"))
    assert abs(loss16 - loss) < 2e-2 * loss, (loss16, loss)  # bf16 compute, same model
    check_checkpoints(tmp)
    check_trainer(tmp)
    return {"fp32": figures, "bf16": figures16}


def test_fsdp_trains_like_one_process_and_checkpoints_across_layouts(tmp_path):
    results = run_world(4, _world, str(tmp_path), timeout=600)
    for figures in results:
        for dtype in ("fp32", "bf16"):  # 16 bytes per parameter / dp = 4
            assert sum(figures[dtype].values()) == pytest.approx(4.0, abs=0.5), figures


def test_fsdp_flag_combinations_are_refused_before_any_group():
    base = dict(fsdp=True, distributed_optimizer=False, dtype="fp32")
    check_fsdp(types.SimpleNamespace(**base), 2)
    for change, words in ((dict(distributed_optimizer=True), "drop --distributed-optimizer"),
                          (dict(dtype="fp16"), "use --dtype bf16"),
                          (dict(cp=2), "with --cp 1"), (dict(ep=2), "with --ep 1")):
        with pytest.raises(UsageError, match=words):
            check_fsdp(types.SimpleNamespace(**{**base, **change}), 2)
    with pytest.raises(UsageError, match="torchrun --nproc-per-node"):
        check_fsdp(types.SimpleNamespace(**base), 1)
    with pytest.raises(ValueError, match="launch several processes"):  # no process group
        fsdp.fully_shard_model(GPT(CFG, state=ParallelState()), ParallelState())
    # and through the command line's own checks, before anything starts
    from megalite.training.cli import check_args, parse_args
    with pytest.raises(UsageError, match="drop --distributed-optimizer"):
        check_args(parse_args(["--fsdp", "--distributed-optimizer", "--steps", "1"]), 2)
    # MoE experts reduce over expert-dp, not FSDP's group: refused (command line, library)
    with pytest.raises(UsageError, match="--fsdp does not shard MoE experts"):
        check_args(parse_args(["--fsdp", "--model", "tiny-moe", "--steps", "1"]), 2)
    with pytest.raises(ValueError, match="FSDP does not shard MoE experts"):
        fsdp.fully_shard_model(GPT(GPTConfig.preset("tiny-moe"), state=ParallelState()),
                               ParallelState())
    # bf16 under --fsdp: fp32 shards, and the stages autocast to bf16 (FSDP gathers bf16)
    from megalite.training.cli import autocast_dtype
    args = parse_args(["--fsdp", "--dtype", "bf16", "--steps", "1"])
    assert check_args(args, 2).cfg.params_dtype == "fp32" and autocast_dtype(args) == "bf16"
