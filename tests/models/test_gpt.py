"""A whole GPT at tp = 2 and 4 computes the tp = 1 logits, loss and gradients.

The reference is the same GPT built in the same process from the same seed with a
single-process state; gradients of sharded parameters are gathered to their full form.
"""
import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig, HeadInput
from megalite.parallel import ParallelState
from megalite.parallel.sharding import gather_full
from test_recompute import check_recompute_under_tp
from world import run_world

# 250 is not a multiple of 4: the vocabulary is padded at tp = 4.
LLAMA = GPTConfig(vocab_size=250, n_layers=2, n_heads=8, n_kv_heads=4, d_model=64, d_ff=96,
                  max_seq_len=16, kernels="torch")
GPT2 = GPTConfig(vocab_size=250, n_layers=2, n_heads=8, d_model=64, max_seq_len=16,
                 norm="layernorm", activation="gelu_tanh", position="learned",
                 tie_embeddings=True, bias=True, kernels="torch")


def _data(cfg, b=2, s=8):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model, tokens, targets):
    logits = model(tokens)
    loss = model.loss(logits, targets)
    kept = logits.detach().clone()  # the loss's backward reuses the logits buffer
    loss.backward()
    return kept, loss


def compare_with_tp1(cfg, ps, atol=1e-5):
    tokens, targets = _data(cfg)
    torch.manual_seed(0)
    model = GPT(cfg)
    torch.manual_seed(0)
    ref = GPT(cfg.replace(sequence_parallel=False), state=ParallelState())
    logits, loss = _loss_and_grads(model, tokens, targets)
    ref_logits, ref_loss = _loss_and_grads(ref, tokens, targets)

    where = f"{cfg.norm} tp={ps.tp} sp={cfg.sequence_parallel}"
    full_logits = parallel.gather_from_tp_region(logits, ps.tp_group)[..., :cfg.vocab_size]
    assert torch.allclose(full_logits, ref_logits, atol=atol), f"logits differ ({where})"
    assert abs(loss.item() - ref_loss.item()) < atol, f"loss {loss.item()} != {ref_loss.item()}"
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == list(ref_params), f"parameter names differ ({where})"
    for name, p in model.named_parameters():
        full = gather_full(p)
        assert torch.allclose(full, ref_params[name].detach(), atol=1e-7), \
            f"init of {name} differs from tp=1 ({where})"
        grad = gather_full(p, tensor=p.grad)
        err = (grad - ref_params[name].grad).abs().max().item()
        assert err < atol, f"grad of {name} differs by {err:.2e} ({where})"
    # The training path: the fused head + loss (vocab-parallel, chunked) matches the same
    # tp=1 reference, which took the unfused path through the logits.
    model.zero_grad()
    fused = model.loss(model(tokens, head_input=True), targets)
    fused.backward()
    assert abs(fused.item() - ref_loss.item()) < atol, f"fused loss differs ({where})"
    for name, p in model.named_parameters():
        err = (gather_full(p, tensor=p.grad) - ref_params[name].grad).abs().max().item()
        assert err < atol, f"fused-loss grad of {name} differs by {err:.2e} ({where})"


def _gpt_world(rank, world):
    for tp in (2, 4):
        ps = parallel.initialize(tp=tp)
        for cfg in (LLAMA, GPT2):
            for sp in (False, True):
                compare_with_tp1(cfg.replace(sequence_parallel=sp), ps)
    # Local (shard-only) init: different from the master weights but trains the same way.
    ps = parallel.initialize(tp=2)
    check_recompute_under_tp(ps)  # recompute exact with the TP dropout stream; saved bytes
    torch.manual_seed(0)
    model = GPT(LLAMA.replace(master_init=False))
    torch.manual_seed(0)
    master = GPT(LLAMA)
    w_local, w_master = model.layers["0"].attn.qkv.weight, master.layers["0"].attn.qkv.weight
    assert w_local.shape == w_master.shape and not torch.equal(w_local, w_master)
    all_local = parallel.gather_from_tp_region(w_local.detach(), ps.tp_group, dim=0)
    assert not torch.equal(*all_local.chunk(2, 0)), "local init must differ per TP rank"
    assert abs(w_local.std().item() - 0.02) < 0.005
    # Heads must split across TP ranks.
    with pytest.raises(ValueError, match="divisible by tp=2"):
        GPT(LLAMA.replace(n_heads=6, n_kv_heads=3, d_model=48))
    with pytest.raises(ValueError, match="seq_len .* divisible"):
        GPT(LLAMA.replace(sequence_parallel=True))(torch.zeros(1, 7, dtype=torch.long))
    return True


