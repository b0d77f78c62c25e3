"""The Mixture-of-Experts MLP: router, experts, shared expert, auxiliary losses.

One MoE layer replaces a block's dense MLP where ``GPTConfig.is_moe_layer(i)`` says so.
For each token the router (fp32, outside autocast) scores the experts and picks k of them:

* ``moe_router="softmax"`` (Mixtral, Qwen): softmax over all experts, top-k of the
  probabilities, renormalized to sum to 1 when ``moe_norm_topk``;
* ``moe_router="sigmoid"`` (DeepSeek-V3): sigmoid scores; the choice is the top-k of
  ``score + score_bias`` (the auxiliary-loss-free balancing bias, moved by
  ``moe_router_bias_update`` after each step towards the under-loaded experts), the
  weights the chosen scores (renormalized when ``moe_norm_topk``) x ``moe_routed_scaling``.

The token's output is the weighted sum of its k experts' outputs, plus the shared expert's
(a dense MLP every token goes through, gated by a sigmoid for Qwen2-MoE).

Losses, per microbatch over all of its tokens (so they do not depend on the layout: the tp
ranks' token shards are summed first):

* load balancing (Switch / Hugging Face Mixtral form): ``E * sum_e f_e * P_e``, f_e the
  fraction of tokens with expert e among their choices, P_e the mean router probability
  (normalized sigmoid scores for the sigmoid router); x ``moe_aux_loss_coeff``;
* router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``; x ``moe_z_loss_coeff``.

Their sum is attached to the layer's output by :class:`_AttachAuxLoss`: identity forward,
and backward feeds the loss its gradient (the pipeline's loss scale, 1/microbatches), so
every pipeline stage backpropagates its own layers' auxiliary losses with the schedule's
backward and nothing else needs to carry them.

Routing is dropless by default. ``moe_capacity_factor=c`` keeps at most
``ceil(c * tokens * k / E)`` copies per expert on each rank (the first by position); the
rest are dropped (that choice contributes 0), which makes the result depend on how tokens
are split over ranks.

Expert parallelism (:mod:`megalite.parallel.experts`): this rank holds experts
``[ep_rank*E/ep, (ep_rank+1)*E/ep)`` as two stacked parameters ``experts.up``
``[E/ep, (2)f, d]`` and ``experts.down`` ``[E/ep, d, f]`` marked ``expert_parallel``
(their gradients reduce over the expert-data-parallel group; checkpoints gather them over
ep). With tensor parallelism each tp rank routes its own tokens: its sequence shard under
sequence parallelism, else its 1/tp slice of the (replicated) sequence, whose outputs are
gathered back; both are exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import kernels
from megalite.models.recompute import is_recomputing
from megalite.parallel import comm
from megalite.parallel.experts import combine, dispatch, split_experts
from megalite.parallel.param_meta import mark_expert_parallel


def ep_layout(ps) -> tuple[int, int, object]:
    """(ep, ep_rank, ep_group) of a ParallelState (1, 0, None without expert parallelism)."""
    return getattr(ps, "ep", 1), getattr(ps, "ep_rank", 0), getattr(ps, "ep_group", None)


class MoEStats:
    """Shared by one model's MoE layers: the loss scale the pipeline applies (set per step
    by the training loop), read by every layer's :class:`_AttachAuxLoss`."""

    def __init__(self):
        self.loss_scale = 1.0


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; backward also gives ``aux`` the gradient ``scale``, so the
    auxiliary loss is backpropagated with the output (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class Experts(nn.Module):
    """This rank's experts, stacked: ``up`` [E_local, (2)f, d] (gate and up rows packed as
    the dense MLP's), ``down`` [E_local, d, f]. Each expert is initialized from its global
    name (``layers.3.mlp.experts.5.up``), so the model is the same at any ep."""

    def __init__(self, cfg, ps, init, prefix: str, local: range):
        super().__init__()
        self.activation, self.backend = cfg.activation, cfg.kernels
        f, d = cfg.moe_d_ff, cfg.d_model
        rows = 2 * f if cfg.activation == "swiglu" else f
        up, down = torch.empty(len(local), rows, d), torch.empty(len(local), d, f)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for j, e in enumerate(local):
            init.normal(f"{prefix}{e}.up", cfg.init_std)(up[j])
            init.normal(f"{prefix}{e}.down", out_std)(down[j])
        self.up, self.down = nn.Parameter(up.to(ps.device)), nn.Parameter(down.to(ps.device))
        for p in (self.up, self.down):
            mark_expert_parallel(p)            # gradients reduce over expert-dp
            p.ep_num_experts = cfg.moe_num_experts   # full tensor: dim 0 gathered over ep

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x``: rows grouped by local expert, ``counts[e]`` (a CPU tensor) rows each. The
        grouped matmul (megalite.kernels) gives every expert a weight gradient, zeros when it
        got no rows, so the gradient buckets never wait on an idle expert."""
        h = kernels.grouped_matmul(x, self.up.transpose(1, 2), counts, backend=self.backend)
        if self.activation == "swiglu":
            h = kernels.swiglu_packed(h, backend=self.backend)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return kernels.grouped_matmul(h, self.down.transpose(1, 2), counts,
                                      backend=self.backend)


class MoE(nn.Module):
    """A block's MLP as a mixture of experts (see the module docstring). ``shared`` is the
    shared expert (a dense megalite MLP) or None."""

    def __init__(self, cfg, ps, init, prefix: str, shared: nn.Module | None = None,
                 stats: MoEStats | None = None, layer: int = 0):
        super().__init__()
        ep, ep_rank, _ = ep_layout(ps)
        if getattr(ps, "cp", 1) > 1:
            raise ValueError("MoE layers with context parallelism (cp > 1) are not supported "
                             "yet (the balancing loss sums its statistics over tp only); use "
                             "cp = 1 with an MoE model")
        self.cfg, self.ps, self.layer = cfg, ps, layer
        self.stats = stats or MoEStats()
        self.num_experts, self.top_k = cfg.moe_num_experts, cfg.moe_top_k
        self.sequence_parallel = cfg.sequence_parallel and ps.tp > 1
        self.router = nn.Module()
        self.router.weight = nn.Parameter(init.normal(prefix + "router.weight", cfg.init_std)(
            torch.empty(cfg.moe_num_experts, cfg.d_model)).to(ps.device))
        if cfg.moe_router == "sigmoid":  # moved by finish_step, never by gradients
            self.router.score_bias = nn.Parameter(
                torch.zeros(cfg.moe_num_experts, device=ps.device), requires_grad=False)
        for p in self.router.parameters():  # fp32 even with 16-bit parameters
            p.keep_fp32 = True
        self.local_experts = split_experts(cfg.moe_num_experts, ep, ep_rank)
        self.experts = Experts(cfg, ps, init, prefix + "experts.", self.local_experts)
        self.shared = shared
        if cfg.moe_shared_gate:
            self.shared_gate = nn.Parameter(init.normal(prefix + "shared_gate.weight",
                                                        cfg.init_std)(
                torch.empty(1, cfg.d_model)).to(ps.device))
        self.selective_recompute = False  # set by Block.set_recompute (nothing to recompute)
        self.reset_step_stats()

    # ------------------------------------------------------------------ statistics
    def reset_step_stats(self) -> None:
        """Zero the step's per-expert token counts (this rank's tokens, before drops) and the
        sums of the losses (per microbatch) and the number of microbatches."""
        dev = self.ps.device
        self.step_counts = torch.zeros(self.num_experts, dtype=torch.float32, device=dev)
        self.step_losses = torch.zeros(3, dtype=torch.float32, device=dev)  # aux, z, count

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ps = self.ps
        # Each tp rank routes its own tokens: its sequence shard (sequence parallelism),
        # else its slice of the replicated sequence, gathered back afterwards.
        split_tokens = ps.tp > 1 and not self.sequence_parallel
        if split_tokens and x.shape[1] % ps.tp:
            raise ValueError(f"an MoE layer with tp={ps.tp} splits the sequence over the tp "
                             f"ranks: make seq_len ({x.shape[1]}) a multiple of tp")
        mine = comm.scatter_to_sequence_parallel_region(x, ps.tp_group) if split_tokens else x
        y, aux = self._routed(mine.reshape(-1, mine.shape[-1]))
        y = y.view(mine.shape)
        if split_tokens:
            y = comm.gather_from_tp_region(y, ps.tp_group, dim=1)
        if aux is not None:
            y = _AttachAuxLoss.apply(y, aux, self.stats.loss_scale)
        if self.shared is not None:
            shared = self.shared(x)
            if self.cfg.moe_shared_gate:
                gate = self.shared_gate
                if self.sequence_parallel:  # ranks gate different tokens: sum the gradient
                    gate = comm.copy_to_tp_region(gate, ps.tp_group)
                shared = shared * torch.sigmoid(F.linear(x, gate.to(x.dtype)))
            y = y + shared
        return y

    def route(self, tokens: torch.Tensor):
        """fp32 router on ``tokens`` [T, d]: (logits [T, E], chosen experts [T, k], their
        weights [T, k], probabilities for the balancing loss [T, E])."""
        cfg = self.cfg
        weight = self.router.weight
        if self.ps.tp > 1:  # each tp rank routes other tokens: sum the router's gradient
            weight = comm.copy_to_tp_region(weight, self.ps.tp_group)
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), weight.float())
            if cfg.moe_router == "softmax":
                probs = torch.softmax(logits, dim=-1)
                weights, chosen = torch.topk(probs, self.top_k, dim=-1)
            else:
                scores = torch.sigmoid(logits)
                _, chosen = torch.topk(scores + self.router.score_bias, self.top_k, dim=-1)
                weights = scores.gather(1, chosen)
                probs = scores / scores.sum(-1, keepdim=True)
            if cfg.moe_norm_topk and self.top_k > 1:
                weights = weights / weights.sum(-1, keepdim=True)
            if cfg.moe_routed_scaling != 1.0:
                weights = weights * cfg.moe_routed_scaling
        return logits, chosen, weights, probs

    def _routed(self, tokens: torch.Tensor):
        """The routed experts' output for ``tokens`` [T, d] and the auxiliary loss (or None)."""
        cfg, ps, E, k = self.cfg, self.ps, self.num_experts, self.top_k
        T = tokens.shape[0]
        logits, chosen, weights, probs = self.route(tokens)
        counts = torch.bincount(chosen.reshape(-1), minlength=E)
        aux = self._aux_loss(logits, probs, counts, T)

        # Token copies sorted by expert (stable: by token within an expert).
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sent = counts
        if cfg.moe_capacity_factor is not None:
            capacity = math.ceil(cfg.moe_capacity_factor * T * k / E)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(T * k, device=flat.device) - starts[flat[order]]
            order = order[position < capacity]
            sent = counts.clamp(max=capacity)
        token = order // k
        _, _, ep_group = ep_layout(ps)
        x, local_counts, plan = dispatch(tokens[token], sent, ep_group)
        y = self.experts(x, local_counts)
        y = combine(y, plan, ep_group)
        y = y * weights.reshape(-1)[order].to(y.dtype)[:, None]
        out = torch.zeros(T, tokens.shape[1], dtype=y.dtype, device=y.device)
        return out.index_add(0, token, y), aux

    def _aux_loss(self, logits, probs, counts, T):
        """The microbatch's weighted balancing + z-loss (None when both coefficients are 0),
        with statistics summed over the tp ranks' token shards; records the step's counts."""
        cfg, ps, E = self.cfg, self.ps, self.num_experts
        training = self.training and torch.is_grad_enabled() and not is_recomputing()
        if training:
            self.step_counts += counts.detach().float()
        if not (cfg.moe_aux_loss_coeff or cfg.moe_z_loss_coeff):
            return None
        with torch.autocast(logits.device.type, enabled=False):
            z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()
            local = torch.cat([probs.sum(0), counts.float(), z_sum.reshape(1),
                               torch.full((1,), float(T), device=logits.device)])
            total = comm.reduce_from_tp_region(local, ps.tp_group)  # identity backward
            tokens = total[-1].detach()
            balance = E * (total[:E] / tokens * total[E:2 * E].detach() / tokens).sum()
            z = total[2 * E] / tokens
            aux = cfg.moe_aux_loss_coeff * balance + cfg.moe_z_loss_coeff * z
        if training:
            self.step_losses += torch.stack([cfg.moe_aux_loss_coeff * balance.detach(),
                                             cfg.moe_z_loss_coeff * z.detach(),
                                             torch.ones((), device=z.device)])
        return aux


