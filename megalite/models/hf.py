"""Hugging Face interop: import a LlamaForCausalLM or GPT2LMHeadModel into a GPT of any
(tp, pp) layout, and export a GPT as a directory that ``from_pretrained`` loads.

    model = from_hf(hf_model_or_directory_or_state_dict)   # this rank's stage, TP-sharded
    save_hf(model, "out/")                                  # collective; rank 0 writes

Every weight goes through one table (``_GLOBAL`` / ``_LAYER``): our parameter name -> the
Hugging Face keys it is made of. Import concatenates those tensors into our full (tp=1)
tensor and keeps this rank's shard with ``shard_full``; export gathers with ``gather_full``
and splits them again. transformers itself is never imported: configs are read as plain
dicts and weights with safetensors (or torch for ``.bin`` files).
"""
from __future__ import annotations

import contextlib
import json
import os
import re

import torch

from megalite.models.config import GPTConfig
from megalite.models.gpt import GPT
from megalite.parallel import comm
from megalite.parallel.sharding import gather_full_to_cpu, send_stages_to_first, shard_full
from megalite.parallel.state import ParallelState, get_state

# ----------------------------------------------------------------------------- name tables
# Our global name -> HF key, and per layer: our suffix -> the HF suffixes concatenated
# (along dim 0) into it. q/k/v and gate/up are fused on our side.
_GLOBAL = {
    "llama": {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"},
    "gpt2": {"embed.weight": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
             "final_norm.weight": "transformer.ln_f.weight",
             "final_norm.bias": "transformer.ln_f.bias", "head.weight": "lm_head.weight"},
}
_LAYER_PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}."}
_LAYER = {
    "llama": {"attn_norm.weight": ["input_layernorm.weight"],
              "mlp_norm.weight": ["post_attention_layernorm.weight"]},
    "gpt2": {},
}
for _w in ("weight", "bias"):
    _LAYER["llama"].update({
        f"attn.qkv.{_w}": [f"self_attn.{p}_proj.{_w}" for p in "qkv"],
        f"attn.proj.{_w}": [f"self_attn.o_proj.{_w}"],
        f"mlp.up.{_w}": [f"mlp.gate_proj.{_w}", f"mlp.up_proj.{_w}"],
        f"mlp.down.{_w}": [f"mlp.down_proj.{_w}"]})
    _LAYER["gpt2"].update({
        f"attn_norm.{_w}": [f"ln_1.{_w}"], f"mlp_norm.{_w}": [f"ln_2.{_w}"],
        f"attn.qkv.{_w}": [f"attn.c_attn.{_w}"],    # already fused [q; k; v]
        f"attn.proj.{_w}": [f"attn.c_proj.{_w}"],
        f"mlp.up.{_w}": [f"mlp.c_fc.{_w}"], f"mlp.down.{_w}": [f"mlp.c_proj.{_w}"]})


def _hf_keys(family: str, name: str) -> list[str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        return [_GLOBAL[family][name]]
    prefix = _LAYER_PREFIX[family].format(m.group(1))
    return [prefix + suffix for suffix in _LAYER[family][m.group(2)]]


def _is_conv1d(family: str, key: str) -> bool:
    """GPT-2's Conv1D stores weights as [in, out], the transpose of nn.Linear's."""
    return family == "gpt2" and key.endswith(".weight") and \
        any(p in key for p in (".c_attn.", ".c_proj.", ".c_fc."))


def _segment_sizes(cfg: GPTConfig, name: str) -> list[int]:
    """Sizes along dim 0 of the HF tensors fused into our ``name`` (export splits by them)."""
    if ".attn.qkv." in name:
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return [q, kv, kv]
    if ".mlp.up." in name and cfg.activation == "swiglu":
        return [cfg.d_ff, cfg.d_ff]
    return []


# ----------------------------------------------------------------------------- configs
# Fields the HF config decides: overriding them would change the function or the shapes.
_STRUCTURAL = ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "norm",
               "activation", "position", "tie_embeddings", "bias", "norm_eps", "rope_theta")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if hasattr(config, "to_dict"):     # transformers.PretrainedConfig
        return config.to_dict()
    raise ValueError(f"expected a Hugging Face config (PretrainedConfig, dict or config.json "
                     f"path), got {type(config).__name__}")


def _unsupported(field: str, value, fix: str):
    return ValueError(f"Hugging Face config has {field}={value!r}, which megalite's GPT cannot "
                      f"represent exactly; {fix}")


def _llama_config(hf: dict) -> dict:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "only 'silu' (SwiGLU) is supported")
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        raise _unsupported("head_dim", hf.get("head_dim"),
                           f"head_dim must equal hidden_size/num_attention_heads = {d / heads}")
    # transformers >= 5 keeps theta and scaling in rope_parameters; 4.x in two fields.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for params in (rope, scaling):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _unsupported("rope_scaling", params, "only plain RoPE (rope_type 'default') "
                               "is supported, no scaled or extended-context variants")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise _unsupported("attention_bias/mlp_bias",
                           (hf.get("attention_bias"), hf.get("mlp_bias")),
                           "GPTConfig.bias covers both, so they must be equal")
    return dict(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, d_model=d,
                d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="rmsnorm", activation="swiglu", position="rope",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bias=bool(hf.get("attention_bias", False)), norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))


