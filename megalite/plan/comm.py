"""The communication of a layout, in seconds on a GPU: what each parallel dimension moves.

Links: a group whose ranks sit in one node (consecutive global ranks: ``span`` = the ranks
from the group's first to its last, at most ``gpus_per_node``) uses NVLink, else
InfiniBand; collectives reach ``LINK_EFFICIENCY`` of the per-direction peak. Ring
collectives move (n - 1)/n of the buffer per rank (all-gather, reduce-scatter), twice that
for an all-reduce.

* tensor parallelism, per layer and microbatch: two all-reduces forward and two backward
  of the [tokens/cp, d] activations (all-gather + reduce-scatter with sequence
  parallelism, the same bytes): activations in the compute dtype, and the backward's
  gradients fp32 under autocast (the residual stream is fp32 there); not overlapped.
* context parallelism (``cp_comm``), per layer and microbatch:
  - "ring": K and V of a rank's chunk travel round the cp ring, cp - 1 hops forward;
    backward sends K, V and their gradients (twice the forward bytes); each hop overlaps
    the attention of the block before it, so only what exceeds the attention is exposed;
  - "all-to-all" (Ulysses): q, k, v re-sharded from sequence to heads and the output back,
    forward and backward: (cp - 1)/cp of (2 a + 2 g) e/tp per token, exposed.
* expert parallelism: :func:`megalite.plan.moe.all_to_all_bytes` per MoE layer, exposed.
* pipeline: one [tokens/cp, d] activation (/tp with SP) per stage boundary and microbatch,
  in the residual stream's dtype (bf16 with 16-bit parameters, fp32 under autocast).
* data parallelism over dp x cp (dense) and tp*cp*dp/ep (experts), once per step: fp32
  gradients all-reduced, or reduce-scattered with the parameters all-gathered in their own
  dtype (distributed optimizer).
* FSDP (``megalite.parallel.fsdp``): each block's parameters all-gathered in forward and
  again in backward, and its fp32 gradients reduce-scattered, every microbatch; prefetch
  overlaps that with the microbatch's compute (what exceeds it is exposed, and at least one
  block's share). The root group (embedding, final norm, head) is gathered once per step
  and reduced once at its end, exposed.
"""
from __future__ import annotations

from megalite.models.config import GPTConfig

from megalite.plan.gpus import GPU, LINK_EFFICIENCY
from megalite.plan.layout import Layout, compute_bytes


def bandwidth(gpu: GPU, span: int) -> float:
    """Bytes/s per rank of a group spanning ``span`` consecutive ranks."""
    link = gpu.nvlink_bandwidth if span <= gpu.gpus_per_node else gpu.network_bandwidth
    return link * LINK_EFFICIENCY


def residual_bytes(L: Layout) -> int:
    """Bytes of a residual-stream element: fp32 under autocast or in fp32, else 2."""
    return 4 if L.autocast or L.dtype == "fp32" else 2


def weight_bytes(L: Layout) -> int:
    return 4 if L.params_dtype == "fp32" else 2


def tokens_per_rank(L: Layout) -> float:
    """Tokens of one microbatch on one rank: the micro-batch's sequences / cp."""
    return L.micro_batch_size * L.seq_len / L.cp


def tp_time(cfg: GPTConfig, L: Layout, gpu: GPU) -> float:
    """One layer's TP collectives, forward + backward, one microbatch."""
    t = L.tp
    if t == 1:
        return 0.0
    a, g = compute_bytes(L.dtype), residual_bytes(L)
    volume = 2 * (t - 1) / t * tokens_per_rank(L) * cfg.d_model * (2 * a + 2 * g)
    return volume / bandwidth(gpu, t)


def cp_time(cfg: GPTConfig, L: Layout, gpu: GPU, attention: float) -> float:
    """One layer's exposed context-parallel communication, forward + backward, given the
    layer's ``attention`` compute time on the rank."""
    cp = L.cp
    if cp == 1:
        return 0.0
    a, e, t = compute_bytes(L.dtype), cfg.head_dim, L.tp
    link = bandwidth(gpu, t * cp)
    tokens = tokens_per_rank(L)
    if L.cp_comm == "all-to-all":
        per_token = (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * e / t * a
        return 2 * (cp - 1) / cp * tokens * per_token / link
    return max(0.0, cp_ring_bytes(cfg, L) / link - attention * (cp - 1) / cp)


def cp_ring_bytes(cfg: GPTConfig, L: Layout) -> float:
    """Bytes one rank sends in one layer's ring attention, forward + backward, one
    microbatch, as megalite.parallel.context sends them: the K/V shard (this rank's kv heads,
    in the compute dtype) to the next rank cp-1 times in the forward, cp-1 times again in the
    backward (once more in the forward that full recompute re-runs), and the fp32 dK/dV
    cp times (its last hop brings each rank its own gradient home)."""
    cp = L.cp
    if cp == 1 or L.cp_comm != "ring":
        return 0.0
    kv_values = 2 * tokens_per_rank(L) * cfg.n_kv_heads / L.tp * cfg.head_dim
    kv_passes = (cp - 1) * (3 if L.recompute == "full" else 2)
    return kv_values * (kv_passes * compute_bytes(L.dtype) + cp * 4)


def p2p_time(cfg: GPTConfig, L: Layout, gpu: GPU) -> float:
    """One activation (or its gradient) across a pipeline boundary."""
    if L.pp == 1:
        return 0.0
    volume = tokens_per_rank(L) * cfg.d_model * residual_bytes(L)
    if L.sequence_parallel and L.tp > 1:
        volume /= L.tp
    return volume / bandwidth(gpu, L.gpus)


def dp_volume(L: Layout, dense: float, expert: float) -> float:
    """Bytes one rank moves for the step's gradient reduction (and the distributed
    optimizer's parameter all-gather) of ``dense`` + ``expert`` parameters."""
    def share(n: int) -> float:
        return (n - 1) / n
    per_param = 4 + weight_bytes(L) if L.distributed_optimizer else 2 * 4
    return per_param * (share(L.shard_group) * dense + share(L.expert_dp) * expert)


def dp_time(L: Layout, gpu: GPU, dense: float, expert: float) -> float:
    if L.fsdp or (L.shard_group == 1 and L.expert_dp == 1):
        return 0.0
    return dp_volume(L, dense, expert) / bandwidth(gpu, L.tp * L.cp * L.dp)


def fsdp_time(L: Layout, gpu: GPU, blocks: float, expert: float, root: float
              ) -> tuple[float, float]:
    """FSDP's traffic before overlap: (the blocks' per microbatch, the root group's per
    step), for ``blocks`` dense block parameters, ``expert`` expert and ``root`` root ones."""
    if not L.fsdp:
        return 0.0, 0.0
    w, link = weight_bytes(L), bandwidth(gpu, L.tp * L.cp * L.dp)
    dense_share, expert_share = (L.shard_group - 1) / L.shard_group, \
        (L.expert_dp - 1) / L.expert_dp
    per_microbatch = (2 * w + 4) * (dense_share * blocks + expert_share * expert) / link
    return per_microbatch, (w + 4) * dense_share * root / link


def exposed(comm: float, compute: float, units: int) -> float:
    """Overlapped communication: what exceeds ``compute``, and at least one of ``units``
    pieces (the last bucket / the first gather cannot hide)."""
    return max(comm - compute, comm / max(1, units))


__all__ = ["bandwidth", "cp_ring_bytes", "cp_time", "dp_time", "dp_volume", "exposed", "fsdp_time",
           "p2p_time", "residual_bytes", "tokens_per_rank", "tp_time", "weight_bytes"]
