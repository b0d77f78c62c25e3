"""Predicted step time of a layout on a GPU.

Per microbatch and pipeline stage:

* matmuls: 2 FLOPs per multiply-add of the local (1/tp) linear weights, forward once,
  backward twice, once more for recomputed layers; at ``MATMUL_EFFICIENCY`` of the peak;
* attention core: causal (half the s x s scores), forward 4·s·h·e/tp per token, backward
  2.5x (flash recomputes the probabilities), at ``ATTENTION_EFFICIENCY`` of the peak;
* memory-bound kernels, from the bytes they read and write (norms, rope, SwiGLU, casts and
  copies, residual adds, cross-entropy) at ``MEMORY_EFFICIENCY`` of the HBM bandwidth;
* tensor-parallel collectives (per layer two all-reduces forward, two backward; with
  sequence parallelism the same bytes as all-gather + reduce-scatter), not overlapped.

The pipeline then runs the schedule in megalite's simulator (per-stage F, B and for split
backwards I and W costs, plus the p2p time of an activation between ranks), giving the
bubble. After it: the data-parallel gradient reduction (all-reduce, or reduce-scatter +
all-gather with the distributed optimizer; overlapped with the last backward except one
layer's bucket when ``overlap_grad_reduce``), and the optimizer (96 bytes moved per
parameter: foreach AdamW, clipping, grad accumulation casts).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from megalite.models.config import GPTConfig
from megalite.parallel.layers import padded_vocab_size
from megalite.pipeline import build_schedule, layers_per_stage

from megalite.plan.gpus import (ATTENTION_EFFICIENCY, GPU, LINK_EFFICIENCY,
                                MATMUL_EFFICIENCY, MEMORY_EFFICIENCY, get_gpu)
from megalite.plan.layout import Layout, compute_bytes, invalid_reason
from megalite.plan.memory import memory

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


def layer_costs(cfg: GPTConfig, L: Layout, gpu: GPU) -> dict[str, float]:
    """Seconds of one layer for one microbatch on one rank, by kind, forward + backward
    (+ recompute)."""
    t, s, a = L.tp, L.seq_len, compute_bytes(L.dtype)
    tokens = L.micro_batch_size * s
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    h, g = cfg.n_heads / t, cfg.n_kv_heads / t
    weights = (d * (cfg.n_heads + 2 * cfg.n_kv_heads) * e + cfg.n_heads * e * d
               + 3 * d * f) / t
    recompute_full = L.recompute == "full"
    fwd_passes = 2 if recompute_full else 1
    matmul = 2 * weights * tokens * (fwd_passes + 2)
    attn_fwd = 4 * h * e * mean_keys_per_query(s, cfg.sliding_window) * tokens
    attn = attn_fwd * (1 + 2.5 + (1 if L.recompute != "none" else 0))
    peak = gpu.bf16_flops if a == 2 else gpu.bf16_flops / 2   # fp32 counts against TF32
    by_kind_bytes = {
        "norms": 2 * 20 * d + (20 * (h + g) * e if cfg.qk_norm else 0),
        "rope": 4 * a * (h + g) * e,
        "swiglu": 8 * a * f / t,
        "copies and casts": 80 * d + 4 * a * h * e,
    }
    out = {"matmul": matmul / (peak * MATMUL_EFFICIENCY),
           "attention": attn / (peak * ATTENTION_EFFICIENCY)}
    for kind, per_token in by_kind_bytes.items():
        passes = 1 + (1 / 3 if recompute_full else 0)   # recompute re-runs the forward third
        out[kind] = per_token * tokens * passes / (gpu.hbm_bandwidth * MEMORY_EFFICIENCY)
    if t > 1:
        link = _bandwidth(gpu, t, within_node=t <= gpu.gpus_per_node)
        volume = 2 * (t - 1) / t * tokens * d * (2 * a + 2 * 4)
        out["tp comm"] = volume / link
    return out


def _bandwidth(gpu: GPU, group: int, within_node: bool) -> float:
    return (gpu.nvlink_bandwidth if within_node else gpu.network_bandwidth) * LINK_EFFICIENCY


def head_costs(cfg: GPTConfig, L: Layout, gpu: GPU) -> dict[str, float]:
    """The last stage's output head and loss for one microbatch (forward + backward)."""
    a, tokens = compute_bytes(L.dtype), L.micro_batch_size * L.seq_len
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
              simulate: bool = True) -> StepTime:
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
    layer = layer_costs(cfg, L, gpu)
    head = head_costs(cfg, L, gpu)
    layer_s, head_s = sum(layer.values()), sum(head.values())
    # forward share of a layer: matmuls 1 of (2 + 1 recompute + 1), attention 1 of 3.5(+1)
    fwd_share = 1 / (4 if L.recompute == "full" else 3)
    f_cost = [counts[s] * layer_s * fwd_share + (head_s / 3 if s == n_stages - 1 else 0)
              for s in range(n_stages)]
    b_cost = [counts[s] * layer_s * (1 - fwd_share) + (2 * head_s / 3 if s == n_stages - 1
                                                       else 0) for s in range(n_stages)]
    a_bytes = L.micro_batch_size * L.seq_len * cfg.d_model * 4
    if L.sequence_parallel and L.tp > 1:
        a_bytes /= L.tp
    cross_node = L.tp * L.dp * L.pp > gpu.gpus_per_node
    p2p = a_bytes / _bandwidth(gpu, 2, not cross_node) if L.pp > 1 else 0.0
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

    n = max((r.counts for r in memory(cfg, L).ranks), key=lambda c: c["total"])
    params = n["total"]
    opt_share = L.dp if L.distributed_optimizer else 1
    memory_bw = gpu.hbm_bandwidth * MEMORY_EFFICIENCY
    optimizer = (OPTIMIZER_BYTES_PER_PARAM * params / opt_share) / memory_bw
    accumulate = GRAD_ACCUM_BYTES_PER_PARAM * n["cast"] * m / memory_bw \
        if compute_bytes(L.dtype) == 2 else 0.0
    dp_comm = 0.0
    if L.dp > 1:
        link = _bandwidth(gpu, L.dp, within_node=L.tp * L.dp <= gpu.gpus_per_node)
        dp_comm = 2 * (L.dp - 1) / L.dp * 4 * params / link
        if L.overlap_grad_reduce:
            layers_here = max(1, sum(counts) // L.pp)
            dp_comm = max(dp_comm - max(b_cost) / v, dp_comm / layers_here)
    step = pipeline + optimizer + accumulate + dp_comm

    per_mb_stages = m * v  # every rank runs m microbatches through each of its v stages
    parts = {k: t_ * per_mb_stages * (sum(counts) / n_stages) for k, t_ in layer.items()}
    for k, t_ in head.items():
        parts[k if k != "matmul" else "matmul"] = parts.get(k, 0.0) + t_ * m / L.pp
    parts["grad accumulation casts"] = accumulate
    parts["optimizer"] = optimizer
    parts["dp comm (exposed)"] = dp_comm
    parts["pipeline bubble and p2p"] = pipeline - sum(
        x for k, x in parts.items() if k not in ("grad accumulation casts", "optimizer",
                                                 "dp comm (exposed)"))
    tokens = L.global_batch_size * L.seq_len
    peak = gpu.bf16_flops if compute_bytes(L.dtype) == 2 else gpu.bf16_flops / 2
    mfu = cfg.flops_per_token(L.seq_len) * tokens / (step * L.gpus * peak)
    return StepTime(layout=L, gpu=gpu, step=step, parts=parts, bubble=bubble,
                    tokens_per_second=tokens / step, mfu=mfu)
