"""16-bit parameters with fp32 main weights (GPTConfig(params_dtype="bf16"), --dtype bf16).

One process: the optimizer's fp32 main weights after a step equal a dense fp32 AdamW
update from the same main weights and main gradients, and the parameters are those main
weights rounded; bf16 gradients reach the fp32 buffer accumulated over microbatches; a
bf16 run stopped and resumed continues exactly; checkpoints load across the modes. A world
of 4: tp2/pp2 and dp2 with the distributed optimizer against one process, and the bytes
per parameter of the real tensors against the formula at dp = 1, 2, 4.
"""
import pytest
import torch

from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.training import (build_optimizer, build_scheduler, load_checkpoint, param_groups,
                               save_checkpoint)
from megalite.training.sampler import ShardedSampler
from megalite.training.step import train_step
from world import run_world

CFG = GPTConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch", tie_embeddings=True, params_dtype="bf16")


def _batches(n, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (batch, 9), generator=g) for _ in range(n)]


def _mains(model, opt):
    """{name: fp32 main weight, whole} of this rank."""
    return {n: opt.main_weight(p).clone() for n, p in model.named_parameters()}


def test_main_weights_step_like_dense_fp32_adamw_and_params_are_them_rounded():
    torch.manual_seed(0)
    model = GPT(CFG, state=ParallelState())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    before = _mains(model, opt)
    assert all(torch.equal(before[n], p.float()) for n, p in model.named_parameters())
    # the reference: torch's own AdamW (not fused, not foreach) on fp32 copies
    ref = {n: torch.nn.Parameter(w.clone()) for n, w in before.items()}
    decay = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    groups = [{"params": [ref[n] for n, p in model.named_parameters() if id(p) in decay],
               "weight_decay": 0.1},
              {"params": [ref[n] for n, p in model.named_parameters() if id(p) not in decay],
               "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                foreach=False, fused=False)
    d = _batches(1)[0]
    # accumulation: 4 microbatches' bf16 gradients summed in fp32 (no per-microbatch cast)
    result = train_step(model, opt, d[:, :-1], d[:, 1:], micro_batch_size=2, max_grad_norm=0)
    assert all(p.grad is None for p in model.parameters() if p.dtype == torch.bfloat16)
    for n, p in model.named_parameters():
        ref[n].grad = model.main_grads.grad_view(p).clone()
    assert model.main_grads.buffers[0].data.dtype == torch.float32
    ref_opt.step()
    after = _mains(model, opt)
    for n, p in model.named_parameters():
        torch.testing.assert_close(after[n], ref[n].detach(), rtol=0, atol=1e-7, msg=n)
        assert torch.equal(p, after[n].to(p.dtype)), n  # the parameter is its main, rounded
        assert not torch.equal(after[n], before[n]), n
    assert 4.4 < result.loss < 4.7


def test_fp16_params_need_and_use_the_loss_scaler():
    from megalite.training import DynamicLossScaler
    d = _batches(1)[0]
    losses = {}
    for dtype in ("fp32", "fp16"):
        torch.manual_seed(0)
        model = GPT(CFG.replace(params_dtype=dtype), state=ParallelState())
        opt = build_optimizer(model, lr=1e-2)
        scaler = DynamicLossScaler(init_scale=2.0**10) if dtype == "fp16" else None
        if dtype == "fp16":
            with pytest.raises(ValueError, match="DynamicLossScaler"):
                train_step(model, opt, d[:, :-1], d[:, 1:], micro_batch_size=4)
        losses[dtype] = [train_step(model, opt, d[:, :-1], d[:, 1:], micro_batch_size=4,
                                    grad_scaler=scaler).loss for _ in range(2)]
    assert max(abs(a - b) for a, b in zip(losses["fp16"], losses["fp32"])) < 5e-3, losses
    assert losses["fp16"][1] < losses["fp16"][0]  # it stepped (not skipped as overflow)


def _trained(steps, cfg=CFG, ckpt=None, save_at=None, root=None, distributed=False):
    """A one-process run of ``steps`` steps (resumed from ``ckpt`` if given, saving at
    ``save_at`` into ``root``); returns (losses, model, opt)."""
    torch.manual_seed(0)
    model = GPT(cfg, state=ParallelState())
    opt = build_optimizer(model, lr=1e-2)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6)
    sampler = ShardedSampler(48, 8, 0, 1, seed=0)
    start = load_checkpoint(ckpt, model, opt, sched, sampler) if ckpt else 0
    data = _batches(6)
    losses = []
    for step in range(start, steps):
        d = data[step]
        losses.append(train_step(model, opt, d[:, :-1], d[:, 1:], micro_batch_size=2).loss)
        sched.step()
        if save_at == step + 1:
            save_checkpoint(root, step + 1, model, opt, sched, sampler)
    return losses, model, opt


def test_bf16_resume_is_exact_and_checkpoints_cross_modes(tmp_path):
    root = str(tmp_path / "bf16")
    losses, model, opt = _trained(4, save_at=2, root=root)
    resumed, model2, opt2 = _trained(4, ckpt=root)
    assert resumed == losses[2:]
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(opt.main_weight(p), opt2.main_weight(q)), n
    # bf16 checkpoint -> fp32 model: the weights are the saved fp32 main weights
    saved_mains = _mains(model, opt)  # at step 4
    save_checkpoint(root, 4, model, opt, build_scheduler(opt, 2, 6),
                    ShardedSampler(48, 8, 0, 1, seed=0))
    fp32 = GPT(CFG.replace(params_dtype="fp32"), state=ParallelState())
    fp32_opt = build_optimizer(fp32, lr=1e-2)
    load_checkpoint(root, fp32, fp32_opt)
    for n, p in fp32.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, saved_mains[n]), n
    state = opt.gathered_state(model.embed.weight)
    assert torch.equal(fp32_opt.state[fp32.embed.weight]["exp_avg"], state["exp_avg"])
    # fp32 checkpoint -> bf16 model and distributed optimizer: mains exact, params rounded
    fp32_root = str(tmp_path / "fp32")
    _, fp32_model, _ = _trained(2, cfg=CFG.replace(params_dtype="fp32"), save_at=2,
                                root=fp32_root)
    bf16 = GPT(CFG, state=ParallelState())
    with pytest.warns(UserWarning, match="shards nothing"):
        bf16_opt = build_optimizer(bf16, lr=1e-2, distributed=True)
    load_checkpoint(fp32_root, bf16, bf16_opt)
    for (n, p), q in zip(bf16.named_parameters(), fp32_model.parameters()):
        assert torch.equal(bf16_opt.main_weight(p), q.detach()), n
        assert torch.equal(p, q.detach().to(p.dtype)), n


