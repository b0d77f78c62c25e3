"""Hugging Face interop: import a Llama (2, 3.x), Qwen2/2.5, Qwen3, Mistral or GPT-2 causal
LM into a GPT of any (tp, pp) layout, and export a GPT as a directory that
``from_pretrained`` loads. Configs are translated in ``hf_config``.

    model = from_hf(hf_model_or_directory_or_state_dict)   # this rank's stage, TP-sharded
    save_hf(model, "out/")                                  # collective; rank 0 writes

Every weight goes through one table (``_GLOBAL`` / ``_LAYER``): our parameter name -> the
Hugging Face keys it is made of (Qwen2/3 and Mistral use Llama's names). Import reads of
those tensors only the slices this rank's shard holds (``shard_full`` says which, see
``_local_tensor``; ``hf_files`` reads them); export gathers tensor by tensor to the host
(``gather_full_to_cpu``) and splits them again. transformers itself is never imported:
configs are plain dicts (``hf_config``), safetensors files are read directly and ``.bin``
files with torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import re

import torch

from megalite.models.config import GPTConfig
from megalite.models.gpt import GPT
from megalite.models.hf_config import (as_dict, family_of, family_of_hf, gpt_config_from_hf,
                                       hf_config_from_gpt)
from megalite.models.hf_files import Tensors, open_directory
from megalite.models.hf_moe import SHARED_KEYS, is_routed, local_routed, routed_to_hf
from megalite.parallel import comm
from megalite.parallel.param_meta import param_meta
from megalite.parallel.sharding import (gather_full_to_cpu, is_tp_sharded, send_stages_to_first,
                                       shard_full)
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
              "mlp_norm.weight": ["post_attention_layernorm.weight"],
              "attn.q_norm.weight": ["self_attn.q_norm.weight"],     # Qwen3
              "attn.k_norm.weight": ["self_attn.k_norm.weight"]},
    "gpt2": {},
}
_LAYER["llama"].update(SHARED_KEYS)   # Qwen2-MoE's shared expert (routed experts: hf_moe)
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


def _layout(family: str) -> str:
    """The name table a family uses: Qwen2/3 and Mistral name their weights as Llama does."""
    return "gpt2" if family == "gpt2" else "llama"


def _hf_keys(family: str, name: str) -> list[str]:
    family = _layout(family)
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
    if ".mlp.shared.up." in name:
        return [cfg.moe_shared_d_ff, cfg.moe_shared_d_ff]
    return []


# ----------------------------------------------------------------------------- import
def from_hf(source, state: ParallelState | None = None, config=None, *,
            stages: list[int] | None = None, num_stages: int | None = None,
            **cfg_overrides) -> GPT:
    """A GPT for ``state`` (default: the current ParallelState) with the weights of ``source``.

    ``source``: an in-memory HF causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
    ``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``GPT2LMHeadModel``), a local
    ``save_pretrained`` directory, or a state dict (then ``config`` is its HF config, a
    PretrainedConfig, dict or config.json path). Each rank reads only its pipeline stages'
    tensors (``stages`` of ``num_stages``, as for :class:`GPT`: one per rank by default) and
    keeps its TP shard. Not collective: every rank can load independently.
    The model remembers its architecture (``model.hf_model_type``) for :func:`save_hf`.
    """
    ps = state or get_state()
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            hf_config, tensors = open_directory(os.fspath(source), stack)
        elif isinstance(source, dict):
            if config is None:
                raise ValueError("a state dict needs its Hugging Face config: "
                                 "from_hf(state_dict, config=hf_model.config)")
            hf_config, tensors = as_dict(config), Tensors.in_memory(source)
        elif hasattr(source, "state_dict") and hasattr(source, "config"):
            hf_config = as_dict(config if config is not None else source.config)
            tensors = Tensors.in_memory(source.state_dict())
        else:
            raise ValueError(f"from_hf expects an HF model, a directory or a state dict, "
                             f"got {type(source).__name__}")
        cfg = gpt_config_from_hf(hf_config, **cfg_overrides)
        family = family_of_hf(hf_config)
        # Building initializes random weights that are overwritten at once: draw only this
        # rank's shards (master_init=False: no full tensor is ever made, so memory stays at
        # the shard), and keep the caller's RNG stream as it was, so loading a model does
        # not shift later sampling.
        build_cfg = cfg.replace(master_init=False)
        with torch.random.fork_rng(devices=[]):
            model = GPT(build_cfg, state=ps, stages=stages, num_stages=num_stages)
        for module in model.modules():
            if getattr(module, "cfg", None) is build_cfg:
                module.cfg = cfg
        with torch.no_grad():
            for name, param in model.named_parameters():
                try:
                    local = local_routed(family, name, cfg, tensors, getattr(ps, "ep", 1),
                                         getattr(ps, "ep_rank", 0)).to(param.dtype) \
                        if is_routed(name) else _local_tensor(family, name, param, tensors, ps)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                if local.shape != param.shape:
                    raise ValueError(f"{name}: Hugging Face weights {_hf_keys(family, name)} "
                                     f"give shape {tuple(local.shape)} on this rank, the model "
                                     f"expects {tuple(param.shape)} (config and weights differ?)")
                param.copy_(local)
    model.hf_model_type = family
    return model


def _missing(family: str, name: str, key: str) -> ValueError:
    return ValueError(f"the Hugging Face weights lack {key!r} (needed for {name}); is the "
                      f"checkpoint complete and of model_type {family!r}?")


def _full_tensor(family: str, name: str, tensors: Tensors) -> torch.Tensor:
    """Our full (tp=1) tensor ``name``, assembled from HF tensors."""
    parts = []
    for key in _hf_keys(family, name):
        try:
            t = tensors.get(key)
        except KeyError:
            raise _missing(family, name, key) from None
        parts.append(t.t() if _is_conv1d(family, key) else t)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def _local_tensor(family: str, name: str, param: torch.Tensor, tensors: Tensors,
                  ps: ParallelState) -> torch.Tensor:
    """This rank's shard of ``name``, reading only the slices of the HF tensors it needs.

    Which entries along the sharded dim land here is asked of ``shard_full`` itself, on a
    tensor of their 1-based positions (0 = vocabulary padding): so this reads exactly what
    sharding the assembled full tensor would keep."""
    keys = _hf_keys(family, name)
    if not is_tp_sharded(param) or ps.tp == 1:
        return _full_tensor(family, name, tensors).to(param.dtype)
    dim = param_meta(param).tp_dim
    try:
        lengths = [tensors.shape(k)[1 - dim if _is_conv1d(family, k) else dim] for k in keys]
    except KeyError as e:
        raise _missing(family, name, e.args[0]) from None
    index_shape = [1] * param.dim()
    index_shape[dim] = sum(lengths)
    positions = torch.arange(1, sum(lengths) + 1, dtype=torch.float64).view(index_shape)
    mine = shard_full(positions, param, ps).flatten().long()
    pieces, offset = [], 0
    for key, length in zip(keys, lengths):
        here = mine[(mine > offset) & (mine <= offset + length)] - offset - 1
        # Runs of consecutive entries: one per segment of ours that this HF tensor holds
        # (GPT-2's c_attn is [q; k; v] in one tensor, so three).
        breaks = (torch.nonzero(here.diff() != 1).flatten() + 1).tolist()
        for run in here.tensor_split(breaks) if len(here) else []:
            conv = _is_conv1d(family, key)
            piece = tensors.get(key, 1 - dim if conv else dim, int(run[0]), int(run[-1]) + 1)
            pieces.append(piece.t() if conv else piece)
        offset += length
    if not pieces:     # a shard made of vocabulary padding only
        return param.new_zeros(param.shape)
    local = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
    padding = int((mine == 0).sum())
    if padding:    # vocabulary rows beyond the real ones: zeros, as shard_full pads
        local = torch.cat([local, local.new_zeros(*local.shape[:dim], padding,
                                                  *local.shape[dim + 1:])], dim)
    return local.to(param.dtype)


# ----------------------------------------------------------------------------- export
def save_hf(model: GPT, directory: str, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors).

    Collective: every rank of the world calls it. Each TP group gathers its stage's full
    tensors; the stages of the first data-parallel replica are sent to global rank 0, which
    writes; everyone returns once it has written (or raises if it failed). ``dtype`` casts
    the written weights (default: the parameters' own dtype). The architecture is the one
    the model was imported from, else the one ``hf_config.family_of`` picks for its config
    (q/k norms: Qwen3, q/k/v biases: Qwen2, a sliding window: Mistral, else Llama / GPT-2)."""
    ps, cfg = model.ps, model.cfg
    # Before any collective: an unrepresentable model fails fast on every rank.
    family = family_of(cfg, prefer=getattr(model, "hf_model_type", None))
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    hf_config = hf_config_from_gpt(cfg, dtype, family)

    stage = {}
    for name, param in params.items():
        # collective over the TP group, same order everywhere; on the host at once
        stage[name] = gather_full_to_cpu(param, ps, dtype=dtype)

    first_replica = ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0
    writer = first_replica and ps.pp_rank == 0
    if first_replica:
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
        if is_routed(name):
            out.update({k: v.contiguous().clone()
                        for k, v in routed_to_hf(family, name, tensor, cfg).items()})
            continue
        keys = _hf_keys(family, name)
        pieces = tensor.split(_segment_sizes(cfg, name), dim=0) if len(keys) > 1 else [tensor]
        for key, piece in zip(keys, pieces):
            # safetensors refuses views that share storage: every tensor is its own copy.
            out[key] = (piece.t() if _is_conv1d(family, key) else piece).contiguous().clone()
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