# ------------------------------------------------------------------ once per step

def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def finish_step(model, ps, update_bias: bool = True) -> dict:
    """After a step: sum every MoE layer's statistics over the whole world (one all-reduce),
    move the sigmoid routers' balancing biases (when ``update_bias``: not on a skipped
    step), reset the statistics. Returns the metrics: ``aux_loss`` and ``z_loss`` (the
    weighted losses summed over layers, mean per microbatch) and ``expert_load``
    {layer: max/mean tokens per expert}. Collective over all ranks; {} for a dense model."""
    cfg = model.cfg
    layers = cfg.moe_layers
    if not layers:
        return {}
    E = cfg.moe_num_experts
    mine = {m.layer: m for m in moe_layers(model)}
    packed = torch.zeros(len(layers), E + 3, dtype=torch.float32, device=ps.device)
    for row, i in enumerate(layers):
        m = mine.get(i)
        if m is None:
            continue
        packed[row, :E] = m.step_counts
        if ps.tp_rank == 0:  # the losses are the microbatch's, equal on every tp rank
            packed[row, E:] = m.step_losses
    if ps.world_size > 1:
        comm.all_reduce(packed, torch.distributed.group.WORLD)
    counts = packed[:, :E]
    for row, i in enumerate(layers):
        m = mine.get(i)
        if m is None:
            continue
        if update_bias and cfg.moe_router_bias_update and counts[row].sum() > 0:
            load = counts[row]
            m.router.score_bias += cfg.moe_router_bias_update * torch.sign(load.mean() - load)
        m.reset_step_stats()
    n = packed[:, E + 2].clamp(min=1)
    mean = counts.mean(1).clamp(min=1e-9)
    out = {"expert_load": {str(i): round(float(counts[r].max() / mean[r]), 4)
                           for r, i in enumerate(layers)}}
    if cfg.moe_aux_loss_coeff or cfg.moe_z_loss_coeff:
        out["aux_loss"] = float((packed[:, E] / n).sum())
        out["z_loss"] = float((packed[:, E + 1] / n).sum())
    return out