def _gpt2_config(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise _unsupported("activation_function", act, f"use one of {sorted(_GPT2_ACTIVATIONS)}")
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(field, ok) != ok:
            raise _unsupported(field, hf[field], f"only {field}={ok} is supported")
    d = hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                n_kv_heads=hf["n_head"], d_model=d, d_ff=hf.get("n_inner") or 4 * d,
                max_seq_len=hf["n_positions"], norm="layernorm",
                activation=_GPT2_ACTIVATIONS[act], position="learned",
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), bias=True,
                norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def gpt_config_from_hf(config, **overrides) -> GPTConfig:
    """The GPTConfig computing the same function as a Llama or GPT-2 HF config.

    ``overrides`` set the fields HF does not decide (``kernels``, ``layers_per_stage``,
    ``sequence_parallel``, ``dropout`` (0 by default), ``max_seq_len`` for RoPE models...)."""
    hf = _as_dict(config)
    family = _family_of_hf(hf)
    base = _llama_config(hf) if family == "llama" else _gpt2_config(hf)
    for key, value in overrides.items():
        fixed = key in _STRUCTURAL or (key == "max_seq_len" and base["position"] == "learned")
        if fixed and value != base[key]:
            raise ValueError(f"{key}={value!r} conflicts with the Hugging Face config "
                             f"({key}={base[key]!r}); the weights fix it, drop the override")
    try:
        return GPTConfig(**{**base, **overrides})
    except TypeError as e:
        raise ValueError(f"bad GPTConfig override: {e}") from None


def _family_of_hf(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in ("llama", "gpt2"):
        raise _unsupported("model_type", kind, "from_hf imports 'llama' and 'gpt2' models")
    return kind


def _family_of(cfg: GPTConfig) -> str:
    """Which HF architecture computes the same function as ``cfg`` (or a ValueError)."""
    if (cfg.norm, cfg.activation, cfg.position) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    if (cfg.norm, cfg.position) == ("layernorm", "learned") and cfg.activation != "swiglu" \
            and cfg.bias and cfg.n_kv_heads == cfg.n_heads:
        return "gpt2"
    raise ValueError(f"no Hugging Face architecture matches norm={cfg.norm}, activation="
                     f"{cfg.activation}, position={cfg.position}, bias={cfg.bias}, n_kv_heads="
                     f"{cfg.n_kv_heads}: use rmsnorm+swiglu+rope (Llama) or layernorm+gelu+"
                     f"learned with bias and no GQA (GPT-2)")


def hf_config_from_gpt(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json contents for ``cfg`` (readable by transformers 4.x and 5.x)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if _family_of(cfg) == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.bias,
                "mlp_bias": cfg.bias, "torch_dtype": dtype_name}
    act = "gelu_new" if cfg.activation == "gelu_tanh" else "gelu"
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
           "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
           "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
           "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": cfg.dropout,
           "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0, "torch_dtype": dtype_name}
    if cfg.vocab_size <= 50256:  # GPT2Config's default bos/eos id 50256 would lie outside
        out.update(bos_token_id=None, eos_token_id=None)
    return out


# ----------------------------------------------------------------------------- weight sources
class _Tensors:
    """HF tensors by key, read on demand so each rank loads only its stage's weights."""

    def __init__(self, keys, read):
        self.keys, self._read = set(keys), read

    def get(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            # Bare LlamaModel / GPT2Model state dicts lack the "model." / "transformer." prefix.
            short = key.split(".", 1)[1] if key.startswith(("model.", "transformer.")) else None
            if short not in self.keys:
                raise KeyError(key)
            key = short
        return self._read(key)


class _BinFile:
    """A pytorch_model.bin with safe_open's interface (memory-mapped, tensors only)."""

    def __init__(self, path: str):
        self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self):
        return self._sd.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._sd[key]


def _open_directory(path: str, stack: contextlib.ExitStack) -> tuple[dict, _Tensors]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} has no config.json: pass a local save_pretrained directory "
                         f"(hub ids are not downloaded), or a state dict with config=...")
    present = set(os.listdir(path))
    index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if n in present), None)
    single = next((n for n in ("model.safetensors", "pytorch_model.bin") if n in present), None)
    if index is None and single is None:
        raise ValueError(f"{path} holds no model.safetensors or pytorch_model.bin weights")
    if index is not None:   # sharded checkpoint: key -> file name
        with open(os.path.join(path, index)) as f:
            files = json.load(f)["weight_map"]
    opened = {}

    def open_file(name):
        if name not in opened:
            full = os.path.join(path, name)
            if name.endswith(".safetensors"):
                try:
                    from safetensors import safe_open
                except ImportError:
                    raise ImportError("reading .safetensors needs the safetensors package: "
                                      "pip install 'megalite[hf]'") from None
                opened[name] = stack.enter_context(safe_open(full, framework="pt"))
            else:
                opened[name] = _BinFile(full)
        return opened[name]

    if index is None:
        files = dict.fromkeys(open_file(single).keys(), single)
    return _as_dict(config_path), _Tensors(files, lambda k: open_file(files[k]).get_tensor(k))