# ------------------------------------------------------------------ world of 4

def _world(rank, world):
    from megalite import parallel
    from megalite.parallel.sharding import gather_full
    from megalite.training.state_bytes import expected_bytes_per_param, measure
    data = _batches(3)

    def run(ps, distributed=False, steps=3):
        """``steps`` steps; the losses and the whole main weights after each step."""
        torch.manual_seed(0)
        model = GPT(CFG, state=ps)
        with pytest.warns(UserWarning) if distributed and ps.dp == 1 and ps.rank == 0 \
                else _nothing():
            opt = build_optimizer(model, lr=1e-2, distributed=distributed)
        per = 8 // ps.dp
        mine = slice(ps.dp_rank * per, (ps.dp_rank + 1) * per)
        losses, mains = [], []
        for d in data[:steps]:
            losses.append(train_step(model, opt, d[mine, :-1], d[mine, 1:],
                                     micro_batch_size=2).loss)
            mains.append({n: gather_full(p, ps, opt.main_weight(p)).clone()
                          for n, p in model.named_parameters()})
        return losses, mains, model, opt

    torch.manual_seed(0)
    init = {n: p.detach().float() for n, p in GPT(CFG, state=ParallelState()).named_parameters()}
    ref_losses, ref_mains, _, _ = run(ParallelState())
    errors = {}
    for name, kw, distributed in (("tp2 pp2", dict(tp=2, pp=2), False),
                                  ("dp2 pp2 distributed", dict(tp=1, pp=2, dp=2), True)):
        ps = parallel.initialize(**kw)
        losses, mains, _, _ = run(ps, distributed)
        # Relative error of the update ||w - w_ref|| / ||w_ref - w0|| after each step. At
        # pp = 2 the tied embedding's two gradients add in fp32 (the main-gradient buffers)
        # where one process adds them in bf16 (autograd, one leaf used twice); Adam moves an
        # element ~lr whatever its gradient's size, so where the two nearly cancel it may
        # step the other way; from step 2 on bf16 rounding spreads it. tp also sums bf16
        # partial products in another order.
        rel = lambda m, ref, names: max(  # noqa: E731
            ((m[n] - ref[n]).norm() / (ref[n] - init[n]).norm()).item() for n in names)
        untied = [n for n in mains[0] if n != "embed.weight"]
        errors[name] = [rel(m, ref, m) for m, ref in zip(mains, ref_mains)]
        errors[name + " untied step 1"] = rel(mains[0], ref_mains[0], untied)
        errors[name + " loss"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
        parallel.destroy()
    # bytes per parameter on the real tensors vs the formula, dp = 1, 2, 4
    table = {}
    for tp, pp, dp in ((2, 2, 1), (1, 2, 2), (1, 1, 4)):
        for distributed in (False, True):
            ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
            _, _, model, opt = run(ps, distributed, steps=1)
            row = measure(model, opt)
            got = row["total"] / row["params"]
            want = expected_bytes_per_param(model, distributed, dp)
            padding = sum(len(b.buckets) for b in model.main_grads.buffers) * dp * 16
            assert want - 1e-9 <= got <= want + padding / row["params"], (dp, distributed,
                                                                          got, want)
            table[(dp, distributed)] = got
            parallel.destroy()
    return errors, table


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_bf16_layouts_track_one_process_and_bytes_per_param():
    results = run_world(4, _world, timeout=600)
    for errors, table in results:
        print(errors)
        assert errors["tp2 pp2 loss"] < 1e-2, errors
        assert errors["dp2 pp2 distributed loss"] < 1e-3, errors
        # dp: the gradient path is exact (fp32 buffers, fp32 reduction)
        assert errors["dp2 pp2 distributed untied step 1"] < 1e-5, errors
        assert max(errors["tp2 pp2"]) < 0.2 and max(errors["dp2 pp2 distributed"]) < 0.1, errors
        # AdamW, bf16: 2 + 4 + 12/dp (distributed), 18 plain (norm weights are fp32: 16)
        assert abs(table[(4, True)] - (2 + 4 + 12 / 4)) < 0.1, table
        assert abs(table[(1, False)] - 18) < 0.1, table


def test_dtype_flags_choose_the_mode_before_anything_starts():
    from megalite.training import UsageError, check_args, parse_args
    from megalite.training.cli import autocast_dtype
    plan = check_args(parse_args(["--dtype", "bf16"]), 1)
    assert plan.cfg.params_dtype == "bf16" and autocast_dtype(parse_args(["--dtype", "bf16"])) \
        == "fp32"
    args = parse_args(["--dtype", "bf16", "--autocast"])
    assert check_args(args, 1).cfg.params_dtype == "fp32" and autocast_dtype(args) == "bf16"
    with pytest.raises(UsageError, match="--autocast needs --dtype bf16 or fp16"):
        check_args(parse_args(["--autocast"]), 1)
