"""Parameters a rank holds, and the bytes they cost in each precision and sharding mode.

Counts (:func:`stage_parameter_counts`) follow GPT's build: a stage's layers at 1/tp
(attention, dense MLPs, shared experts), the experts of MoE layers whole, ``E/ep`` per rank
(expert tp = 1), the router and norms replicated, the embedding on the first stage, the
head and final norm on the last (its own copy of a tied table), the vocabulary padded to a
multiple of tp.

Bytes per parameter (:func:`static_bytes`; S = the ranks a parameter's gradient reduces
over: dp x cp for dense parameters, the expert-data-parallel ranks tp*cp*dp/ep for experts;
the optimizer state is divided by S with the distributed optimizer or FSDP):

============================  ================  =========  ================  ==============
mode                          parameters        gradients  optimizer state   weight casts
============================  ================  =========  ================  ==============
16-bit params (``--dtype``)   2                 4 (fp32)   12/S: main w, m, v  0
autocast (``--autocast``)     4                 4          8/S: m, v         2 (matmuls)
fp32                          4                 4          8/S               0
FSDP, any mode                4/S (fp32 shard)  4/S        8/S               (autocast: 2
                                                                             per working
                                                                             weight)
============================  ================  =========  ================  ==============

At dp = 8, 16-bit parameters with the distributed optimizer hold 2 + 4 + 12/8 = 7.5 bytes
per parameter (Megatron-Core's ``dist_optimizer.md`` table); autocast 4 + 4 + 2 + 1 = 11.

FSDP also holds unsharded *working* copies (``fsdp_working``), as megalite's FSDP
(``megalite.parallel.fsdp``) runs it: every transformer block is one ``fully_shard`` group,
gathered before its forward and freed after, gathered again in backward, its gradient
reduce-scattered after every microbatch's backward; the root group (embedding, final norm,
output head) is gathered at its first forward and stays gathered for the step, its
gradients accumulating unsharded. So: the current and the prefetched block in the compute
dtype plus one block's fp32 gradient before its reduce-scatter, (2 a + 4) x the largest
block, and (a + 4) x the root's parameters on the stages that hold them (a = 2 or 4 bytes).
"""
from __future__ import annotations

from megalite.models.config import GPTConfig
from megalite.parallel.layers import padded_vocab_size
from megalite.pipeline import layers_per_stage

from megalite.plan.layout import Layout


def mlp_mats(cfg: GPTConfig) -> int:
    """Weight matrices of one MLP: gate, up, down (SwiGLU) or up, down."""
    return 3 if cfg.activation == "swiglu" else 2


def expert_d_ff(cfg: GPTConfig) -> int:
    return cfg.moe_d_ff or cfg.d_ff


def stage_layers(cfg: GPTConfig, num_stages: int, stage: int) -> range:
    """The global indices of the layers of pipeline stage ``stage``."""
    counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def layer_counts(cfg: GPTConfig, moe: bool, tp: int = 1, ep: int = 1) -> dict[str, int]:
    """Parameters of a dense or (``moe``) MoE layer on one rank: 'matmul' (linear weights,
    attention and MLP at 1/tp, experts E/ep whole), 'expert' (the experts' share of it),
    'other' (norms, router, biases), 'active' (what one token uses: top-k experts, whole
    model, unsharded)."""
    d, e, f = cfg.d_model, cfg.head_dim, cfg.d_ff
    h, g = cfg.n_heads, cfg.n_kv_heads
    attention = d * (h + 2 * g) * e + h * e * d
    other = 2 * d * (2 if cfg.norm == "layernorm" else 1)
    other += 2 * e if cfg.qk_norm else 0                # replicated q/k norm weights
    if cfg.qkv_bias and not cfg.bias:
        other += (h + 2 * g) * e // tp
    if cfg.bias:
        other += ((h + 2 * g) * e + (2 if cfg.activation == "swiglu" else 1) * f) // tp + 2 * d
    if not moe:
        mlp = mlp_mats(cfg) * d * f
        return {"matmul": (attention + mlp) // tp, "expert": 0, "other": other,
                "active": attention + mlp + other}
    one_expert = mlp_mats(cfg) * d * expert_d_ff(cfg)
    shared = mlp_mats(cfg) * d * cfg.moe_shared_d_ff
    router = d * cfg.moe_num_experts
    experts = cfg.moe_num_experts // ep * one_expert
    return {"matmul": (attention + shared) // tp + experts, "expert": experts,
            "other": other + router,
            "active": attention + shared + cfg.moe_top_k * one_expert + router + other}


