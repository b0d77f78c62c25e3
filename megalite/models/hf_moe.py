"""Hugging Face Mixture-of-Experts families: Mixtral, Qwen2-MoE, Qwen3-MoE.

Their attention and norms are Mistral's, Qwen2's and Qwen3's (hf.py's tables); this file
maps the MoE MLP. Checkpoints on disk (``save_pretrained``, the hub) hold one tensor per
expert and projection:

* Mixtral: ``block_sparse_moe.gate.weight`` (router), ``block_sparse_moe.experts.{e}.w1``
  (gate), ``w3`` (up), ``w2`` (down);
* Qwen2/3-MoE: ``mlp.gate.weight``, ``mlp.experts.{e}.gate_proj / up_proj / down_proj``,
  and Qwen2-MoE's shared expert ``mlp.shared_expert.*_proj`` with its sigmoid gate
  ``mlp.shared_expert_gate.weight``.

transformers 5 keeps the experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2f, d],
``mlp.experts.down_proj`` [E, d, f], router ``mlp.gate.weight``), so an in-memory model's
state dict has those: import reads either, export writes the per-expert form, which every
transformers version loads. Each rank reads only its own experts.
"""
from __future__ import annotations

import re

import torch

from megalite.parallel.experts import split_experts

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# The dense family whose attention / norms / names each MoE family shares.
ATTENTION_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
_PROJ = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
         "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
_ROUTED = re.compile(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.up|experts\.down)")

# Shared expert (Qwen2-MoE): our suffix -> HF suffixes, tensor-parallel like a dense MLP.
SHARED_KEYS = {"mlp.shared.up.weight": ["mlp.shared_expert.gate_proj.weight",
                                        "mlp.shared_expert.up_proj.weight"],
               "mlp.shared.down.weight": ["mlp.shared_expert.down_proj.weight"],
               "mlp.shared_gate": ["mlp.shared_expert_gate.weight"]}


def _block(family: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if family == "mixtral" else "mlp.")


def is_routed(name: str) -> bool:
    """Whether our parameter ``name`` is a router or stacked experts (read by this file)."""
    return _ROUTED.fullmatch(name) is not None


def _has(tensors, key: str) -> bool:
    try:
        tensors.shape(key)
        return True
    except KeyError:
        return False


def local_routed(family: str, name: str, cfg, tensors, ep: int, ep_rank: int) -> torch.Tensor:
    """This rank's router weight or its experts' stacked tensor, from per-expert or fused
    Hugging Face tensors."""
    layer, what = _ROUTED.fullmatch(name).groups()
    block, fused = _block(family, layer := int(layer)), f"model.layers.{layer}.mlp."
    if what == "router.weight":
        key = block + "gate.weight" if _has(tensors, block + "gate.weight") \
            else fused + "gate.weight"
        return tensors.get(key)
    local = split_experts(cfg.moe_num_experts, ep, ep_rank)
    fused_key = fused + ("experts.gate_up_proj" if what == "experts.up" else
                         "experts.down_proj")
    if _has(tensors, fused_key):
        return tensors.get(fused_key, 0, local.start, local.stop)
    gate, up, down = _PROJ[family]
    parts = []
    for e in local:
        keys = [gate, up] if what == "experts.up" else [down]
        try:
            parts.append(torch.cat([tensors.get(f"{block}experts.{e}.{k}.weight")
                                    for k in keys]))
        except KeyError as err:
            raise ValueError(f"the Hugging Face weights lack {err.args[0]!r} (needed for "
                             f"{name}); is the checkpoint complete and of model_type "
                             f"{family!r}?") from None
    return torch.stack(parts)


def routed_to_hf(family: str, name: str, full: torch.Tensor, cfg) -> dict:
    """Our full router weight or stacked experts [E, ...] as per-expert HF tensors."""
    layer, what = _ROUTED.fullmatch(name).groups()
    block = _block(family, int(layer))
    if what == "router.weight":
        return {block + "gate.weight": full}
    gate, up, down = _PROJ[family]
    out = {}
    for e in range(full.shape[0]):
        if what == "experts.up":
            g, u = full[e].split(cfg.moe_d_ff)
            out[f"{block}experts.{e}.{gate}.weight"] = g
            out[f"{block}experts.{e}.{up}.weight"] = u
        else:
            out[f"{block}experts.{e}.{down}.weight"] = full[e]
    return out


