"""Hugging Face interop: from_hf and save_hf give HF's logits, in one process and at
tp=2/pp=2, tp=4 and pp=2/dp=2 (Llama 2, GPT-2), tp=2 and pp=2 (Llama 3, Qwen2, Qwen3,
Mistral, with RoPE scaling, q/k/v biases, q/k norms, head_dim != d_model / heads and a
sliding window shorter than the sequence).

HF models are tiny and random, built from configs (no downloads) after a fixed seed, so every
rank of a world builds the same one instead of receiving it pickled.
"""
import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megalite import parallel  # noqa: E402
from megalite.models import GPT, GPTConfig  # noqa: E402
from megalite.models.hf import (from_hf, gpt_config_from_hf, hf_config_from_gpt,  # noqa: E402
                                save_hf)
from world import run_world  # noqa: E402

VOCAB = 250   # not a multiple of 4: the vocabulary is padded at tp = 4


def hf_llama(tie=False, bias=False, layers=4, **extra):
    return hf_rope_model("Llama", layers, tie_word_embeddings=tie, attention_bias=bias,
                         mlp_bias=bias, **extra)


def hf_rope_model(family, layers=4, **extra):
    """A tiny random ``{family}ForCausalLM`` (Llama, Qwen2, Qwen3, Mistral)."""
    cfg = getattr(transformers, f"{family}Config")(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
               rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=None, eos_token_id=None,
               pad_token_id=None,
               # Larger weights than the default 0.02: attention far from uniform, so a
               # wrong RoPE or head layout shows in the logits.
               initializer_range=0.1),
        **extra})
    return _build(getattr(transformers, f"{family}ForCausalLM"), cfg)


# Llama 3's scaling with an original context of 16 (the test sequences are 11 long):
# three of the four frequencies of a head of 8 are rescaled.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=5000.0)
YARN_ROPE = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8,
                 rope_theta=5000.0)   # also scales cos/sin by 0.1 ln 4 + 1
NEW_FAMILIES = {
    "llama3-tied": lambda: hf_rope_model("Llama", tie_word_embeddings=True,
                                         rope_parameters=LLAMA3_ROPE),
    "qwen2-linear": lambda: hf_rope_model("Qwen2", rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=5000.0)),
    "qwen3-yarn": lambda: hf_rope_model("Qwen3", head_dim=16, rope_parameters=YARN_ROPE),
    "mistral-window": lambda: hf_rope_model("Mistral", sliding_window=5),
}


def hf_gpt2(tie=True, **extra):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, initializer_range=0.1,
        **extra)
    return _build(transformers.GPT2LMHeadModel, cfg)


def _build(cls, cfg):
    cfg._attn_implementation = "eager"   # plain softmax attention, no SDPA mask variants
    torch.manual_seed(1234)
    return cls(cfg).float().eval()


MODELS = {"llama": hf_llama, "llama-tied-bias": lambda: hf_llama(tie=True, bias=True),
          "gpt2": hf_gpt2, "gpt2-untied": lambda: hf_gpt2(tie=False), **NEW_FAMILIES}


def tokens(b=2, s=11):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(7))


def hf_logits(hf):
    with torch.no_grad():
        return hf(tokens()).logits


def assert_close(got, ref, what):
    got = got[..., :VOCAB]   # drop vocabulary padding columns
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"{what}: max error {err:.3g} (logits up to {scale:.3g})"


def load_hf(directory):
    cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(directory, attn_implementation="eager").float().eval()


# ----------------------------------------------------------------------------- one process
@pytest.fixture(autouse=True)
def _single_process():
    parallel.destroy()
    yield
    parallel.destroy()


@pytest.mark.parametrize("name", list(MODELS))
def test_from_hf_matches_hf_logits_for_every_input_kind(name, tmp_path):
    hf = MODELS[name]()
    ref = hf_logits(hf)
    hf.save_pretrained(tmp_path)
    inputs = {"model": (hf, {}), "directory": (str(tmp_path), {}),
              "state dict": (hf.state_dict(), {"config": hf.config}),
              "state dict + config.json": ({k: v.clone() for k, v in hf.state_dict().items()},
                                           {"config": str(tmp_path / "config.json")})}
    for kind, (source, kwargs) in inputs.items():
        model = from_hf(source, kernels="torch", **kwargs)
        with torch.no_grad():
            assert_close(model(tokens()), ref, f"{name} from {kind}")


