"""Hugging Face configs <-> GPTConfig, for the architectures megalite computes exactly:
``llama`` (2, 3.x with RoPE scaling), ``qwen2`` (2 / 2.5), ``qwen3``, ``mistral`` and
``gpt2``. Configs are plain dicts (config.json); transformers is never imported.

A field megalite cannot represent exactly is refused with a ValueError naming the field
and its value, never silently dropped (docs/hf.md lists them).
"""
from __future__ import annotations

import json
import os

import torch

from megalite.models.config import GPTConfig
from megalite.models.hf_moe import (ARCHITECTURES as _MOE_ARCHITECTURES, ATTENTION_FAMILY,
                                    MOE_FAMILIES, moe_config_from_hf, moe_config_to_hf,
                                    moe_unwritable)
from megalite.models.rope_scaling import ROPE_SCALING_FIELDS

# Llama-style families: RMSNorm, SwiGLU, RoPE and the same weight names (hf.py).
ROPE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral") + MOE_FAMILIES
FAMILIES = ROPE_FAMILIES + ("gpt2",)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                  "gpt2": "GPT2LMHeadModel", **_MOE_ARCHITECTURES}

# Fields the HF config decides: overriding them would change the function or the shapes.
_STRUCTURAL = ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "norm",
               "activation", "position", "tie_embeddings", "bias", "norm_eps", "rope_theta",
               "rope_scaling", "head_dim", "qkv_bias", "qk_norm", "sliding_window",
               "moe_num_experts", "moe_top_k", "moe_d_ff", "moe_shared_d_ff", "moe_shared_gate",
               "moe_norm_topk", "moe_layer_freq", "moe_dense_layers", "moe_router")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def as_dict(config) -> dict:
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


def family_of_hf(hf: dict) -> str:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise _unsupported("model_type", kind, f"from_hf imports {', '.join(FAMILIES)} models")
    return kind


# ----------------------------------------------------------------------------- import
def _rope_scaling(hf: dict) -> tuple[float, dict | None]:
    """(theta, GPTConfig.rope_scaling) from transformers 5's ``rope_parameters`` or 4.x's
    ``rope_theta`` + ``rope_scaling`` (the same keys inside)."""
    params = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", params, "one RoPE for every layer is supported, "
                           "not per-layer-type parameters")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise _unsupported("partial_rotary_factor", partial, "RoPE must rotate the whole head")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_FIELDS:
        raise _unsupported("rope_type", kind, f"supported: default, "
                           f"{', '.join(sorted(ROPE_SCALING_FIELDS))}")
    if kind in ("llama3", "yarn"):   # HF's defaults: the context the config states
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings",
                                 hf.get("max_position_embeddings")))
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = hf["max_position_embeddings"] / \
            params["original_max_position_embeddings"]
    unknown = sorted(set(params) - set(ROPE_SCALING_FIELDS[kind]))
    if unknown:
        raise _unsupported(f"rope_parameters.{unknown[0]}", params[unknown[0]],
                           f"{kind} RoPE takes {sorted(ROPE_SCALING_FIELDS[kind])}")
    return theta, {"type": kind, **params}


def _sliding_window(family: str, hf: dict) -> int | None:
    """The one window every layer uses, or None; per-layer mixes are refused."""
    if family == "mistral":      # MistralModel applies config.sliding_window to every layer
        return hf.get("sliding_window")
    if family == "llama":
        return None
    # Qwen2/3: the window is on only if use_sliding_window, and then on the layer_types
    # marked "sliding_attention" (by default the layers from max_window_layers on).
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is None:
        return None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    raise _unsupported("layer_types", types, "megalite uses one attention kind in every "
                       "layer (all full, or all sliding-window)")


