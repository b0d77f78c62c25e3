"""Activation recomputation: bitwise the same training step, fewer saved bytes.

References: the same model with recompute="none" (losses, every gradient, RNG state after
the step, compared with torch.equal), and, for memory, the bytes autograd really saves
(saved-tensor hooks) against ``saved_activation_bytes``. The tp = 2 checks run inside
test_gpt.py's world (``check_recompute_under_tp``).
"""
import pytest
import torch

from megalite import parallel
from megalite.kernels import HAS_TRITON
from megalite.models import GPT, GPTConfig
from megalite.models.activation_memory import (count_saved_bytes, korthikanti_bytes,
                                               saved_activation_bytes, stage_saved_bytes)
from megalite.parallel import ParallelState
from megalite.pipeline.backward import backward_input
from megalite.training.precision import autocast

LLAMA = GPTConfig(vocab_size=61, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, d_ff=80,
                  max_seq_len=24, kernels="torch")
GPT2 = GPTConfig(vocab_size=61, n_layers=3, n_heads=4, d_model=32, max_seq_len=24,
                 norm="layernorm", activation="gelu_tanh", position="learned",
                 tie_embeddings=True, bias=True, kernels="torch")
MODES = (dict(recompute="selective"), dict(recompute="full"),
         dict(recompute="full", recompute_layers=2))


