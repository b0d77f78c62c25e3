"""What a Mixture-of-Experts layer changes in the planner's memory and time, next to a dense
layer of the same model.

Tokens: with tp > 1 (sequence parallelism, which MoE needs then) each rank routes its 1/tp
shard of the sequence (1/cp of it under context parallelism): ``rows`` = b s / (cp tp).
Each routed token goes to top-k experts; with ep ranks holding E/ep experts whole, a
balanced router sends (ep - 1)/ep of the k copies to other ranks.

Saved for backward by one MoE layer (none and selective recompute; full keeps the layer
input only), in place of the dense MLP's ``a 3 b s f / t``:

* router logits and probabilities, fp32: 8 rows E;
* the permuted (dispatched) tokens, the experts' input: a rows k d;
* each expert's SwiGLU: gate|up and output, a rows k 3 f_e (GELU: 2 f_e);
* the experts' outputs kept for the weighted combine: a rows k d;
* a shared expert: a b s 3 f_s / t (a TP-sharded dense MLP).

Time: the experts' matmuls are 2 x 3 k rows d f_e x (1 forward + 2 backward) per rank,
grouped GEMMs at the matmul efficiency; the all-to-all dispatch and combine, forward and
backward (4 per layer), each moving a rows k d (ep - 1)/ep bytes per rank, not overlapped;
and the router's d x E matmul.
"""
from __future__ import annotations

from megalite.models.config import GPTConfig

from megalite.plan.params import expert_d_ff, mlp_mats


def routed_rows(micro_batch: int, seq_local: int, tp: int) -> float:
    """Tokens one rank routes per microbatch (its sequence-parallel shard)."""
    return micro_batch * seq_local / tp


def moe_saved_delta(cfg: GPTConfig, micro_batch: int, seq_local: int, tp: int,
                    act_bytes: int) -> float:
    """Bytes an MoE layer saves beyond a dense layer of ``cfg`` (none/selective recompute)."""
    a, d, k = act_bytes, cfg.d_model, cfg.moe_top_k
    rows = routed_rows(micro_batch, seq_local, tp)
    mats = mlp_mats(cfg)
    dense_mlp = a * micro_batch * seq_local * mats * cfg.d_ff / tp
    shared = a * micro_batch * seq_local * mats * cfg.moe_shared_d_ff / tp
    experts = a * rows * k * (2 * d + mats * expert_d_ff(cfg))
    router = 8 * rows * cfg.moe_num_experts
    return router + experts + shared - dense_mlp


def moe_flops(cfg: GPTConfig, micro_batch: int, seq_local: int, tp: int) -> dict[str, float]:
    """FLOPs of one MoE layer's MLP part on one rank for one microbatch, forward +
    backward: 'experts' (grouped GEMMs), 'shared' (TP-sharded shared expert), 'router'."""
    d, k = cfg.d_model, cfg.moe_top_k
    rows = routed_rows(micro_batch, seq_local, tp)
    tokens = micro_batch * seq_local
    mats = mlp_mats(cfg)
    return {"experts": 6 * rows * k * mats * d * expert_d_ff(cfg),
            "shared": 6 * tokens * mats * d * cfg.moe_shared_d_ff / tp,
            "router": 6 * rows * d * cfg.moe_num_experts}


def all_to_all_bytes(cfg: GPTConfig, micro_batch: int, seq_local: int, tp: int, ep: int,
                     act_bytes: int) -> float:
    """Bytes one rank sends in one MoE layer's dispatch + combine, forward and backward."""
    if ep == 1:
        return 0.0
    rows = routed_rows(micro_batch, seq_local, tp)
    return 4 * act_bytes * rows * cfg.moe_top_k * cfg.d_model * (ep - 1) / ep


__all__ = ["all_to_all_bytes", "moe_flops", "moe_saved_delta", "routed_rows"]
