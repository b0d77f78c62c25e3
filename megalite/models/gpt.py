"""A GPT built only from megalite's parallel layers, read top to bottom.

``GPT(cfg)`` builds *this rank's* pipeline stage (or stages, for interleaved and V-shaped
schedules), sharded over its TP group: the first stage owns the embeddings, the last the
final norm and the output head. Activations are
``[batch, seq, d_model]``; with sequence parallelism the residual stream outside attention
and MLP is ``[batch, seq/tp, d_model]``.

Initialization is layout invariant: every parameter is drawn from a generator seeded by one
number taken from torch's global RNG plus the parameter's global name, then sharded. So the
same ``torch.manual_seed`` gives the same full model at any (tp, pp), and a stage does not
need the layers of earlier stages to initialize its own.

The layers it stacks live beside it, one concept a file: ``Block`` and ``MLP``
(:mod:`megalite.models.block`), ``Attention`` and ``rope_tables``
(:mod:`megalite.models.attention`), ``Norm`` (:mod:`megalite.models.norm`), ``MoE``
(:mod:`megalite.models.moe`); their names stay importable from here.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.models.attention import Attention, rope_tables  # noqa: F401  (Attention: re-exported)
from megalite.models.block import MLP, Block, _tp_fork  # noqa: F401  (MLP: re-exported)
from megalite.models.config import GPTConfig
from megalite.models.moe import MoEStats, finish_step
from megalite.models.norm import Norm
from megalite.parallel import comm
from megalite.parallel.context import positions as cp_positions
from megalite.parallel.cross_entropy import (vocab_parallel_cross_entropy,
                                             vocab_parallel_linear_cross_entropy)
from megalite.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding, init_rows,
                                      set_tp_layout, padded_vocab_size)
from megalite.parallel.param_meta import mark_pipeline_duplicate, param_meta
from megalite.parallel.random import get_rng_tracker
from megalite.parallel.state import ParallelState, get_state
from megalite.parallel.partition import layers_per_stage, stage_layers


# GPTConfig fields that change no saved tensor (layout, kernels, regularization, init): a
# checkpoint loads across them. Every other field must match.
CHECKPOINT_FREE_FIELDS = frozenset({
    "dropout", "kernels", "sequence_parallel", "layers_per_stage", "master_init",
    "pad_vocab_to", "init_std", "recompute", "recompute_layers", "fused_loss",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_capacity_factor", "moe_router_bias_update",
    "cp_comm",
    "params_dtype"})  # checkpoints hold fp32 (main) weights whatever the parameters' dtype

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Init:
    """Per-parameter init from (base seed, global name): independent of layout and order."""

    def __init__(self, cfg: GPTConfig, ps: ParallelState):
        self.base = int(torch.randint(0, 2**31 - 1, (1,)))
        # Local (unsharded) init draws a different stream per TP rank.
        self.salt = 0 if cfg.master_init else 7919 * (ps.tp_rank + 1)

    def normal(self, name: str, std: float):
        seed = (self.base * 1_000_003 + zlib.crc32(name.encode()) + self.salt) % 2**63

        def init(t):
            return t.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        return init


@dataclass
class HeadInput:
    """What the last stage hands ``GPT.loss`` in training when ``cfg.fused_loss``: the
    final-normed hidden states (this rank's sequence shard under sequence parallelism),
    not logits, so that the loss can fuse the output head and never store ``[tokens, V]``.
    ``GPT.logits(head_input)`` turns it into the logits ``model(tokens)`` returns."""
    hidden: torch.Tensor


def _as_saved(value):
    """A config value as meta.json gives it back: JSON has no tuples (moe_dense_layers)."""
    return list(value) if isinstance(value, tuple) else value


class GPT(nn.Module):
    """This rank's pipeline stages of a GPT, TP-sharded.

    ``stages`` lists the global stage indices this rank owns out of ``num_stages`` (default:
    one stage per pipeline rank, stage = pp rank; several for interleaved or V-shaped
    schedules, e.g. ``pipeline.rank_stages(schedule)[ps.pp_rank]``). Stage 0 owns the
    embeddings, the last stage the final norm and the output head; the layers are split
    over the stages by ``cfg.layers_per_stage`` (one count per stage) or evenly. Parameter
    names are global (``layers.7.mlp.up.weight``), whatever the layout.

    ``forward(x, stage=None)``: on stage 0 ``x`` is tokens ``[batch, seq]``, else the previous
    stage's hidden states; the last stage returns logits ``[batch, seq, V_padded/tp]`` (this
    rank's vocabulary shard), the others hidden states. ``stage`` may be omitted when the
    rank owns one stage. ``loss(logits, targets)`` is the mean cross-entropy over the real
    vocabulary. Works in one process without torch.distributed.

    Training (``stage_modules(head_input=True)``, what ``training.forward_backward`` uses
    with ``model.loss`` when ``cfg.fused_loss``) makes the last stage return a
    :class:`HeadInput` instead of logits, and ``loss`` then runs the head and the
    cross-entropy as one chunked op (``parallel.vocab_parallel_linear_cross_entropy``).
    """

    # Its attention runs the cp ring and its positions are the rank's chunks' (the trainer
    # refuses cp > 1 for a model without this: megalite.parallel.context.check_context_model)
    supports_context_parallel = True

    def __init__(self, cfg: GPTConfig, state: ParallelState | None = None,
                 stages: list[int] | None = None, num_stages: int | None = None):
        super().__init__()
        ps = state or get_state()
        self.cfg, self.ps = cfg, ps
        self.num_stages = ps.pp if num_stages is None else num_stages
        if stages is None:  # loop placement: stage s on pipeline rank s mod pp
            if self.num_stages % ps.pp:
                raise ValueError(f"num_stages={self.num_stages} is not a multiple of pp={ps.pp}; "
                                 f"pass this rank's stages explicitly")
            stages = list(range(ps.pp_rank, self.num_stages, ps.pp))
        self.stages = sorted(stages)
        if not self.stages or not all(0 <= s < self.num_stages for s in self.stages):
            raise ValueError(f"stages {stages} must be a non-empty list of stage indices in "
                             f"[0, {self.num_stages})")
        if cfg.sequence_parallel and cfg.dropout > 0 and "tensor-parallel" not in \
                get_rng_tracker().states and ps.tp > 1:
            raise ValueError("dropout with sequence_parallel needs the TP RNG stream: call "
                             "megalite.parallel.model_parallel_seed(seed) before building GPT")
        init = _Init(cfg, ps)
        self.is_first, self.is_last = 0 in self.stages, self.num_stages - 1 in self.stages
        self.stage_layers = {s: stage_layers(cfg.n_layers, self.num_stages, s,
                                             cfg.layers_per_stage) for s in self.stages}
        sp = cfg.sequence_parallel and ps.tp > 1
        self.sequence_parallel = sp

        if self.is_first or (self.is_last and cfg.tie_embeddings):
            # With tied embeddings and the last stage on another rank, that rank keeps its
            # own copy, initialized from the same name (so identical), and kept identical by
            # summing the two gradients over the embedding group every step. When one rank
            # owns both (V placement, pp=1) the one table serves both ends.
            self.embed = VocabParallelEmbedding(
                cfg.vocab_size, cfg.d_model, sequence_parallel=sp, pad_to_multiple=cfg.pad_vocab_to,
                init_method=init.normal("embed.weight", cfg.init_std),
                master_init=cfg.master_init, state=ps)
            if not self.is_first:  # the last stage's copy: counted once in the grad norm
                mark_pipeline_duplicate(self.embed.weight)
        if self.is_first and cfg.position == "learned":
            table = init.normal("pos_embed", cfg.init_std)(torch.empty(cfg.max_seq_len, cfg.d_model))
            self.pos_embed = nn.Parameter(table.to(ps.device))
        self.moe_stats = MoEStats()  # the aux-loss scale all MoE layers read
        self.layers = nn.ModuleDict({str(i): Block(cfg, ps, init, i, self.moe_stats)
                                     for s in self.stages for i in self.stage_layers[s]})
        for s in self.stages:  # full recompute: the first recompute_layers of each stage
            layers = self.stage_layers[s]
            n = len(layers) if cfg.recompute_layers is None else cfg.recompute_layers
            if n > len(layers):
                counts = layers_per_stage(cfg.n_layers, self.num_stages, cfg.layers_per_stage)
                raise ValueError(f"recompute_layers={n} but stage {s} has {len(layers)} "
                                 f"layers (layers per stage: {counts}); use at most the "
                                 f"fewest layers a stage has")
            for j, i in enumerate(layers):
                self.layers[str(i)].set_recompute(cfg.recompute if j < n else "none")
        if cfg.position == "rope" and len(self.layers):
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, ps.device,
                                   cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if self.is_last:
            self.final_norm = Norm(cfg, ps)
            # Tied: same sharding as the embedding table, whose weight forward passes in.
            self.head = ColumnParallelLinear(
                cfg.d_model, padded_vocab_size(cfg.vocab_size, ps.tp, cfg.pad_vocab_to),
                bias=False, sequence_parallel=sp, create_weight=not cfg.tie_embeddings,
                init_method=init_rows(init.normal("head.weight", cfg.init_std), cfg.vocab_size),
                master_init=cfg.master_init, state=ps)
            if self.head.weight is not None:
                set_tp_layout(self.head.weight, 0, param_meta(self.head.weight).tp_sizes,
                              real_size=cfg.vocab_size)
        self.dtype = PARAMS_DTYPES[cfg.params_dtype]
        if self.dtype != torch.float32:
            self._to_params_dtype()

    def _to_params_dtype(self) -> None:
        """16-bit parameters (``cfg.params_dtype``), initialized as fp32 and rounded, so the
        fp32 main weights start from the same values in every layout. Norm weights stay fp32
        (as Megatron keeps them): their gradients are reductions over many tokens, and the
        normalization itself runs in fp32 inside the kernel; so do MoE routers (marked
        ``keep_fp32``: routing runs in fp32, and the balancing bias moves by small steps). Parameter objects (and their
        metadata) are kept; only their data changes dtype."""
        norms = {id(p) for m in self.modules() if isinstance(m, Norm) for p in m.parameters()}
        with torch.no_grad():
            for p in self.parameters():
                if id(p) not in norms and not getattr(p, "keep_fp32", False):
                    p.data = p.data.to(self.dtype)

    def stage_modules(self, head_input: bool = False) -> dict:
        """{stage: callable running that stage}, for ``pipeline.run_schedule``.
        ``head_input``: the last stage returns a :class:`HeadInput` for ``loss`` (the fused
        head) instead of logits."""
        return {s: (lambda x, s=s: self(x, stage=s, head_input=head_input))
                for s in self.stages}

    def stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        """{stage: the parameters its forward uses}; a tied table serving both ends of this
        rank is listed under both stages. Tells data parallelism when gradients are final."""
        out = {}
        for s in self.stages:
            params = [p for i in self.stage_layers[s] for p in self.layers[str(i)].parameters()]
            if s == 0:
                params += list(self.embed.parameters())
                params += [self.pos_embed] if hasattr(self, "pos_embed") else []
            if s == self.num_stages - 1:
                params += list(self.final_norm.parameters()) + list(self.head.parameters())
                if self.cfg.tie_embeddings and s != 0:
                    params += list(self.embed.parameters())
            out[s] = params
        return out

    # ------------------------------------------------------------------ forward
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]  # with cp: this rank's 2 chunks of a sequence cp times longer
        if s * self.ps.cp > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s * self.ps.cp} exceeds max_seq_len="
                             f"{self.cfg.max_seq_len}")
        if self.ps.cp > 1 and s % 2:
            raise ValueError(f"context parallelism: this rank's tokens are 2 chunks of the "
                             f"sequence, so their count ({s}) must be even")
        if self.sequence_parallel and s % self.ps.tp:
            raise ValueError(f"sequence parallelism needs seq_len ({s}) divisible by "
                             f"tp={self.ps.tp}")
        x = self.embed(tokens)
        if self.cfg.position == "learned":
            pos = self.pos_embed[self.positions(s)].unsqueeze(0)
            if self.sequence_parallel:
                pos = comm.scatter_to_sequence_parallel_region(pos, self.ps.tp_group)
            x = x + pos
        if self.training and self.cfg.dropout > 0:
            with _tp_fork(self.sequence_parallel):
                x = F.dropout(x, self.cfg.dropout, training=True)
        return x

    def forward(self, x: torch.Tensor, stage: int | None = None,
                head_input: bool = False) -> torch.Tensor | HeadInput:
        if stage is None:
            if len(self.stages) != 1:
                raise ValueError(f"this rank holds stages {self.stages}: call model(x, stage=s)")
            stage = self.stages[0]
        if stage not in self.stage_layers:
            raise ValueError(f"stage {stage} is not on this rank (it holds {self.stages})")
        local_len = x.shape[1] * (self.ps.tp if stage != 0 and self.sequence_parallel else 1)
        if stage == 0:
            x = self.embed_tokens(x)
        rope = None
        if hasattr(self, "rope_cos"):
            pos = self.positions(local_len)
            rope = (self.rope_cos[pos], self.rope_sin[pos])
        for i in self.stage_layers[stage]:
            x = self.layers[str(i)](x, rope)
        if stage != self.num_stages - 1:
            return x
        x = self.final_norm(x)
        if head_input:
            return HeadInput(x)
        return self.logits(x)

    def positions(self, local_len: int) -> torch.Tensor | slice:
        """Position ids of this rank's ``local_len`` tokens: 0.. without context
        parallelism; with it, those of the two chunks this cp rank holds."""
        if self.ps.cp == 1:
            return slice(0, local_len)
        return cp_positions(local_len, self.ps.cp, self.ps.cp_rank, self.ps.device)

    def head_weight(self) -> torch.Tensor:
        """This rank's [V_padded/tp, d] output weight: the embedding table when tied."""
        return self.embed.weight if self.cfg.tie_embeddings else self.head.weight

    def logits(self, x: torch.Tensor | HeadInput) -> torch.Tensor:
        """The output head on final-normed hidden states (or a :class:`HeadInput`)."""
        x = x.hidden if isinstance(x, HeadInput) else x
        return self.head(x, self.embed.weight if self.cfg.tie_embeddings else None)

    def loss(self, logits: torch.Tensor | HeadInput, targets: torch.Tensor,
             ignore_index: int = -100, inplace_backward: bool = True) -> torch.Tensor:
        """Mean cross-entropy over the non-ignored targets (vocabulary padding masked).

        ``logits`` is this rank's logits shard (``model(tokens)``) or, in training, the last
        stage's :class:`HeadInput`: then the head and the cross-entropy run fused, chunk by
        chunk, and the logits are never stored (``cfg.fused_loss=False`` computes them and
        calls the unfused loss instead).

        Training steps average this per microbatch, so with ``ignore_index`` targets a step's
        loss is a mean of microbatch means (as in Megatron), not a mean over all its tokens.

        With context parallelism (``ps.cp > 1``: ``targets`` are this rank's chunks) it
        returns cp x this rank's loss sum / the whole sequence's non-ignored tokens (one
        all-reduce over cp): averaged over cp, the single-process mean.

        By default the backward pass writes the logits' gradient into the logits buffer
        (no second [tokens, vocab/tp] buffer): keep a copy if you need logits afterwards."""
        cp = self.ps.cp
        if isinstance(logits, HeadInput):
            if self.cfg.fused_loss:
                loss = vocab_parallel_linear_cross_entropy(
                    logits.hidden, self.head_weight(), targets, self.cfg.vocab_size,
                    ignore_index, sequence_parallel=self.sequence_parallel, state=self.ps,
                    backend=self.cfg.kernels, reduction="mean" if cp == 1 else "sum")
                return loss if cp == 1 else self._context_parallel_mean(loss, targets,
                                                                        ignore_index)
            logits = self.logits(logits)
        per_token = vocab_parallel_cross_entropy(
            logits, targets, self.cfg.vocab_size, ignore_index, state=self.ps,
            inplace_backward=inplace_backward, backend=self.cfg.kernels)
        if cp > 1:
            return self._context_parallel_mean(per_token.sum(), targets, ignore_index)
        count = (targets != ignore_index).sum().clamp(min=1)
        return per_token.sum() / count

    def _context_parallel_mean(self, local_sum, targets, ignore_index):
        """cp x (this rank's loss sum) / (the sequence's non-ignored tokens over all cp
        ranks). The gradients, averaged over dp x cp, are then those of the mean over the
        whole sequence, each rank weighted by its tokens (a rank whose chunks hold more
        ignored tokens counts less); the loss averaged over cp is that mean."""
        count = (targets != ignore_index).sum().to(torch.float32).reshape(1)
        comm.all_reduce(count, self.ps.cp_group)
        return local_sum * self.ps.cp / count[0].clamp(min=1)

    loss.accepts_head_input = True  # training.forward_backward may pass a HeadInput

    # ------------------------------------------------------------------ for the trainer
    # (megalite.training.trainable.TrainableModel: what the pipeline and checkpoints need)
    def activation_shape(self, micro_batch_size: int, seq_len: int) -> tuple[int, int, int]:
        """Shape of the hidden states passed between stages."""
        seq = seq_len // self.ps.tp if self.sequence_parallel else seq_len
        return (micro_batch_size, seq, self.cfg.d_model)

    def checkpoint_config(self) -> dict:
        """The config a checkpoint records (``GPTConfig(**config)`` rebuilds the model)."""
        return dataclasses.asdict(self.cfg)

    def check_checkpoint_config(self, saved: dict) -> None:
        """Raise a ValueError when a checkpoint's config is of another model. Fields that
        change no saved tensor (layout, kernels, regularization, init) may differ."""
        free = set(CHECKPOINT_FREE_FIELDS)
        if self.cfg.position == "rope":  # no table depends on it: a longer context may load
            free.add("max_seq_len")
        # A field the checkpoint lacks was added after it was written, so the saved model
        # had that field's default (an old llama-1b checkpoint has plain RoPE, not the
        # llama3 scaling the preset has now): complete it as GPTConfig would.
        names, written = {f.name for f in dataclasses.fields(GPTConfig)}, set(saved)
        saved = dataclasses.asdict(GPTConfig(**{k: v for k, v in saved.items() if k in names}))
        diffs = [f"{k}={saved[k]!r}" + (" (the checkpoint predates this field)"
                                         if k not in written else "") + f" (model: {v!r})"
                 for k, v in self.checkpoint_config().items()
                 if k not in free and _as_saved(saved[k]) != _as_saved(v)]
        if diffs:
            raise ValueError(f"another model: {', '.join(diffs)}; build the model with the "
                             f"checkpoint's config (meta.json 'config')")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the whole model (for MFU)."""
        return self.cfg.flops_per_token(seq_len)

    def set_aux_loss_scale(self, scale: float) -> None:
        """The gradient the MoE layers' auxiliary losses get in backward: the scale the
        pipeline applies to the loss (1 / microbatches, x the fp16 loss scale)."""
        self.moe_stats.loss_scale = scale

    def finish_step(self, update_bias: bool = True) -> dict:
        """After each optimizer step (collective): the MoE metrics (aux/z loss, expert load
        per layer), the sigmoid routers' bias update; {} for a dense model."""
        return finish_step(self, self.ps, update_bias)

    def shared_embedding_params(self) -> list[nn.Parameter]:
        """Parameters duplicated on the first and last stage's ranks (tied embeddings with
        those stages on different ranks)."""
        if self.cfg.tie_embeddings and self.is_first != self.is_last:
            return [self.embed.weight]
        return []