@pytest.mark.parametrize("name", list(MODELS))
def test_save_hf_round_trip(name, tmp_path):
    hf = MODELS[name]()
    ref = hf_logits(hf)
    model = from_hf(hf, kernels="torch")
    save_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back = load_hf(tmp_path)
    assert type(back) is type(hf), f"{name} came back as {type(back).__name__}"
    assert gpt_config_from_hf(back.config, kernels="torch") == model.cfg
    assert_close(hf_logits(back), ref, f"{name} after save_hf")


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_native_model_exports_to_hf(preset, tmp_path):
    """A model trained with megalite (not imported) exports with the same logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, kernels="torch", vocab_size=VOCAB))
    with torch.no_grad():
        ours = model(tokens())
    save_hf(model, tmp_path, dtype=torch.float32)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == ("LlamaForCausalLM" if preset == "tiny" else "GPT2LMHeadModel")
    assert_close(ours, hf_logits(hf), f"{preset} exported")
    # Importing restores the exact weights.
    back = from_hf(tmp_path, kernels="torch")
    for (n, p), (m, q) in zip(model.named_parameters(), back.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_bin_and_sharded_directories(tmp_path):
    hf = hf_gpt2()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for kind in ("bin", "sharded"):
        with torch.no_grad():
            assert_close(from_hf(tmp_path / kind)(tokens()), hf_logits(hf), kind)


def test_bare_base_model_state_dict():
    """LlamaModel / GPT2Model state dicts lack the "model." / "transformer." prefix."""
    for hf in (hf_llama(tie=True, bias=True), hf_gpt2()):
        base = hf.model if hasattr(hf, "model") else hf.transformer
        model = from_hf(base.state_dict(), config=hf.config, kernels="torch")
        with torch.no_grad():
            assert_close(model(tokens()), hf_logits(hf), f"bare {type(base).__name__}")


def test_from_hf_leaves_the_rng_alone():
    hf = hf_gpt2()
    torch.manual_seed(5)
    from_hf(hf)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_overrides_and_config_mapping():
    hf = hf_llama()
    cfg = gpt_config_from_hf(hf.config, kernels="torch", max_seq_len=16, layers_per_stage=[1, 3])
    assert (cfg.n_kv_heads, cfg.d_ff, cfg.rope_theta, cfg.norm_eps) == (4, 96, 5000.0, 1e-5)
    assert cfg.max_seq_len == 16 and cfg.dropout == 0.0
    g = gpt_config_from_hf(hf_gpt2().config)
    assert (g.activation, g.position, g.tie_embeddings, g.d_ff) == ("gelu_tanh", "learned",
                                                                    True, 256)
    with pytest.raises(ValueError, match="n_layers=2 conflicts"):
        from_hf(hf, n_layers=2)
    with pytest.raises(ValueError, match="max_seq_len=16 conflicts"):
        from_hf(hf_gpt2(), max_seq_len=16)   # the learned position table fixes it


@pytest.mark.parametrize("field, config", [
    ("rope_type='dynamic'", lambda: hf_llama(layers=1, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}).config),
    ("rope_parameters.beta_x=1", lambda: {**hf_llama(layers=1).config.to_dict(),
                                          "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                                           "beta_x": 1}}),
    ("partial_rotary_factor=0.5", lambda: {**hf_llama(layers=1).config.to_dict(),
                                           "partial_rotary_factor": 0.5}),
    ("hidden_act", lambda: {**hf_llama(layers=1).config.to_dict(), "hidden_act": "gelu"}),
    ("attention_bias/mlp_bias", lambda: {**hf_llama(layers=1).config.to_dict(),
                                         "attention_bias": True}),
    ("attention_bias=True", lambda: hf_rope_model("Qwen3", layers=1,
                                                  attention_bias=True).config),
    # Qwen2 with the window on layers 1.. only (max_window_layers=1): a per-layer mix.
    ("layer_types=.'full_attention', 'sliding_attention'", lambda: hf_rope_model(
        "Qwen2", layers=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1).config),
    ("activation_function", lambda: {**hf_gpt2().config.to_dict(),
                                     "activation_function": "relu"}),
    ("scale_attn_by_inverse_layer_idx", lambda: {**hf_gpt2().config.to_dict(),
                                                 "scale_attn_by_inverse_layer_idx": True}),
    ("model_type='phi3'", lambda: {"model_type": "phi3"}),
])
def test_unrepresentable_configs_are_refused(field, config):
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        gpt_config_from_hf(config())


def test_sliding_window_config_mapping():
    """HF's rules for when a window applies: Mistral always (null: none); Qwen2/3 only with
    use_sliding_window, on the layers from max_window_layers on."""
    def window(family, **extra):
        return gpt_config_from_hf(hf_rope_model(family, layers=2, **extra).config).sliding_window
    assert window("Mistral", sliding_window=None) is None
    assert window("Mistral", sliding_window=7) == 7
    assert window("Qwen2", sliding_window=7) is None               # use_sliding_window off
    assert window("Qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=0) == 7
    assert window("Qwen3", use_sliding_window=True, sliding_window=7, max_window_layers=2) \
        is None                                                    # no layer is past 2
    cfg = gpt_config_from_hf(hf_rope_model("Qwen3", layers=1).config)
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.bias, cfg.head_dim) == (True, False, False, 128)
    cfg = gpt_config_from_hf(hf_rope_model("Qwen2", layers=1).config)
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.bias) == (False, True, False)


@pytest.mark.parametrize("preset, family", [("llama3.1-8b", "llama"), ("qwen2.5-7b", "qwen2"),
                                            ("qwen3-8b", "qwen3"), ("mistral-7b", "mistral")])
def test_presets_write_their_family(preset, family):
    """A preset's HF config builds that architecture, and reads back as the same GPTConfig
    (shapes only: nothing is allocated)."""
    cfg = GPTConfig.preset(preset)
    hf = hf_config_from_gpt(cfg)
    assert hf["model_type"] == family
    built = transformers.AutoConfig.for_model(**hf)
    assert built.model_type == family
    assert gpt_config_from_hf(built) == cfg


def test_clear_errors(tmp_path):
    hf = hf_gpt2()
    sd = {k: v for k, v in hf.state_dict().items() if "h.1.mlp.c_fc" not in k}
    with pytest.raises(ValueError, match="lack 'transformer.h.1.mlp.c_fc.weight'"):
        from_hf(sd, config=hf.config)
    with pytest.raises(ValueError, match="needs its Hugging Face config"):
        from_hf(sd)
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(str(tmp_path))
    odd = GPT(GPTConfig(vocab_size=VOCAB, n_layers=1, n_heads=4, d_model=32, activation="gelu"))
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        save_hf(odd, tmp_path)
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- many processes
def pipeline_forward(model, ps, x):
    """Run the stages in order over the PP group; the last stage returns full logits."""
    if not ps.is_first_stage:
        hidden = torch.empty(x.shape[0], x.shape[1], model.cfg.d_model)
        dist.recv(hidden, src=ps.pp_ranks[ps.pp_rank - 1])
        x = hidden
    with torch.no_grad():
        out = model(x)
    if not ps.is_last_stage:
        dist.send(out.contiguous(), dst=ps.pp_ranks[ps.pp_rank + 1])
        return None
    return parallel.gather_from_tp_region(out, ps.tp_group)


def _layouts_world(rank, world, directory, layouts, names):
    import transformers as _  # noqa: F401 - import once, before timing-sensitive collectives
    for tp, pp in layouts:
        ps = parallel.initialize(tp=tp, pp=pp)
        for name in names:
            where = f"{name} at tp={tp} pp={pp} dp={ps.dp}"
            hf = MODELS[name]()
            ref = hf_logits(hf)
            model = from_hf(hf, kernels="torch")
            logits = pipeline_forward(model, ps, tokens())
            if logits is not None:
                assert_close(logits, ref, where)
            out = os.path.join(directory, f"{name}-tp{tp}-pp{pp}")
            save_hf(model, out)
            if rank == 0:
                assert_close(hf_logits(load_hf(out)), ref, f"{where}, saved")
            if name != "llama-tied-bias":   # from a directory too (each rank reading its
                # slices of the safetensors file), with an uneven split of the 4-layer models
                uneven = pp == 2 and not name.startswith("gpt2")
                model = from_hf(out, kernels="torch", layers_per_stage=[3, 1] if uneven else None)
                logits = pipeline_forward(model, ps, tokens())
                if logits is not None:
                    assert_close(logits, ref, f"{where}, reloaded")
        dist.barrier()
    return True


def test_from_hf_and_save_hf_in_parallel_layouts(tmp_path):
    assert run_world(4, _layouts_world, str(tmp_path), ((2, 2), (4, 1), (1, 2)),
                     ("llama-tied-bias", "gpt2", "llama"), timeout=240) == [True] * 4


def _grads_match_hf(name, ps, sequence_parallel):
    """Every parameter's gradient at tp=2, gathered, equals the one HF computes for the same
    loss: the replicated q/k norm weights see only their rank's heads (and, with sequence
    parallelism, tokens), so this fails unless their gradients are summed over TP."""
    from megalite.models.hf import _full_tensor
    from megalite.models.hf_files import Tensors
    from megalite.parallel.sharding import gather_full
    hf = NEW_FAMILIES[name]()
    x, targets = tokens(s=12), tokens(s=12).roll(1, dims=1)
    F = torch.nn.functional
    F.cross_entropy(hf(x).logits.flatten(0, 1), targets.flatten()).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    model = from_hf(hf, kernels="torch", sequence_parallel=sequence_parallel)
    model.loss(model(x), targets).backward()
    for ours, param in model.named_parameters():
        got = gather_full(param, ps, tensor=param.grad)
        ref = _full_tensor(model.hf_model_type, ours, Tensors.in_memory(hf_grads))
        err, size = (got - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-4 * max(size, 1e-3), f"{name} {ours}.grad: error {err:.3g} of {size:.3g}"


def _new_families_world(rank, world, directory):
    _layouts_world(rank, world, directory, ((2, 1), (1, 2)), tuple(NEW_FAMILIES))
    ps = parallel.initialize(tp=2)
    for name, sp in (("qwen3-yarn", False), ("qwen3-yarn", True), ("qwen2-linear", True)):
        _grads_match_hf(name, ps, sp)
    return True


def test_new_families_at_tp2_and_pp2(tmp_path):
    """Llama 3, Qwen2, Qwen3 and Mistral at tp=2 and pp=2 (logits, save_hf, reload), and
    Qwen3's and Qwen2's gradients at tp=2 with sequence parallelism."""
    assert run_world(2, _new_families_world, str(tmp_path), timeout=240) == [True] * 2


@pytest.mark.parametrize("params", [
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
    dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=2048, beta_fast=16,
         beta_slow=2, truncate=False),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, mscale=1.0,
         mscale_all_dim=0.5),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
         attention_factor=1.3),
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items() if k != "rope_type") or "plain")
def test_rope_frequencies_match_hf(params):
    """The frequencies and YaRN's attention factor, against transformers' own functions, at
    a real head size and context (beyond what the tiny models' logits exercise)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from megalite.models.rope_scaling import attention_factor, inverse_frequencies
    hf = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8,
                                  max_position_embeddings=8192,
                                  rope_parameters={**params, "rope_theta": 500000.0})
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, None)
    cfg = gpt_config_from_hf(hf)
    freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(freq.float(), ref_freq, rtol=1e-6, atol=0)
    assert attention_factor(cfg.rope_scaling) == pytest.approx(ref_factor, rel=1e-12)