def _step(cfg, ps=None, b=2, s=12, dtype="fp32"):
    """Loss, gradients and the RNG state after one forward + backward."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    torch.manual_seed(0)
    model = GPT(cfg, state=ps)
    if ps is not None and ps.tp > 1:
        parallel.model_parallel_seed(5, ps)  # the same TP dropout stream for every mode
    else:
        torch.manual_seed(5)
    with autocast(dtype, torch.device("cpu")):  # the recompute must replay it
        logits = model(tokens[:, :-1])
    loss = model.loss(logits.float(), tokens[:, 1:])
    loss.backward()
    streams = dict(parallel.get_rng_tracker().states)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, \
        torch.get_rng_state(), streams


def assert_bitwise_equal(cfg, ps=None, dtype="fp32"):
    ref_loss, ref_grads, ref_rng, ref_streams = _step(cfg, ps, dtype=dtype)
    for mode in MODES:
        loss, grads, rng, streams = _step(cfg.replace(**mode), ps, dtype=dtype)
        where = f"{mode} {cfg.norm} dropout={cfg.dropout} sp={cfg.sequence_parallel} {dtype}"
        assert torch.equal(loss, ref_loss), f"loss differs ({where})"
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), f"grad of {name} differs ({where})"
        # the recompute replays the RNG and puts it back: the streams advanced once
        assert torch.equal(rng, ref_rng), where
        assert streams.keys() == ref_streams.keys() and \
            all(torch.equal(streams[k], ref_streams[k]) for k in streams), where


@pytest.mark.parametrize("cfg,dtype", [(LLAMA.replace(dropout=0.2), "fp32"),
                                       (GPT2.replace(dropout=0.2), "fp32"), (LLAMA, "fp32"),
                                       (LLAMA.replace(dropout=0.2), "bf16")],
                         ids=["llama-dropout", "gpt2-dropout", "llama", "llama-bf16-autocast"])
def test_recompute_is_bitwise_exact(cfg, dtype):
    assert_bitwise_equal(cfg, ParallelState(), dtype)


def _block_bytes(cfg, ps, b, s, mode):
    torch.manual_seed(0)
    model = GPT(cfg.replace(recompute=mode), state=ps)
    sp = cfg.sequence_parallel and ps.tp > 1
    x = torch.randn(b, s // ps.tp if sp else s, cfg.d_model, requires_grad=True)
    rope = (model.rope_cos, model.rope_sin) if cfg.position == "rope" else None
    model.train()
    _, got = count_saved_bytes(model.layers["0"], x, rope,
                               exclude=[*model.parameters(), *model.buffers()])
    return got


def assert_saved_bytes_match(cfg, ps, b, s, kernels="torch"):
    got = {mode: _block_bytes(cfg, ps, b, s, mode) for mode in ("none", "selective", "full")}
    for mode, measured in got.items():
        predicted = saved_activation_bytes(cfg, b, s, ps.tp, cfg.sequence_parallel, mode,
                                           kernels=kernels)
        assert measured == predicted, \
            f"{mode} {cfg.norm} tp={ps.tp} sp={cfg.sequence_parallel} b={b} s={s}: " \
            f"measured {measured} B, predicted {predicted} B"
    assert got["full"] < got["selective"] < got["none"], got


@pytest.mark.parametrize("cfg,b,s", [(LLAMA, 2, 12), (LLAMA.replace(n_kv_heads=1, d_ff=72), 3, 7),
                                     (GPT2.replace(dropout=0.1), 1, 16),
                                     (LLAMA.replace(dropout=0.1, norm="layernorm"), 2, 5),
                                     (LLAMA.replace(head_dim=16, qk_norm=True, qkv_bias=True,
                                                    sliding_window=4), 2, 12)])
def test_saved_bytes_match_the_prediction(cfg, b, s):
    assert_saved_bytes_match(cfg, ParallelState(), b, s)


def test_stage_bytes_follow_recompute_layers():
    # the middle one of 3 stages (2 layers): hidden states in, hidden states out
    cfg = LLAMA.replace(n_layers=6, dropout=0.1)
    for mode in ({}, *MODES):
        mcfg = cfg.replace(**mode)
        torch.manual_seed(0)
        model = GPT(mcfg, state=ParallelState(), stages=[1], num_stages=3)
        x = torch.randn(2, 9, cfg.d_model, requires_grad=True)
        _, measured = count_saved_bytes(lambda h: model(h, stage=1), x,
                                        exclude=[*model.parameters(), *model.buffers()])
        assert measured == stage_saved_bytes(mcfg, 2, 2, 9), mode


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (interpreter)")
@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_saved_bytes_match_the_prediction_with_triton_kernels(cfg, monkeypatch):
    # The GPU path's kernels, run by Triton's interpreter on CPU (head_dim 16: the Triton
    # attention runs, not the fallback). Forward only, so it stays quick.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = cfg.replace(kernels="triton", d_model=64, n_layers=1)
    assert_saved_bytes_match(cfg, ParallelState(), 2, 20, kernels="triton")


def test_korthikanti_formulas():
    # GPT-3 175B's layer at s = 2048, b = 1, t = 8 (their Table 2 / Figure 7 setting): full
    # activations sbh(34 + 5as/h) at t = 1; TP+SP divides all by t; selective keeps 34sbh/t.
    cfg = GPTConfig(vocab_size=51200, n_layers=96, n_heads=96, d_model=12288, max_seq_len=2048)
    sbh = 2048 * 12288
    assert korthikanti_bytes(cfg, 1, 2048) == sbh * (34 + 5 * 96 * 2048 / 12288)
    assert korthikanti_bytes(cfg, 1, 2048, 8, True) == round(sbh * (34 + 80) / 8)
    assert korthikanti_bytes(cfg, 1, 2048, 8, False) == round(sbh * (10 + 24 / 8 + 80 / 8))
    assert korthikanti_bytes(cfg, 1, 2048, 8, True, "selective") == sbh * 34 / 8
    assert korthikanti_bytes(cfg, 1, 2048, 1, False, "full") == 2 * sbh


def test_split_backward_reenters_recomputed_layers():
    """I (input gradient) recomputes each layer once; W then finds the weight-gradient
    branches in the ordinary graph and reuses the recomputed tensors."""
    x = torch.randn(2, 10, LLAMA.d_model)
    grad = torch.randn(2, 10, LLAMA.d_model)

    def stage(mode):
        torch.manual_seed(0)
        # the middle one of 3 stages: hidden states in and out, 2 layers
        model = GPT(LLAMA.replace(n_layers=6, **mode), state=ParallelState(), stages=[1],
                    num_stages=3)
        calls = []
        for block in model.layers.values():
            block.attn.register_forward_hook(lambda *_: calls.append(1))
        inp = x.clone().requires_grad_()
        return model, inp, model(inp, stage=1), calls

    ref, ref_in, out, _ = stage({})
    out.backward(grad)
    for mode in MODES:
        model, inp, out, calls = stage(mode)
        (x_grad,), weight_grad = backward_input(out, grad, [inp])
        assert torch.equal(x_grad, ref_in.grad), mode
        recomputed = [b for b in model.layers.values() if b.recompute != "none"]
        assert all(p.grad is None for b in recomputed for p in b.parameters()), \
            f"{mode}: I must leave the weight gradients to W"
        weight_grad.run()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), f"{mode}: grad of {name}"
        # forward + one recompute per full-recompute layer (selective recomputes the core)
        full = sum(b.recompute == "full" for b in model.layers.values())
        assert len(calls) == len(model.layers) + full, (mode, len(calls))


def test_recompute_flags_that_contradict_fail_clearly():
    with pytest.raises(ValueError, match="recompute_layers=2 applies to full recompute only"):
        LLAMA.replace(recompute="selective", recompute_layers=2)
    with pytest.raises(ValueError, match="recompute_layers must be in"):
        LLAMA.replace(recompute="full", recompute_layers=4)
    with pytest.raises(ValueError, match="recompute"):
        LLAMA.replace(recompute="some")
    # 3 layers over 2 stages: [2, 1]; two layers per stage cannot be recomputed on stage 1
    with pytest.raises(ValueError, match="recompute_layers=2 but stage 1 has 1 layers"):
        GPT(LLAMA.replace(recompute="full", recompute_layers=2), state=ParallelState(),
            stages=[0, 1], num_stages=2)


def check_recompute_under_tp(ps):
    """Run inside a tp = 2 world (test_gpt.py): recompute stays bitwise exact with the
    sequence-parallel dropout stream, and the saved bytes match with and without SP."""
    for sp in (False, True):
        cfg = LLAMA.replace(n_layers=2, sequence_parallel=sp, dropout=0.2)
        assert_bitwise_equal(cfg, ps)
        assert_saved_bytes_match(cfg, ps, 2, 8)
    assert_saved_bytes_match(GPT2.replace(n_layers=2, sequence_parallel=True), ps, 1, 6)