def stage_parameter_counts(cfg: GPTConfig, tp: int, stages: list[int], num_stages: int,
                           ep: int = 1) -> dict[str, int]:
    """Parameters one rank holds for ``stages``: 'matmul' (linear weights), 'other' (norms,
    embedding tables, router, biases), 'total', 'expert' (the experts among them), 'cast'
    (the weights autocast copies to 16 bits: matmuls and a tied head's table), 'unit' (the
    largest layer: FSDP's largest block), 'root' (what is not in a layer: embedding, final
    norm, head: FSDP's root group)."""
    d = cfg.d_model
    table = padded_vocab_size(cfg.vocab_size, tp, cfg.pad_vocab_to) // tp * d
    matmul = other = expert = unit = layers = 0
    counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)
    for s in stages:
        start = sum(counts[:s])
        n_moe = sum(map(cfg.is_moe_layer, range(start, start + counts[s]))) \
            if cfg.moe_num_experts else 0
        for moe, n in ((False, counts[s] - n_moe), (True, n_moe)):
            if n:
                c = layer_counts(cfg, moe, tp, ep)
                matmul, other, expert = (matmul + n * c["matmul"], other + n * c["other"],
                                         expert + n * c["expert"])
                unit = max(unit, c["matmul"] + c["other"])
                layers += n * (c["matmul"] + c["other"])
    first, last = 0 in stages, num_stages - 1 in stages
    if first or (last and cfg.tie_embeddings):
        other += table   # the embedding (a tied last stage elsewhere keeps its own copy)
    if first and cfg.position == "learned":
        other += cfg.max_seq_len * d
    if last:
        other += d * (2 if cfg.norm == "layernorm" else 1)
        if not cfg.tie_embeddings:
            matmul += table
    # the head's matmul weight: its own, or the (tied) embedding table, cast like any weight
    head_cast = table if last else 0
    return {"matmul": matmul, "other": other, "total": matmul + other, "expert": expert,
            "cast": matmul + (head_cast if cfg.tie_embeddings else 0), "unit": unit,
            "root": matmul + other - layers}


def model_parameters(cfg: GPTConfig, active: bool = False) -> int:
    """All parameters of the model (unsharded, unpadded); ``active``: those one token uses
    (top-k experts of each MoE layer). Equals ``GPTConfig.num_params()`` for dense models."""
    d = cfg.d_model
    key = "active" if active else None
    layers = 0
    for i in range(cfg.n_layers):
        c = layer_counts(cfg, cfg.is_moe_layer(i))
        layers += c["active"] if key else c["matmul"] + c["other"]
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    if cfg.position == "learned":
        emb += cfg.max_seq_len * d
    return layers + d * (2 if cfg.norm == "layernorm" else 1) + emb


def model_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token for MFU: ``GPTConfig.flops_per_token``'s formula (6 x
    non-embedding parameters + 6 V d for the head + 12 L a e keys for attention) with the
    *active* parameters of MoE layers (top-k experts, shared expert, router)."""
    n = model_parameters(cfg, active=True) - cfg.vocab_size * cfg.d_model * (
        1 if cfg.tie_embeddings else 2) - (cfg.max_seq_len * cfg.d_model
                                           if cfg.position == "learned" else 0)
    keys = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys
    return 6 * n + 6 * cfg.vocab_size * cfg.d_model + attention


def _weight_bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


def static_bytes(n: dict[str, int], layout: Layout) -> dict[str, float]:
    """Bytes of parameters, gradients, optimizer state, autocast's weight casts, FSDP's
    working copies and the optimizer step's temporary for a rank holding ``n`` (a
    :func:`stage_parameter_counts` dict); see the module doc."""
    L = layout
    dense, expert = n["total"] - n["expert"], n["expert"]
    sharded = L.distributed_optimizer or L.fsdp
    s_dense, s_expert = (L.shard_group, L.expert_dp) if sharded else (1, 1)
    owned = -(-dense // s_dense) + -(-expert // s_expert)      # optimizer's parameters
    a = _weight_bytes(L.params_dtype)                            # bytes of a working weight
    casts = 2 * n["cast"] if L.autocast else 0.0
    if L.fsdp:
        # current + prefetched block, one block's fp32 gradient; the root group gathered
        # for the step with its unsharded fp32 gradients
        working = (2 * a + 4) * n["unit"] + (a + 4) * n["root"]
        if L.autocast:   # the cast copies follow the gathered weights
            casts = 2 * (2 * n["unit"] + n["root"])
        return {"parameters": 4 * owned, "gradients": 4 * owned, "optimizer": 8 * owned,
                "casts": casts, "working": working, "owned": owned}
    main_weights = 4 if L.params_dtype != "fp32" else 0       # fp32 copy in the optimizer
    return {"parameters": a * n["total"], "gradients": 4 * n["total"],
            "optimizer": (8 + main_weights) * owned, "casts": casts, "working": 0.0,
            "owned": owned}


__all__ = ["layer_counts", "model_flops_per_token", "model_parameters", "mlp_mats",
           "stage_layers", "stage_parameter_counts", "static_bytes"]