def _rope_family_config(family: str, hf: dict) -> dict:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "only 'silu' (SwiGLU) is supported")
    head_dim = hf.get("head_dim") or d // heads
    if hf.get("head_dim") is None and d % heads:
        raise _unsupported("hidden_size", d, f"without head_dim it must divide by "
                           f"num_attention_heads={heads}")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if family == "llama" and attention_bias != mlp_bias:
        raise _unsupported("attention_bias/mlp_bias", (attention_bias, mlp_bias),
                           "GPTConfig.bias covers both, so they must be equal")
    if family == "qwen3" and attention_bias:   # (Qwen2 and Mistral hard-code their biases)
        raise _unsupported("attention_bias", True, "Qwen3's attention_bias puts a bias on "
                           "o_proj but none on the MLP, which GPTConfig cannot express (its "
                           "qkv_bias is q/k/v only, bias is everywhere)")
    theta, scaling = _rope_scaling(hf)
    return dict(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                n_kv_heads=hf.get("num_key_value_heads") or heads, d_model=d,
                d_ff=hf["intermediate_size"], head_dim=head_dim,
                max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="rmsnorm", activation="swiglu", position="rope",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bias=family == "llama" and bool(attention_bias),
                qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                sliding_window=_sliding_window(family, hf),
                norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling)


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
    """The GPTConfig computing the same function as an HF config of model_type llama,
    qwen2, qwen3, mistral or gpt2.

    ``overrides`` set the fields HF does not decide (``kernels``, ``layers_per_stage``,
    ``sequence_parallel``, ``dropout`` (0 by default), ``max_seq_len`` for RoPE models...)."""
    hf = as_dict(config)
    family = family_of_hf(hf)
    if family == "gpt2":
        base = _gpt2_config(hf)
    else:
        base = _rope_family_config(ATTENTION_FAMILY.get(family, family), hf)
    if family in MOE_FAMILIES:
        base.update(moe_config_from_hf(family, hf, _unsupported))
    for key, value in overrides.items():
        fixed = key in _STRUCTURAL or (key == "max_seq_len" and base["position"] == "learned")
        if fixed and value != base.get(key):
            raise ValueError(f"{key}={value!r} conflicts with the Hugging Face config "
                             f"({key}={base.get(key)!r}); the weights fix it, drop the override")
    try:
        return GPTConfig(**{**base, **overrides})
    except TypeError as e:
        raise ValueError(f"bad GPTConfig override: {e}") from None


# ----------------------------------------------------------------------------- export
def _unwritable(family: str, cfg: GPTConfig) -> str | None:
    """Why ``family`` cannot express ``cfg`` (None: it can)."""
    if family in MOE_FAMILIES:
        return moe_unwritable(family, cfg) or _unwritable(ATTENTION_FAMILY[family],
                                                          cfg.replace(moe_num_experts=0))
    if cfg.moe_num_experts:
        return f"{family} is dense and this model has experts"
    if family == "gpt2":
        if (cfg.norm, cfg.position) == ("layernorm", "learned") and \
                cfg.activation != "swiglu" and cfg.bias and cfg.n_kv_heads == cfg.n_heads:
            return None
        return "GPT-2 is layernorm + gelu + learned positions, with biases and no GQA"
    if (cfg.norm, cfg.activation, cfg.position) != ("rmsnorm", "swiglu", "rope"):
        return f"{family} is rmsnorm + swiglu + rope"
    features = {"bias": cfg.bias, "qkv_bias": cfg.qkv_bias and not cfg.bias,
                "qk_norm": cfg.qk_norm, "sliding_window": cfg.sliding_window is not None}
    on = {name for name, used in features.items() if used}
    extra = on - _EXPRESSES[family]
    missing = _ALWAYS_HAS.get(family, set()) - on
    if extra or missing:
        return (f"{family} " + (f"has no {sorted(extra)}" if extra else "") +
                (" and " if extra and missing else "") +
                (f"always has {sorted(missing)}" if missing else ""))
    return None


