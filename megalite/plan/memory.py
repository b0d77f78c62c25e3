"""Per-rank memory of a layout: parameters, gradients, optimizer state, autocast weight
copies, FSDP's unsharded working copies, activations x live microbatches, the loss head, and
the optimizer step's temporary.

``memory(cfg, layout)`` answers for every pipeline rank (TP, CP and DP ranks of one pipeline
rank hold the same amounts); ``.worst`` is the rank that decides whether a layout fits.

Static bytes per parameter, by precision mode and sharding: :mod:`megalite.plan.params`
(16-bit parameters with fp32 main weights 2 + 4 + 12/dp with the distributed optimizer;
autocast 4 + 4 + 2 + 8/dp; FSDP 16/dp plus the working copies). Context parallelism
divides every rank's tokens by cp (activations per rank / cp); an MoE layer saves what
:mod:`megalite.plan.moe` lists instead of the dense MLP's tensors.

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

import numpy as np

from megalite.models.config import GPTConfig
from megalite.parallel.layers import padded_vocab_size
from megalite.pipeline import Action, build_schedule, layers_per_stage

from megalite.models.activation_memory import (embedding_saved_bytes, final_norm_saved_bytes,
                                               head_saved_bytes, saved_activation_bytes)
from megalite.plan.layout import Layout, compute_bytes, invalid_reason
from megalite.plan.moe import moe_saved_delta
from megalite.plan.params import stage_layers, stage_parameter_counts, static_bytes

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
    fsdp_working: float = 0.0    # FSDP's gathered parameters and unsharded gradients

    @property
    def static(self) -> float:
        return (self.parameters + self.gradients + self.optimizer_state + self.weight_casts
                + self.fsdp_working)

    @property
    def total(self) -> float:
        return self.static + max(self.activations, self.optimizer_temp)

    def parts(self) -> dict[str, float]:
        return {"parameters": self.parameters, "gradients": self.gradients,
                "optimizer state": self.optimizer_state, "weight casts": self.weight_casts,
                "fsdp working": self.fsdp_working,
                "activations": self.activations, "optimizer temp": self.optimizer_temp}

    def bytes_per_parameter(self) -> float:
        """Parameters + gradients + optimizer state (+ casts, FSDP working copies) over the
        parameters this rank's model part has (its stage at 1/tp, experts at 1/ep)."""
        return self.static / self.counts["total"]

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
    """Per pipeline rank: (its stages, live counts [states x stages], of them between I
    and W [states x stages], loss heads live [states]) as arrays, for a vectorized peak."""
    if schedule in STEADY_AFTER:
        m = min(m, STEADY_AFTER[schedule] * p)
    return _live_state_arrays(schedule, p, m, v, head_until_w)


@functools.lru_cache(maxsize=4096)
def _live_state_arrays(schedule: str, p: int, m: int, v: int, head_until_w: bool
                       ) -> dict[int, tuple]:
    out = {}
    for rank, (local, states) in _live_states_walk(schedule, p, m, v, head_until_w).items():
        ordered = sorted(states)
        live = np.array([x[0] for x in ordered], dtype=np.float64).reshape(-1, len(local))
        split = np.array([x[1] for x in ordered], dtype=np.float64).reshape(-1, len(local))
        heads = np.array([x[2] for x in ordered], dtype=np.float64)
        out[rank] = (local, live, split, heads)
    return out


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
    b, seq = L.micro_batch_size, L.seq_len // L.cp     # the tokens of one cp rank
    kw = dict(act_bytes=compute_bytes(L.dtype), kernels=L.kernels)
    shape = (b, seq, L.tp, L.sequence_parallel)
    vp = padded_vocab_size(cfg.vocab_size, L.tp, cfg.pad_vocab_to)
    head = head_saved_bytes(cfg, *shape, fused_loss=L.fused_loss, padded_vocab=vp, **kw)
    embed = embedding_saved_bytes(b, seq)
    counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)

    moe_delta = moe_saved_delta(cfg, b, seq, L.tp, kw["act_bytes"]) \
        if cfg.moe_num_experts else 0.0

    def stage_bytes(s: int) -> float:
        moe = 0.0
        if moe_delta:   # MoE layers that keep their MLP's tensors (not fully recomputed)
            full = recomputed_layers(s)
            moe = moe_delta * sum(cfg.is_moe_layer(i) for j, i in
                                  enumerate(stage_layers(cfg, num_stages, s)) if j >= full)
        # stage_saved_bytes's sum, from the two layer figures computed once below
        kept = counts[s] if L.recompute_layers is None else min(L.recompute_layers, counts[s])
        layers = kept * recomputed + (counts[s] - kept) * full_layer
        return layers + moe + (embed if s == 0 else 0)

    full_layer = saved_activation_bytes(cfg, *shape, "none", **kw)
    recomputed = saved_activation_bytes(cfg, *shape, L.recompute, **kw)
    final_norm = final_norm_saved_bytes(cfg, *shape, kernels=L.kernels)

    def recomputed_layers(s: int) -> int:
        if L.recompute != "full":
            return 0
        return counts[s] if L.recompute_layers is None else min(L.recompute_layers, counts[s])

    ranks = []
    for rank, (stages, live, split, heads) in sorted(
            _live_states(L.schedule, L.pp, L.num_microbatches, v, L.fused_loss).items()):
        stages = list(stages)
        n = stage_parameter_counts(cfg, L.tp, stages, num_stages, L.ep)
        weights = [stage_bytes(s) for s in stages]
        # Between I and W (graph retained) a fully recomputed layer holds its whole saved
        # set again; what selective regions recompute does not outlive I (both measured in
        # tests/plan/test_memory.py).
        regrown = [recomputed_layers(s) * (full_layer - recomputed) for s in stages]
        held = live @ np.array(weights, dtype=np.float64) + heads * head \
            + split @ np.array(regrown, dtype=np.float64)
        best, best_state = 0.0, ((0,) * len(stages), (), 0)
        if len(held) and held.max() > 0:
            i = int(held.argmax())
            best = float(held[i])
            best_state = (tuple(int(c) for c in live[i]), tuple(split[i]), int(heads[i]))
        if L.recompute != "none" and not split.any():
            # a B recomputes one layer at a time, holding its full saved set; on the last
            # stage the final norm's backward has freed its tensors by then
            best = max(best, best + full_layer - recomputed - final_norm * best_state[2])
        st = static_bytes(n, L)
        ranks.append(RankMemory(
            pp_rank=rank, stages=stages, parameters=st["parameters"],
            gradients=st["gradients"], optimizer_state=st["optimizer"],
            weight_casts=st["casts"], activations=best,
            optimizer_temp=4 * st["owned"] if L.kernels == "triton" else 0.0,
            live_microbatches=dict(zip(stages, best_state[0])), counts=n,
            fsdp_working=st["working"]))
    return MemoryBreakdown(layout=L, ranks=ranks)


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '80' (GB), '500MB' -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    for unit, scale in (("gib", 2**30), ("mib", 2**20), ("gb", 1e9), ("mb", 1e6),
                        ("tb", 1e12), ("g", 1e9), ("b", 1)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    return float(t) * 1e9
