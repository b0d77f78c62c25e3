"""Hugging Face interop: from_hf and save_hf give HF's logits, in one process and at
tp=2/pp=2, tp=4 and pp=2/dp=2.

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
from megalite.models.hf import from_hf, gpt_config_from_hf, save_hf  # noqa: E402
from world import run_world  # noqa: E402

VOCAB = 250   # not a multiple of 4: the vocabulary is padded at tp = 4


def hf_llama(tie=False, bias=False, layers=4, **extra):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32,
        rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=tie, attention_bias=bias,
        mlp_bias=bias, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        # Larger weights than the default 0.02: attention far from uniform, so a wrong RoPE
        # or head layout shows in the logits.
        initializer_range=0.1, **extra)
    return _build(transformers.LlamaForCausalLM, cfg)


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
          "gpt2": hf_gpt2, "gpt2-untied": lambda: hf_gpt2(tie=False)}


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
    save_hf(from_hf(hf, kernels="torch"), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_close(hf_logits(load_hf(tmp_path)), ref, f"{name} after save_hf")


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
    ("rope_scaling", lambda: hf_llama(layers=1, rope_scaling={"rope_type": "linear",
                                                              "factor": 2.0}).config),
    ("hidden_act", lambda: {**hf_llama(layers=1).config.to_dict(), "hidden_act": "gelu"}),
    ("head_dim", lambda: {**hf_llama(layers=1).config.to_dict(), "head_dim": 16}),
    ("attention_bias/mlp_bias", lambda: {**hf_llama(layers=1).config.to_dict(),
                                         "attention_bias": True}),
    ("activation_function", lambda: {**hf_gpt2().config.to_dict(),
                                     "activation_function": "relu"}),
    ("scale_attn_by_inverse_layer_idx", lambda: {**hf_gpt2().config.to_dict(),
                                                 "scale_attn_by_inverse_layer_idx": True}),
    ("model_type", lambda: {"model_type": "mistral"}),
])
def test_unrepresentable_configs_are_refused(field, config):
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        gpt_config_from_hf(config())


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


def _layouts_world(rank, world, directory):
    import transformers as _  # noqa: F401 - import once, before timing-sensitive collectives
    for tp, pp in ((2, 2), (4, 1), (1, 2)):
        ps = parallel.initialize(tp=tp, pp=pp)
        for name in ("llama-tied-bias", "gpt2", "llama"):
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
            if name == "llama":   # from a directory too, with an uneven pipeline split
                model = from_hf(out, kernels="torch",
                                layers_per_stage=[3, 1] if pp == 2 else None)
                logits = pipeline_forward(model, ps, tokens())
                if logits is not None:
                    assert_close(logits, ref, f"{where}, reloaded")
        dist.barrier()
    return True


def test_from_hf_and_save_hf_in_parallel_layouts(tmp_path):
    assert run_world(4, _layouts_world, str(tmp_path), timeout=240) == [True] * 4