def test_gpt_tp_matches_single_process():
    assert run_world(4, _gpt_world, timeout=300) == [True] * 4


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_gpt_runs_in_one_process_without_distributed(preset):
    parallel.destroy()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, kernels="torch"))
    tokens, targets = _data(model.cfg)
    logits = model(tokens)
    assert logits.shape == (2, 8, 256)
    loss = model.loss(logits, targets)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()
    # The fused training loss (no logits stored) gives the same loss and gradients; with
    # fused_loss=False a HeadInput goes through the logits.
    unfused = {n: p.grad.clone() for n, p in model.named_parameters()}
    for fused_loss in (True, False):
        model.cfg.fused_loss = fused_loss
        model.zero_grad()
        out = model(tokens, head_input=True)
        assert isinstance(out, HeadInput)
        fused = model.loss(out, targets)
        fused.backward()
        assert abs(fused.item() - loss.item()) < 1e-5
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, unfused[n], atol=1e-5, rtol=1e-5, msg=n)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(vocab_size=10, n_layers=1, n_heads=2, d_model=8, norm="batchnorm")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GPTConfig(vocab_size=10, n_layers=1, n_heads=4, n_kv_heads=3, d_model=8)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        GPTConfig(vocab_size=10, n_layers=1, n_heads=3, d_model=8)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    assert GPTConfig.preset("llama-1b").num_params() == pytest.approx(1.236e9, rel=0.01)
    assert GPTConfig.preset("gpt2-124m").num_params() == pytest.approx(124.4e6, rel=0.01)


def test_stages_of_one_rank_compose_to_the_whole_model():
    """GPT(cfg, stages=...) holds several pipeline stages under their global names; running
    them in order is the one-stage model. Uneven splits follow cfg.layers_per_stage."""
    parallel.destroy()
    cfg = GPTConfig(vocab_size=37, n_layers=5, n_heads=2, d_model=16, d_ff=32, max_seq_len=8,
                    kernels="torch", tie_embeddings=True)
    tokens = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    whole = GPT(cfg)
    torch.manual_seed(0)
    split = GPT(cfg.replace(layers_per_stage=[1, 2, 1, 1]), stages=[0, 1, 2, 3], num_stages=4)
    assert dict(whole.named_parameters()).keys() == dict(split.named_parameters()).keys()
    assert split.stage_layers == {0: range(0, 1), 1: range(1, 3), 2: range(3, 4), 3: range(4, 5)}
    x = tokens
    for s in range(4):
        x = split(x, stage=s)
    torch.testing.assert_close(x, whole(tokens))
    assert split.shared_embedding_params() == []  # first and last stage on one rank
    with pytest.raises(ValueError, match=r"holds stages \[0, 1, 2, 3\]: call model\(x, stage=s\)"):
        split(tokens)
    with pytest.raises(ValueError, match="layers_per_stage=\\[2, 3\\] must list 4 counts"):
        GPT(cfg.replace(layers_per_stage=[2, 3]), stages=[0], num_stages=4)
    with pytest.raises(ValueError, match="n_layers=5 < 6 pipeline stages"):
        GPT(cfg, stages=[0], num_stages=6)
    with pytest.raises(ValueError, match="stages \\[7\\] must be a non-empty list"):
        GPT(cfg, stages=[7], num_stages=4)


def test_a_checkpoint_config_without_a_newer_field_means_its_default():
    """A checkpoint written before a field existed held that field's default: an old
    llama-1b-like config without ``rope_scaling`` is plain RoPE, so a model with the llama3
    scaling the preset has now is another model, and a plain-RoPE one is the same."""
    cfg = GPTConfig.preset("tiny", rope_scaling={"type": "linear", "factor": 2.0})
    scaled, plain = GPT(cfg), GPT(cfg.replace(rope_scaling=None))
    old = {k: v for k, v in plain.checkpoint_config().items()
           if k not in ("rope_scaling", "head_dim", "qk_norm")}
    plain.check_checkpoint_config(old)
    with pytest.raises(ValueError, match="another model: rope_scaling=None"):
        scaled.check_checkpoint_config(old)
    scaled.check_checkpoint_config(scaled.checkpoint_config())
