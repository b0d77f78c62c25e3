"""Predicted step time of a layout on a GPU.

Per microbatch, pipeline stage and rank (a rank holds 1/cp of each sequence's tokens):

* matmuls: 2 FLOPs per multiply-add of the local (1/tp) linear weights, forward once,
  backward twice, once more for recomputed layers; in MoE layers the routed tokens' top-k
  experts, the shared expert and the router instead of the dense MLP
  (:mod:`megalite.plan.moe`); at ``MATMUL_EFFICIENCY`` of the peak;
* attention core: causal (half the s x s scores), forward 4·s·h·e/tp per token, backward
  2.5x (flash recomputes the probabilities), at ``ATTENTION_EFFICIENCY`` of the peak; under
  context parallelism each rank does 1/cp of it (load-balanced chunks), and the ring merges
  each hop's partial output (memory-bound);
* memory-bound kernels, from the bytes they read and write (norms, rope, SwiGLU, casts and
  copies, residual adds, cross-entropy) at ``MEMORY_EFFICIENCY`` of the HBM bandwidth; the
  residual stream's copies at its dtype (fp32 under autocast, 16-bit with 16-bit weights);
* communication (:mod:`megalite.plan.comm`): tensor-parallel collectives, the cp ring's
  exposed part or the all-to-all, the MoE all-to-all.

The pipeline then runs the schedule in megalite's simulator (per-stage F, B and for split
backwards I and W costs, plus the p2p time of an activation between ranks), giving the
bubble. After it: the gradient reduction over dp x cp (and expert-dp), or FSDP's gathers
and reduce-scatters, overlapped with the backward except one layer's share when
``overlap_grad_reduce``; the optimizer (96 bytes moved per parameter it owns, 6 more to
copy fp32 main weights to 16-bit ones); and under autocast the casts that accumulate each
microbatch's 16-bit weight gradients into fp32 (with 16-bit parameters the weight-gradient
GEMM accumulates into the fp32 main gradient: none). MFU counts active parameters.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from megalite.models.config import GPTConfig
from megalite.parallel.layers import padded_vocab_size
from megalite.pipeline import build_schedule, layers_per_stage

from megalite.plan.comm import (bandwidth, cp_time, dp_time, exposed, fsdp_time, p2p_time,
                                residual_bytes, tokens_per_rank, tp_time)
from megalite.plan.gpus import (ATTENTION_EFFICIENCY, GPU, MATMUL_EFFICIENCY,
                                MEMORY_EFFICIENCY, get_gpu)
from megalite.plan.layout import Layout, compute_bytes, invalid_reason
from megalite.plan.memory import MemoryBreakdown, memory
from megalite.plan.moe import all_to_all_bytes, moe_flops
from megalite.plan.params import (expert_d_ff, mlp_mats, model_flops_per_token,
                                  stage_layers)

OPTIMIZER_BYTES_PER_PARAM = 96   # foreach AdamW ~84 + clipping 12 (fp32)
GRAD_ACCUM_BYTES_PER_PARAM = 20  # per microbatch: bf16 weight grad, cast, accumulate


@dataclass
class StepTime:
    """Seconds of one optimizer step, and how it splits."""
    layout: Layout
    gpu: GPU
    step: float
    parts: dict[str, float] = field(default_factory=dict)   # seconds, summed over the step
    bubble: float = 0.0          # idle fraction of the pipeline makespan
    tokens_per_second: float = 0.0
    mfu: float = 0.0


def mean_keys_per_query(seq: int, window: int | None) -> float:
    """Keys a causal query attends to, on average: seq / 2, or with a sliding window each
    query sees min(i + 1, window) keys."""
    if window is None or window >= seq:
        return seq * 0.5
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def layer_costs(cfg: GPTConfig, L: Layout, gpu: GPU, moe: bool = False) -> dict[str, float]:
    """Seconds of one layer (an MoE layer when ``moe``) for one microbatch on one rank, by
    kind, forward + backward (+ recompute)."""
    t, s, a = L.tp, L.seq_len, compute_bytes(L.dtype)
    tokens = tokens_per_rank(L)          # the rank's 1/cp of the microbatch's tokens
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    h, g = cfg.n_heads / t, cfg.n_kv_heads / t
    attention_weights = (d * (cfg.n_heads + 2 * cfg.n_kv_heads) * e + cfg.n_heads * e * d) / t
    recompute_full = L.recompute == "full"
    fwd_passes = 2 if recompute_full else 1
    matmul = 2 * attention_weights * tokens * (fwd_passes + 2)
    if moe:   # experts, shared expert and router: forward + backward, plus the recompute
        matmul += sum(moe_flops(cfg, L.micro_batch_size, s / L.cp, t).values()) \
            * (fwd_passes + 2) / 3
    else:
        matmul += 2 * mlp_mats(cfg) * d * f / t * tokens * (fwd_passes + 2)
    # causal attention, load-balanced over the cp ranks: each does 1/cp of the work
    attn_fwd = 4 * h * e * mean_keys_per_query(s, cfg.sliding_window) * tokens
    attn = attn_fwd * (1 + 2.5 + (1 if L.recompute != "none" else 0))
    peak = gpu.bf16_flops if a == 2 else gpu.bf16_flops / 2   # fp32 counts against TF32
    by_kind_bytes = {
        "norms": 2 * 20 * d + (20 * (h + g) * e if cfg.qk_norm else 0),
        "rope": 4 * a * (h + g) * e,
        "swiglu": 8 * a * (f if not moe else
                           cfg.moe_top_k * expert_d_ff(cfg) + cfg.moe_shared_d_ff) / t,
        # residual adds and copies: 80 d bytes per token with the fp32 residual stream
        "copies and casts": 20 * residual_bytes(L) * d + 4 * a * h * e,
    }
    out = {"matmul": matmul / (peak * MATMUL_EFFICIENCY),
           "attention": attn / (peak * ATTENTION_EFFICIENCY)}
    for kind, per_token in by_kind_bytes.items():
        passes = 1 + (1 / 3 if recompute_full else 0)   # recompute re-runs the forward third
        out[kind] = per_token * tokens * passes / (gpu.hbm_bandwidth * MEMORY_EFFICIENCY)
    if t > 1:
        out["tp comm"] = tp_time(cfg, L, gpu)
    if L.cp > 1:
        out["cp comm (exposed)"] = cp_time(cfg, L, gpu, out["attention"])
        if L.cp_comm == "ring":   # each hop's partial output merged (o, lse read + written)
            merge = 2 * (L.cp - 1) * 3 * tokens * h * e * 4
            out["cp merge"] = merge / (gpu.hbm_bandwidth * MEMORY_EFFICIENCY)
    if moe and L.ep > 1:
        out["ep all-to-all"] = all_to_all_bytes(cfg, L.micro_batch_size, s / L.cp, t, L.ep,
                                                a) / bandwidth(gpu, L.ep)
    return out


def head_costs(cfg: GPTConfig, L: Layout, gpu: GPU) -> dict[str, float]:
    """The last stage's output head and loss for one microbatch (forward + backward)."""
    a, tokens = compute_bytes(L.dtype), tokens_per_rank(L)
    vp = padded_vocab_size(cfg.vocab_size, L.tp, cfg.pad_vocab_to) / L.tp
    peak = gpu.bf16_flops if a == 2 else gpu.bf16_flops / 2
    return {"matmul": 2 * cfg.d_model * vp * tokens * 3 / (peak * MATMUL_EFFICIENCY),
            "cross-entropy": 3 * a * vp * tokens / (gpu.hbm_bandwidth * MEMORY_EFFICIENCY)}