# ----------------------------------------------------------------------------- configs
def _aux_coeff(hf: dict) -> float:
    """Hugging Face adds ``router_aux_loss_coef`` x its balancing loss only when
    ``output_router_logits`` is set: so does the import (else the coefficient is 0)."""
    return float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0


def moe_config_from_hf(family: str, hf: dict, unsupported) -> dict:
    """The GPTConfig MoE fields of an HF MoE config; ``unsupported(field, value, fix)``
    makes the ValueError for what megalite cannot represent."""
    if family == "mixtral":
        if hf.get("router_jitter_noise", 0.0):
            raise unsupported("router_jitter_noise", hf["router_jitter_noise"],
                              "megalite's router adds no noise; set it to 0")
        return dict(moe_num_experts=hf["num_local_experts"],
                    moe_top_k=hf["num_experts_per_tok"], moe_d_ff=hf["intermediate_size"],
                    moe_norm_topk=True,
                    moe_aux_loss_coeff=_aux_coeff(hf))
    # transformers 5 names Qwen's num_experts num_local_experts (and maps the old name)
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    out = dict(moe_num_experts=experts, moe_top_k=hf["num_experts_per_tok"],
               moe_d_ff=hf["moe_intermediate_size"],
               moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
               moe_layer_freq=int(hf.get("decoder_sparse_step", 1)),
               moe_dense_layers=tuple(hf.get("mlp_only_layers") or ()),
               moe_aux_loss_coeff=_aux_coeff(hf))
    if family == "qwen2_moe":
        out.update(moe_shared_d_ff=hf["shared_expert_intermediate_size"], moe_shared_gate=True)
    return out


def moe_unwritable(family: str, cfg) -> str | None:
    """Why ``family`` cannot express ``cfg``'s MoE (None: it can)."""
    if not cfg.moe_num_experts:
        return f"{family} is a mixture of experts and this model is dense"
    if cfg.moe_router != "softmax" or cfg.moe_routed_scaling != 1.0 or \
            cfg.moe_capacity_factor is not None:
        return f"{family} routes by softmax top-k, dropless, unscaled"
    if family == "mixtral":
        if cfg.moe_layers != list(range(cfg.n_layers)) or cfg.moe_shared_d_ff or \
                not cfg.moe_norm_topk or cfg.moe_d_ff != cfg.d_ff:
            return ("mixtral has experts of d_ff in every layer, renormalized top-k, no "
                    "shared expert")
        return None
    if cfg.moe_first_k_dense and cfg.moe_layer_freq != 1:
        return f"{family} cannot combine first_k_dense with a layer frequency"
    if family == "qwen2_moe" and not (cfg.moe_shared_d_ff and cfg.moe_shared_gate):
        return "qwen2_moe always has a gated shared expert"
    if family == "qwen3_moe" and cfg.moe_shared_d_ff:
        return "qwen3_moe has no shared expert"
    return None


def moe_config_to_hf(family: str, cfg) -> dict:
    if family == "mixtral":
        return dict(num_local_experts=cfg.moe_num_experts, num_experts_per_tok=cfg.moe_top_k,
                    router_aux_loss_coef=cfg.moe_aux_loss_coeff, router_jitter_noise=0.0,
                    output_router_logits=cfg.moe_aux_loss_coeff > 0)
    dense = sorted(set(cfg.moe_dense_layers) | set(range(cfg.moe_first_k_dense)))
    out = dict(num_experts=cfg.moe_num_experts, num_local_experts=cfg.moe_num_experts,
               num_experts_per_tok=cfg.moe_top_k, moe_intermediate_size=cfg.moe_d_ff, norm_topk_prob=cfg.moe_norm_topk,
               decoder_sparse_step=cfg.moe_layer_freq, mlp_only_layers=dense,
               router_aux_loss_coef=cfg.moe_aux_loss_coeff,
               output_router_logits=cfg.moe_aux_loss_coeff > 0)
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.moe_shared_d_ff)
    return out