# ----------------------------------------------------------------------------- import
def from_hf(source, state: ParallelState | None = None, config=None, **cfg_overrides) -> GPT:
    """A GPT for ``state`` (default: the current ParallelState) with the weights of ``source``.

    ``source``: an in-memory ``LlamaForCausalLM`` / ``GPT2LMHeadModel``, a local
    ``save_pretrained`` directory, or a state dict (then ``config`` is its HF config, a
    PretrainedConfig, dict or config.json path). Each rank reads only its pipeline stage's
    tensors and keeps its TP shard. Not collective: every rank can load independently.
    """
    ps = state or get_state()
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            hf_config, tensors = _open_directory(os.fspath(source), stack)
        elif isinstance(source, dict):
            if config is None:
                raise ValueError("a state dict needs its Hugging Face config: "
                                 "from_hf(state_dict, config=hf_model.config)")
            hf_config, tensors = _as_dict(config), _Tensors(source, source.__getitem__)
        elif hasattr(source, "state_dict") and hasattr(source, "config"):
            hf_config = _as_dict(config if config is not None else source.config)
            sd = source.state_dict()
            tensors = _Tensors(sd, sd.__getitem__)
        else:
            raise ValueError(f"from_hf expects an HF model, a directory or a state dict, "
                             f"got {type(source).__name__}")
        cfg = gpt_config_from_hf(hf_config, **cfg_overrides)
        family = _family_of_hf(hf_config)
        # Building initializes random weights that are overwritten at once: keep the caller's
        # RNG stream as it was, so loading a model does not shift later sampling.
        with torch.random.fork_rng(devices=[]):
            model = GPT(cfg, state=ps)
        with torch.no_grad():
            for name, param in model.named_parameters():
                full = _full_tensor(family, name, tensors)
                try:
                    local = shard_full(full.to(param.dtype), param, ps)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                if local.shape != param.shape:
                    raise ValueError(f"{name}: Hugging Face weights {_hf_keys(family, name)} "
                                     f"give shape {tuple(local.shape)} on this rank, the model "
                                     f"expects {tuple(param.shape)} (config and weights differ?)")
                param.copy_(local)
    return model


def _full_tensor(family: str, name: str, tensors: _Tensors) -> torch.Tensor:
    """Our full (tp=1) tensor ``name``, assembled from HF tensors."""
    parts = []
    for key in _hf_keys(family, name):
        try:
            t = tensors.get(key)
        except KeyError:
            raise ValueError(f"the Hugging Face weights lack {key!r} (needed for {name}); "
                             f"is the checkpoint complete and of model_type {family!r}?") from None
        parts.append(t.t() if _is_conv1d(family, key) else t)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------- export
def save_hf(model: GPT, directory: str, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors).

    Collective: every rank of the world calls it. Each TP group gathers its stage's full
    tensors; the stages of the first data-parallel replica are sent to global rank 0, which
    writes; everyone returns once it has written (or raises if it failed). ``dtype`` casts
    the written weights (default: the parameters' own dtype)."""
    ps, cfg = model.ps, model.cfg
    family = _family_of(cfg)    # before any collective: an unrepresentable model fails fast
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    hf_config = hf_config_from_gpt(cfg, dtype)

    stage = {}
    for name, param in params.items():
        # collective over the TP group, same order everywhere; on the host at once
        stage[name] = gather_full_to_cpu(param, ps, dtype=dtype)

    writer = ps.tp_rank == 0 and ps.dp_rank == 0 and ps.pp_rank == 0
    if ps.tp_rank == 0 and ps.dp_rank == 0:
        # One pipeline (the first replica's tp-rank-0 chain) ships its stages to the writer,
        # tensor by tensor; tied embeddings: the last stage's copy is not sent.
        stage = send_stages_to_first(stage, ps)
    error = None
    if writer:
        try:
            _write(family, cfg, stage, hf_config, directory)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    comm.agree(error, f"save_hf to {directory}")


def _write(family: str, cfg: GPTConfig, full: dict, hf_config: dict, directory: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("save_hf writes safetensors: pip install 'megalite[hf]'") from None
    out = {}
    for name, tensor in full.items():
        keys = _hf_keys(family, name)
        pieces = tensor.split(_segment_sizes(cfg, name), dim=0) if len(keys) > 1 else [tensor]
        for key, piece in zip(keys, pieces):
            # safetensors refuses views that share storage: every tensor is its own copy.
            out[key] = (piece.t() if _is_conv1d(family, key) else piece).contiguous().clone()
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
