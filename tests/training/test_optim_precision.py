"""Optimizer groups, learning-rate schedule and the fp16 loss scaler (mixed precision:
test_mixed_precision.py)."""
import math

import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training.optim import build_optimizer, build_scheduler, lr_lambda
from megalite.training.precision import DynamicLossScaler
from megalite.training.step import train_step

CFG = GPTConfig(vocab_size=64, n_layers=2, n_heads=2, d_model=16, d_ff=32, max_seq_len=8,
                kernels="torch")


def _model_and_batch(cfg=CFG):
    parallel.destroy()
    torch.manual_seed(0)
    model = GPT(cfg)
    data = torch.randint(0, cfg.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    return model, data[:, :-1], data[:, 1:]


def test_no_weight_decay_on_norms_biases_embeddings():
    model, _, _ = _model_and_batch(CFG.replace(bias=True, position="learned",
                                               norm="layernorm"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert all(".weight" in n and "norm" not in n and "embed" not in n for n in decayed)
    assert {"embed.weight", "pos_embed", "final_norm.weight", "final_norm.bias",
            "layers.0.attn.qkv.bias"} <= plain
    assert decayed | plain == set(names.values())
    with_emb = build_optimizer(model, lr=1e-3, decay_embeddings=True)
    assert any(p is model.embed.weight for p in with_emb.param_groups[0]["params"])


def test_fused_adamw_follows_torch_reference_adamw():
    """build_optimizer's default (torch's fused AdamW, on the CPU too) against the
    single-tensor torch AdamW over 6 training steps of a small GPT with real gradients.

    Tolerance 1e-6 absolute/1e-5 relative on fp32 weights (~0.02 in size): the fused
    kernel computes the same formulas in another operation order (and with fused
    multiply-adds), so the weights differ by float rounding, a few ulps per step, never by
    a step's update (lr 1e-2 here, i.e. changes of ~1e-2 per step)."""
    model, tokens, targets = _model_and_batch()
    ref, _, _ = _model_and_batch()
    opt = build_optimizer(model, lr=1e-2)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    ref_opt = build_optimizer(ref, lr=1e-2, fused=False)
    assert not ref_opt.defaults["fused"] and not ref_opt.defaults["foreach"]
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for _ in range(6):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m.loss(m(tokens), targets).backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
        assert (q - start[n]).abs().max() > 1e-3, f"{n} did not train"
    assert list(opt.state_dict()["state"][0]) == list(ref_opt.state_dict()["state"][0])
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert build_optimizer(bf16, lr=1e-3).defaults["fused"]
    with pytest.raises(ValueError, match="fused=None"):
        build_optimizer(torch.nn.Linear(2, 2, device="meta"), lr=1e-3, fused=True)


def test_warmup_then_cosine_and_linear():
    f = lr_lambda(warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = lr_lambda(10, 110, "linear", 0.0)
    assert g(60) == pytest.approx(0.5) and g(110) == pytest.approx(0.0)
    model, _, _ = _model_and_batch()
    opt = build_optimizer(model, lr=2.0)
    sched = build_scheduler(opt, 10, 110)
    for _ in range(10):
        opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f(10))
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        lr_lambda(1, 2, "exp")


def test_fp16_scaler_skips_an_overflowing_step_and_recovers():
    model, tokens, targets = _model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = DynamicLossScaler(init_scale=2.0**200, growth_interval=2)  # inf in fp32 too
    result = train_step(model, opt, tokens, targets, micro_batch_size=2, grad_scaler=scaler)
    assert result.skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "step not skipped"
    assert scaler.scale_value == 2.0**199
    scaler.scale_value = 2.0**8
    result = train_step(model, opt, tokens, targets, micro_batch_size=2, grad_scaler=scaler)
    assert not result.skipped and math.isfinite(result.loss)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # The unscaled loss and gradients are those of an unscaled step.
    ref, _, _ = _model_and_batch()
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0)
    plain = train_step(ref, ref_opt, tokens, targets, micro_batch_size=2, max_grad_norm=0)
    scaled = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), tokens, targets,
                        micro_batch_size=2, grad_scaler=scaler, max_grad_norm=0)
    assert scaled.loss == pytest.approx(plain.loss, rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    scaler.update(found_inf=False)
    assert scaler.scale_value == 2.0**9  # grew after growth_interval clean steps
    with pytest.raises(ValueError, match="DynamicLossScaler"):
        train_step(model, opt, tokens, targets, micro_batch_size=2, dtype="fp16")


def test_loss_scale_follows_the_dynamic_scaling_rule():
    """The documented rule, step by step: double after every ``growth_interval`` clean steps
    in a row, halve on an overflow (never below ``min_scale``) and count again from there.
    Defaults as torch's own GradScaler (start 2^16, x2, x0.5). Mutants this kills: growing
    only at the first interval (``clean_steps - interval == 0``), a default start of 1."""
    torch_scaler = torch.amp.GradScaler("cpu")
    default = DynamicLossScaler()
    assert (default.scale_value, default.growth, default.backoff) == (
        torch_scaler.get_scale(), torch_scaler.get_growth_factor(),
        torch_scaler.get_backoff_factor())
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=1.0)
    overflow = [False] * 7 + [True] + [False] * 3 + [True] * 5
    scales = []
    for found_inf in overflow:
        scaler.update(found_inf)
        scales.append(scaler.scale_value)
    assert scales == [8, 8, 16, 16, 16, 32, 32, 16, 16, 16, 32, 16, 8, 4, 2, 1]
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale_value, restored.clean_steps) == (1, 0)


def test_profile_categories_add_up_and_name_the_ops():
    """The --profile table's categorization on a hand-made workload: each op lands in its
    category and the rows sum to the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    from megalite.training import profiling
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c = a @ b
        d = torch.cat([c, a])
        e = (d * 2).to(torch.float64)
        torch.nn.functional.layer_norm(e, (64,))
    rows, total = profiling.breakdown(prof, "cpu")
    ms = {cat: t for cat, t, _ in rows}
    assert [cat for cat, _, _ in rows] == profiling.ORDER
    assert abs(sum(ms.values()) - total) < 1e-6 and total > 0
    assert ms["matmul"] > 0 and ms["copies/casts"] > 0 and ms["norms"] > 0
    for name, cat in (("aten::mm", "matmul"), ("aten::cat", "copies/casts"),
                      ("aten::_to_copy", "copies/casts"), ("aten::mul", "elementwise"),
                      ("_fused_adamw_", "optimizer"), ("ncclDevKernel_AllReduce", "communication"),
                      ("_attn_fwd_kernel", "attention"), ("_rms_fwd_kernel", "norms"),
                      ("sm90_xmma_gemm_bf16", "matmul"), ("aten::native_layer_norm", "norms"),
                      ("_stats_kernel", "elementwise")):
        assert profiling.category(name) == cat, name
    assert profiling.count_calls(prof)["aten::cat"] == 1