# What each architecture can express, and what it always has (HF's Qwen2 hard-codes the
# q/k/v biases, Qwen3 the q/k norms).
_EXPRESSES = {"llama": {"bias"}, "qwen2": {"qkv_bias", "sliding_window"},
              "qwen3": {"qk_norm", "sliding_window"}, "mistral": {"sliding_window"}}
_ALWAYS_HAS = {"qwen2": {"qkv_bias"}, "qwen3": {"qk_norm"}}


def family_of(cfg: GPTConfig, prefer: str | None = None) -> str:
    """The HF architecture that computes ``cfg``: ``prefer`` (e.g. the family a model was
    imported from) when it can, else the first of qwen3, qwen2, llama, mistral, gpt2 that
    can (so q/k norms export as Qwen3, q/k/v biases alone as Qwen2, a window as Mistral)."""
    order = ([prefer] if prefer in FAMILIES else []) + ["qwen3_moe", "qwen2_moe", "mixtral",
                                                        "qwen3", "qwen2", "llama", "mistral",
                                                        "gpt2"]
    for family in order:
        if _unwritable(family, cfg) is None:
            return family
    if cfg.moe_num_experts:
        reasons = "; ".join(_unwritable(f, cfg) for f in ("mixtral", "qwen2_moe", "qwen3_moe"))
        raise ValueError(f"no Hugging Face MoE architecture matches this model: {reasons}")
    raise ValueError(f"no Hugging Face architecture matches norm={cfg.norm}, activation="
                     f"{cfg.activation}, position={cfg.position}, bias={cfg.bias}, qkv_bias="
                     f"{cfg.qkv_bias}, qk_norm={cfg.qk_norm}, n_kv_heads={cfg.n_kv_heads}: "
                     f"use rmsnorm+swiglu+rope (Llama, Qwen2/3, Mistral) or layernorm+gelu+"
                     f"learned with bias and no GQA (GPT-2)")


def _rope_fields(cfg: GPTConfig) -> dict:
    """RoPE as transformers 5 (rope_parameters) and 4.x (rope_theta, rope_scaling) read it."""
    scaling = {k: v for k, v in (cfg.rope_scaling or {}).items() if v is not None}
    kind = scaling.pop("type", "default")
    out = {"rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_theta, **scaling}}
    if kind != "default":
        out["rope_scaling"] = {"rope_type": kind, **scaling}
    return out


def hf_config_from_gpt(cfg: GPTConfig, dtype: torch.dtype = torch.float32,
                       family: str | None = None) -> dict:
    """config.json contents for ``cfg`` (readable by transformers 4.x and 5.x), as
    ``family`` (default: :func:`family_of`)."""
    family = family or family_of(cfg)
    reason = _unwritable(family, cfg)
    if reason:
        raise ValueError(f"cannot write this GPTConfig as {family}: {reason}")
    dtype_name = str(dtype).removeprefix("torch.")
    head = {"architectures": [_ARCHITECTURES[family]], "model_type": family,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": dtype_name}
    if family == "gpt2":
        act = "gelu_new" if cfg.activation == "gelu_tanh" else "gelu"
        out = {**head, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
               "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
               "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
               "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0}
        if cfg.vocab_size <= 50256:  # GPT2Config's default bos/eos id 50256 would lie outside
            out.update(bos_token_id=None, eos_token_id=None)
        return out
    out = {**head, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, **_rope_fields(cfg)}
    attention = ATTENTION_FAMILY.get(family, family)
    if family in MOE_FAMILIES:
        out.update(moe_config_to_hf(family, cfg))
    if family == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif attention == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:   # qwen2/qwen3: every layer sliding (max_window_layers=0) or none
        window = cfg.sliding_window is not None
        out.update(use_sliding_window=window, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if window else cfg.n_layers,
                   layer_types=[("sliding" if window else "full") + "_attention"] * cfg.n_layers)
        if attention == "qwen3":
            out.update(attention_bias=False)
    return out