# 1F1B and interleaved 1F1B repeat one pattern per p microbatches once filled: beyond 8p
# microbatches the simulated makespan is extended linearly from 8p and 7p.
STEADY_AFTER = {"1f1b": 8, "interleaved-1f1b": 8}


def _makespan(schedule: str, p: int, m: int, v: int, f: tuple, i: tuple, w: tuple,
              comm: float) -> tuple[float, float]:
    """(makespan, bubble fraction) from the schedule simulator."""
    k = STEADY_AFTER.get(schedule)
    if k is None or m <= k * p:
        return _simulate(schedule, p, m, v, f, i, w, comm)
    at, before = (_simulate(schedule, p, n, v, f, i, w, comm)[0] for n in (k * p, (k - 1) * p))
    makespan = at + (m - k * p) * (at - before) / p
    busy = m * sum(x + y + z for x, y, z in zip(f, i, w)) / p   # per rank, on average
    return makespan, max(0.0, 1 - busy / makespan)


@functools.lru_cache(maxsize=8192)
def _simulate(schedule, p, m, v, f, i, w, comm):
    from megalite.pipeline.simulate import simulate_schedule
    r = simulate_schedule(build_schedule(schedule, p, m, v), f_cost=list(f), i_cost=list(i),
                          w_cost=list(w), comm_cost=comm)
    return r.makespan, r.bubble_total


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def step_time(cfg: GPTConfig, layout: Layout, gpu: GPU | str = "h100",
              simulate: bool = True, mem: MemoryBreakdown | None = None) -> StepTime:
    """Predicted seconds per optimizer step (see the module doc). ``simulate=False`` takes
    the pipeline's makespan from the closed form for uniform stages, (m v + p - 1)(F + B)
    per stage, instead of the simulator (fast, for a first ranking of many layouts)."""
    reason = invalid_reason(cfg, layout)
    if reason:
        raise ValueError(f"{layout.describe()}: {reason}")
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    L = layout
    v, n_stages, m = L.virtual, L.num_stages, L.num_microbatches
    counts = layers_per_stage(cfg.n_layers, n_stages, cfg.layers_per_stage)
    dense = layer_costs(cfg, L, gpu)
    sparse = layer_costs(cfg, L, gpu, moe=True) if cfg.moe_num_experts else dense
    moe_layers = [sum(cfg.is_moe_layer(i) for i in stage_layers(cfg, n_stages, s))
                  for s in range(n_stages)]
    head = head_costs(cfg, L, gpu)
    dense_s, sparse_s, head_s = sum(dense.values()), sum(sparse.values()), sum(head.values())
    stage_s = [(counts[s] - moe_layers[s]) * dense_s + moe_layers[s] * sparse_s
               for s in range(n_stages)]
    # forward share of a layer: matmuls 1 of (2 + 1 recompute + 1), attention 1 of 3.5(+1)
    fwd_share = 1 / (4 if L.recompute == "full" else 3)
    f_cost = [stage_s[s] * fwd_share + (head_s / 3 if s == n_stages - 1 else 0)
              for s in range(n_stages)]
    b_cost = [stage_s[s] * (1 - fwd_share) + (2 * head_s / 3 if s == n_stages - 1 else 0)
              for s in range(n_stages)]
    p2p = p2p_time(cfg, L, gpu)
    unit = max(f_cost)
    if simulate:
        makespan, bubble = _makespan(L.schedule, L.pp, m, v,
                                     tuple(_round(x / unit) for x in f_cost),
                                     tuple(_round(x / 2 / unit) for x in b_cost),
                                     tuple(_round(x / 2 / unit) for x in b_cost),
                                     _round(p2p / unit))
        pipeline = makespan * unit
    else:
        per_stage = max(x + y for x, y in zip(f_cost, b_cost)) + 2 * p2p
        pipeline = (m * v + L.pp - 1) * per_stage
        bubble = (L.pp - 1) / (m * v + L.pp - 1)

    n = max((r.counts for r in (mem or memory(cfg, L)).ranks), key=lambda c: c["total"])
    params, experts = n["total"], n["expert"]
    memory_bw = gpu.hbm_bandwidth * MEMORY_EFFICIENCY
    sharded = L.distributed_optimizer or L.fsdp
    owned = (params - experts) / (L.shard_group if sharded else 1) + \
        experts / (L.expert_dp if sharded else 1)
    # AdamW on the owned fp32 (main) weights; 16-bit parameters also copy them back
    per_param = OPTIMIZER_BYTES_PER_PARAM + (0 if L.params_dtype == "fp32" else 6)
    optimizer = per_param * owned / memory_bw
    # Autocast casts each microbatch's 16-bit weight gradients into the fp32 .grad; with
    # 16-bit parameters the weight-gradient GEMM accumulates into the fp32 main gradient.
    accumulate = GRAD_ACCUM_BYTES_PER_PARAM * n["cast"] * m / memory_bw if L.autocast else 0.0
    layers_here = max(1, sum(counts) // L.pp)
    dp_comm = dp_time(L, gpu, params - experts, experts)
    if L.overlap_grad_reduce and dp_comm:
        dp_comm = exposed(dp_comm, max(b_cost) / v, layers_here)
    blocks, root = fsdp_time(L, gpu, params - experts - n["root"], experts, n["root"])
    # the blocks per microbatch, prefetched under that microbatch's compute on this rank;
    # the root group gathered at the step's start and reduced at its end
    compute = v * (max(f_cost) + max(b_cost))
    fsdp = m * exposed(blocks, compute, layers_here) + root if L.fsdp else 0.0
    step = pipeline + optimizer + accumulate + dp_comm + fsdp

    per_mb_stages = m * v  # every rank runs m microbatches through each of its v stages
    n_moe = sum(moe_layers) / n_stages       # MoE layers per stage, on average
    n_dense = sum(counts) / n_stages - n_moe
    parts = {k: per_mb_stages * (n_dense * dense.get(k, 0.0) + n_moe * sparse.get(k, 0.0))
             for k in {**dense, **sparse}}
    for k, t_ in head.items():
        parts[k if k != "matmul" else "matmul"] = parts.get(k, 0.0) + t_ * m / L.pp
    parts["grad accumulation casts"] = accumulate
    parts["optimizer"] = optimizer
    parts["dp comm (exposed)"] = dp_comm
    parts["fsdp comm (exposed)"] = fsdp
    after = ("grad accumulation casts", "optimizer", "dp comm (exposed)", "fsdp comm (exposed)")
    parts["pipeline bubble and p2p"] = pipeline - sum(
        x for k, x in parts.items() if k not in after)
    tokens = L.global_batch_size * L.seq_len
    peak = gpu.bf16_flops if compute_bytes(L.dtype) == 2 else gpu.bf16_flops / 2
    mfu = model_flops_per_token(cfg, L.seq_len) * tokens / (step * L.gpus * peak)
    return StepTime(layout=L, gpu=gpu, step=step, parts=parts, bubble=bubble,
                    tokens_per_second=tokens / step, mfu=mfu)
