"""Per-rank memory of a layout: parameters, gradients, optimizer state, autocast weight
copies, activations x live microbatches, the loss head, and the optimizer step's temporary.

``memory(cfg, layout)`` answers for every pipeline rank (TP and DP ranks of one pipeline
rank hold the same amounts); ``.worst`` is the rank that decides whether a layout fits.

Static bytes per parameter (megalite's parameters are always fp32; bf16/fp16 run under
autocast): 4 weight + 4 gradient + 8 AdamW moments, or 8/dp with the distributed optimizer
(ZeRO-1), plus 2 for the 16-bit copy autocast caches of every matmul weight for the step.

Activations: a stage holds one microbatch's saved tensors (per layer, head and embedding:
:mod:`megalite.models.activation_memory`, the models package's own account) from its F
until its B, or until W when the backward is split; the schedule decides how many are live
at once. Each pipeline rank's list is walked in order, as the executor runs it, and the
peak of the bytes held is taken (stages of one rank differ: the first holds the embedding,
the loss head: the fused head's dx and fp32 dW, or the logits).

The peak is static + max(activation peak, optimizer step temporary): the optimizer step runs
after the backward has freed the activations. On GPU torch's foreach AdamW builds one
temporary (sqrt of the second moment) per parameter: 4 bytes per optimizer-owned parameter.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from megalite.models.config import GPTConfig
from megalite.parallel.layers import padded_vocab_size
from megalite.pipeline import Action, build_schedule, layers_per_stage

from megalite.models.activation_memory import (embedding_saved_bytes, final_norm_saved_bytes,
                                               head_saved_bytes, saved_activation_bytes,
                                               stage_saved_bytes)
from megalite.plan.layout import Layout, compute_bytes, invalid_reason

GIB = 2**30


@dataclass
class RankMemory:
    """Bytes on one rank of pipeline rank ``pp_rank`` (every TP/DP rank of it alike)."""
    pp_rank: int
    stages: list[int]
    parameters: float
    gradients: float
    optimizer_state: float
    weight_casts: float          # autocast's 16-bit weight copies, cached for the step
    activations: float           # peak of the saved tensors of live microbatches
    optimizer_temp: float        # the optimizer step's temporary (after activations free)
    live_microbatches: dict[int, int] = field(default_factory=dict)  # stage -> at the peak
    counts: dict[str, float] = field(default_factory=dict)            # parameter counts

    @property
    def static(self) -> float:
        return self.parameters + self.gradients + self.optimizer_state + self.weight_casts

    @property
    def total(self) -> float:
        return self.static + max(self.activations, self.optimizer_temp)

    def parts(self) -> dict[str, float]:
        return {"parameters": self.parameters, "gradients": self.gradients,
                "optimizer state": self.optimizer_state, "weight casts": self.weight_casts,
                "activations": self.activations, "optimizer temp": self.optimizer_temp}

    def largest_part(self) -> str:
        parts = self.parts()
        return max(parts, key=parts.get)


@dataclass
class MemoryBreakdown:
    layout: Layout
    ranks: list[RankMemory]

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def total(self) -> float:
        return self.worst.total

    def table(self) -> str:
        """A per-pipeline-rank table in GiB, for printing."""
        names = list(self.ranks[0].parts())
        lines = ["| pp rank | " + " | ".join(names) + " | total (GiB) |",
                 "|---:|" + "---:|" * (len(names) + 1)]
        for r in self.ranks:
            lines.append(f"| {r.pp_rank} | " + " | ".join(f"{v / GIB:.2f}" for v in
                                                        r.parts().values())
                         + f" | {r.total / GIB:.2f} |")
        return "\n".join(lines)


def stage_parameter_counts(cfg: GPTConfig, tp: int, stages: list[int], num_stages: int
                           ) -> dict[str, int]:
    """Parameters one TP rank holds for ``stages`` (as GPT builds them): 'matmul' (the
    linear weights autocast copies), 'other' (norms, embedding tables, biases)."""
    d, e, f = cfg.d_model, cfg.head_dim, cfg.d_ff
    h, g = cfg.n_heads, cfg.n_kv_heads
    mlp_mats = 3 if cfg.activation == "swiglu" else 2
    per_layer_mat = (d * (h + 2 * g) * e + h * e * d + mlp_mats * d * f) // tp
    per_layer_other = 2 * d * (2 if cfg.norm == "layernorm" else 1)
    per_layer_other += 2 * e if cfg.qk_norm else 0      # replicated q/k norm weights
    if cfg.qkv_bias and not cfg.bias:
        per_layer_other += (h + 2 * g) * e // tp
    if cfg.bias:
        col = ((h + 2 * g) * e + (2 if cfg.activation == "swiglu" else 1) * f) // tp
        per_layer_other += col + 2 * d
    counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)
    layers = sum(counts[s] for s in stages)
    first, last = 0 in stages, num_stages - 1 in stages
    table = padded_vocab_size(cfg.vocab_size, tp, cfg.pad_vocab_to) // tp * d
    matmul, other = layers * per_layer_mat, layers * per_layer_other
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
    return {"matmul": matmul, "other": other, "total": matmul + other,
            "cast": matmul + (head_cast if cfg.tie_embeddings else 0)}


# 1F1B and interleaved 1F1B reach their steady state after at most (v + 2) p microbatches;
# more only repeat it, so their live counts are taken from 4p (a multiple of p, as
# interleaving needs). Every other schedule is walked in full.
STEADY_AFTER = {"1f1b": 4, "interleaved-1f1b": 4}


@functools.lru_cache(maxsize=100_000)
def _parse(text: str) -> tuple[int, str]:
    a = Action.parse(text)
    return a.stage, a.kind


def _live_states(schedule: str, p: int, m: int, v: int, head_until_w: bool
                 ) -> dict[int, tuple]:
    if schedule in STEADY_AFTER:
        m = min(m, STEADY_AFTER[schedule] * p)
    return _live_states_walk(schedule, p, m, v, head_until_w)


@functools.lru_cache(maxsize=4096)
def _live_states_walk(schedule: str, p: int, m: int, v: int, head_until_w: bool
                      ) -> dict[int, tuple]:
    """Per pipeline rank, the distinct (live per local stage, of them between I and W per
    local stage, last stage's loss heads live) right after each F and each I: the only
    moments a peak can occur. A split backward (I, then W) retains the graph from I to W,
    so what I recomputed stays until W. It frees the unfused head's logits at I; the fused
    head keeps its gradients (dx, dW) in its graph node, until W."""
    head_freed_by = "BW" if head_until_w else "BI"
    table = build_schedule(schedule, p, m, v)
    num_stages = p * v
    out = {}
    for rank, actions in table.items():
        parsed = [_parse(a) for a in actions]
        local = sorted({stage for stage, _ in parsed})
        index = {s: i for i, s in enumerate(local)}
        live, split, heads, states = [0] * len(local), [0] * len(local), 0, set()
        for stage, kind in parsed:
            i = index[stage]
            live[i] += kind == "F"
            split[i] += kind == "I"
            heads += kind == "F" and stage == num_stages - 1
            if kind in head_freed_by and stage == num_stages - 1:
                heads -= 1
            if kind in "FI":
                states.add((tuple(live), tuple(split), heads))
            live[i] -= kind in "BW"
            split[i] -= kind == "W"
        out[rank] = (tuple(local), tuple(states))
    return out


def memory(cfg: GPTConfig, layout: Layout) -> MemoryBreakdown:
    """Predicted bytes per rank of training ``cfg`` with ``layout`` (see the module doc)."""
    reason = invalid_reason(cfg, layout)
    if reason:
        raise ValueError(f"{layout.describe()}: {reason}")
    L = layout
    v, num_stages = L.virtual, L.num_stages
    b, seq = L.micro_batch_size, L.seq_len
    kw = dict(act_bytes=compute_bytes(L.dtype), kernels=L.kernels)
    shape = (b, seq, L.tp, L.sequence_parallel)
    run_cfg = cfg.replace(recompute=L.recompute, recompute_layers=L.recompute_layers)
    vp = padded_vocab_size(cfg.vocab_size, L.tp, cfg.pad_vocab_to)
    head = head_saved_bytes(cfg, *shape, fused_loss=L.fused_loss, padded_vocab=vp, **kw)
    embed = embedding_saved_bytes(b, seq)
    counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)

    def stage_bytes(s: int) -> float:
        return stage_saved_bytes(run_cfg, counts[s], *shape, **kw) + (embed if s == 0 else 0)

    full_layer = saved_activation_bytes(cfg, *shape, "none", **kw)
    recomputed = saved_activation_bytes(cfg, *shape, L.recompute, **kw)
    final_norm = final_norm_saved_bytes(cfg, *shape, kernels=L.kernels)

    def recomputed_layers(s: int) -> int:
        if L.recompute != "full":
            return 0
        return counts[s] if L.recompute_layers is None else min(L.recompute_layers, counts[s])

    sixteen_bit = L.dtype in ("bf16", "fp16")
    opt_share = L.dp if L.distributed_optimizer else 1
    ranks = []
    for rank, (stages, states) in sorted(_live_states(L.schedule, L.pp, L.num_microbatches,
                                                      v, L.fused_loss).items()):
        stages = list(stages)
        n = stage_parameter_counts(cfg, L.tp, stages, num_stages)
        weights = [stage_bytes(s) for s in stages]
        # Between I and W (graph retained) a fully recomputed layer holds its whole saved
        # set again; what selective regions recompute does not outlive I (both measured in
        # tests/plan/test_memory.py).
        regrown = [recomputed_layers(s) * (full_layer - recomputed) for s in stages]
        best, best_state = 0.0, ((0,) * len(stages), (), 0)
        for live, split, heads in states:
            held = sum(c * w for c, w in zip(live, weights)) + heads * head \
                + sum(c * r for c, r in zip(split, regrown))
            if held > best:
                best, best_state = held, (live, split, heads)
        if L.recompute != "none" and not any(any(x) for _, x, _ in states):
            # a B recomputes one layer at a time, holding its full saved set; on the last
            # stage the final norm's backward has freed its tensors by then
            best = max(best, best + full_layer - recomputed - final_norm * best_state[2])
        opt_params = -(-n["total"] // opt_share)
        ranks.append(RankMemory(
            pp_rank=rank, stages=stages, parameters=4 * n["total"], gradients=4 * n["total"],
            optimizer_state=8 * opt_params,
            weight_casts=2 * n["cast"] if sixteen_bit else 0.0,
            activations=best,
            optimizer_temp=4 * opt_params if L.kernels == "triton" else 0.0,
            live_microbatches=dict(zip(stages, best_state[0])), counts=n))
    return MemoryBreakdown(layout=L, ranks=ranks)


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '80' (GB), '500MB' -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    for unit, scale in (("gib", 2**30), ("mib", 2**20), ("gb", 1e9), ("mb", 1e6),
                        ("tb", 1e12), ("g", 1e9), ("b", 1)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    return float(t) * 1e9
