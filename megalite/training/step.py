"""One optimizer step of a (tp, pp, dp) model: the pipeline schedule, then gradient sync.

The same function trains every layout: a single process is pp = 1 with a schedule of
``0F0 0B0 0F1 0B1 ...`` (plain gradient accumulation), so there is one code path.

The gradient path is one too: every parameter's gradient goes into the model's fp32
main-gradient buffers (:class:`~megalite.parallel.main_grads.MainGrads`,
``model.main_grads``), one per reduction group, whatever dp and whichever optimizer. With
``overlap_grad_reduce`` (the default) each bucket is reduced as soon as the last
microbatch's backward has finished its gradients; without, all buckets start after the
schedule. A group of one rank reduces nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megalite.parallel import comm, fsdp
from megalite.parallel.context import check_context_model, shard_sequence
from megalite.parallel.distributed_optimizer import DistributedOptimizer, MainParamOptimizer
from megalite.parallel.grad_buffer import DEFAULT_BUCKET_BYTES
from megalite.parallel.main_grads import MainGrads
from megalite.pipeline import build_schedule, run_schedule, stage_to_rank
from megalite.training.precision import activation_dtype, autocast


@dataclass
class StepResult:
    loss: float             # mean loss of the global batch (every rank)
    grad_norm: float        # before clipping
    peak_live: int          # most in-flight microbatches on this stage
    spans: list = field(default_factory=list)
    skipped: bool = False   # the optimizer step was skipped (fp16 overflow or nonfinite)
    nonfinite: bool = False  # skipped for a NaN/inf loss or gradient norm (not fp16 overflow)
    moe: dict = field(default_factory=dict)  # MoE metrics (aux_loss, expert_load); {} dense


def split_microbatches(tokens: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    if tokens.shape[0] % micro_batch_size:
        raise ValueError(f"this rank's batch of {tokens.shape[0]} samples is not a multiple of "
                         f"--micro-batch-size {micro_batch_size}")
    return list(tokens.split(micro_batch_size))


def pipeline_schedule(model, schedule, num_microbatches: int) -> dict[int, list[str]]:
    """The schedule (a name, or a {rank: actions} table) for ``model``'s placement: a name is
    built for the model's stages per rank; a table must place the stages as the model holds
    them. Raises a ValueError naming the fix otherwise."""
    ps = model.ps
    if isinstance(schedule, str):
        schedule = build_schedule(schedule, ps.pp, num_microbatches,
                                  virtual=model.num_stages // ps.pp)
    owner = check_placement(schedule, ps.pp)
    mine = sorted(s for s, r in owner.items() if r == ps.pp_rank)
    if len(owner) != model.num_stages or mine != model.stages:
        raise ValueError(f"the schedule puts stages {mine} of {len(owner)} on pipeline rank "
                         f"{ps.pp_rank}, but the model there holds stages {model.stages} of "
                         f"{model.num_stages}: build the model with stages=pipeline."
                         f"rank_stages(schedule)[pp_rank] and num_stages=... of this schedule")
    return schedule


def check_placement(schedule, pp: int) -> dict[int, int]:
    """{stage: rank} of a schedule the trainer can run: stage 0 (the embedding) on pipeline
    rank 0, the last stage on rank 0 or pp-1 (the ranks of the tied-embedding group, which
    :meth:`shared_embedding_params` are summed over)."""
    owner = stage_to_rank(schedule)
    if owner[0] != 0 or owner[len(owner) - 1] not in (0, pp - 1):
        raise ValueError(f"the schedule puts stage 0 on pipeline rank {owner[0]} and the last "
                         f"stage on rank {owner[len(owner) - 1]}: a GPT needs stage 0 on rank 0 "
                         f"and the last stage on rank 0 or {pp - 1}")
    return owner


def forward_backward(model, tokens, targets, *, micro_batch_size: int, schedule="1f1b",
                     activation_dtype=torch.float32, loss_fn=None, verbose=False, trace=False,
                     final_backward=None, loss_scale: float = 1.0):
    """Run the pipeline schedule (a name such as "1f1b", "interleaved-1f1b", "zbv", or a
    {pipeline rank: actions} table) over this rank's batch; gradients accumulate in
    ``model``. ``loss_fn(logits, targets)`` defaults to ``model.loss``. A ``loss_fn`` marked
    ``accepts_head_input`` (``model.loss`` is) gets the last stage's ``HeadInput`` instead
    of logits, so the fused head + loss never stores them. ``final_backward``: see
    :func:`megalite.pipeline.run_schedule`. ``loss_scale``: the factor ``loss_fn`` applies
    (fp16), which the MoE layers' auxiliary losses follow."""
    ps = model.ps
    loss_fn = loss_fn or model.loss
    tokens, targets = context_shard(tokens, targets, model)
    inputs = split_microbatches(tokens, micro_batch_size)
    labels = split_microbatches(targets, micro_batch_size)
    m = len(inputs)
    table = pipeline_schedule(model, schedule, m)
    if hasattr(model, "set_aux_loss_scale"):  # MoE aux losses: scaled as the pipeline's loss
        model.set_aux_loss_scale(loss_scale / m)
    # A loss marked accepts_head_input (GPT.loss) takes what the stages return with
    # head_input=True; other models' stage_modules() need not know the argument.
    stages = (model.stage_modules(head_input=True)
              if getattr(loss_fn, "accepts_head_input", False) else model.stage_modules())
    return run_schedule(table, stages, ps, num_microbatches=m,
                        activation_shape=model.activation_shape(micro_batch_size,
                                                                tokens.shape[1]),
                        activation_dtype=activation_dtype, inputs=inputs, targets=labels,
                        loss_fn=loss_fn, verbose=verbose, trace=trace,
                        final_backward=final_backward)


def context_shard(tokens, targets, model):
    """With context parallelism, this cp rank's 2 of the 2*cp chunks of every sequence
    (``megalite.parallel.context``); the model (one that declares
    ``supports_context_parallel``) knows their positions from its state."""
    ps = model.ps
    if ps.cp == 1:
        return tokens, targets
    check_context_model(model, ps.cp)
    if tokens.shape[1] % (2 * ps.cp):
        raise ValueError(f"cp={ps.cp} cuts each sequence into {2 * ps.cp} chunks: the "
                         f"sequence length {tokens.shape[1]} must be divisible by {2 * ps.cp}")
    return (shard_sequence(tokens, ps.cp, ps.cp_rank),
            shard_sequence(targets, ps.cp, ps.cp_rank))


def attach_main_grads(model, shard: bool = False,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> MainGrads:
    """The model's main-gradient buffers (``model.main_grads``), made on first use;
    ``shard=True`` for the distributed optimizer (replaces unsharded ones)."""
    old = getattr(model, "main_grads", None)
    if old is not None and old.shard == shard:
        return old
    if old is not None:
        old.remove_hooks()
    if hasattr(model, "stage_parameters"):
        stage_params = model.stage_parameters()
    else:  # unknown per-stage use: overlap only where one stage holds everything
        stage_params = {s: list(model.parameters()) for s in model.stages}
    model.main_grads = MainGrads(stage_params, model.ps, shard=shard,
                                 bucket_bytes=bucket_bytes,
                                 hold_back=model.shared_embedding_params())
    return model.main_grads


attach_grad_buffer = attach_main_grads  # the name of earlier releases


def distributed_optimizer(optimizer: torch.optim.Optimizer, model) -> DistributedOptimizer:
    """Shard ``optimizer`` (any elementwise torch optimizer over ``model``'s parameters, not
    stepped yet) over the data-parallel group: ZeRO-1, see
    :mod:`megalite.parallel.distributed_optimizer`."""
    return DistributedOptimizer(optimizer, attach_main_grads(model, shard=True))


def main_param_optimizer(optimizer: torch.optim.Optimizer, model) -> MainParamOptimizer:
    """Step ``optimizer`` on fp32 main weights of ``model``'s (16-bit) parameters, unsharded."""
    return MainParamOptimizer(optimizer, attach_main_grads(model, shard=False))


def _main_grads(model, optimizer) -> MainGrads:
    """The buffers this step reduces through (the optimizer's, checked to be the model's)."""
    buffers = getattr(model, "main_grads", None)
    wrapped = isinstance(optimizer, MainParamOptimizer)
    if wrapped and optimizer.main_grads is not buffers:
        raise ValueError(f"this {type(optimizer).__name__} steps on other gradient buffers "
                         f"than the model's (built for another model, or newer ones replaced "
                         f"them): build one optimizer per model and train with that one")
    if not wrapped and buffers is not None and buffers.shard:
        raise ValueError("the model's gradients are sharded for a DistributedOptimizer: "
                         "train it with that optimizer")
    if not wrapped and any(p.dtype != torch.float32 for p in model.parameters()
                           if p.requires_grad):
        raise ValueError("16-bit parameters train through fp32 main weights: build the "
                         "optimizer with megalite.training.build_optimizer (or wrap it with "
                         "megalite.training.step.main_param_optimizer)")
    return buffers if wrapped else attach_main_grads(model, shard=False)


def finalize_grads(model, main_grads: MainGrads | None = None) -> None:
    """Once per step: sum tied-embedding copies across stages, then finish the reduction
    over each buffer's group (whose overlapped buckets may already be in flight)."""
    ps = model.ps
    main_grads = main_grads if main_grads is not None else attach_main_grads(model)

    def sum_tied(flat):
        if ps.pp > 1:
            comm.all_reduce(flat, ps.embedding_group)
    main_grads.finish(before_held=sum_tied)


def train_step(model, optimizer, tokens, targets, *, micro_batch_size: int,
               schedule="1f1b", max_grad_norm: float = 1.0, grad_scaler=None,
               dtype: str = "fp32", verbose=False, trace=False, loss_fn=None,
               overlap_grad_reduce: bool = True) -> StepResult:
    """Forward and backward over this dp rank's ``tokens``/``targets`` ``[batch, seq]``,
    gradient sync, clipping and the optimizer step. Gradients are left in the parameters
    (zeroed at the start of the next step) for inspection: fp32 parameters' ``.grad`` are
    views into the main-gradient buffers (``model.main_grads.grad_view(p)`` for any), reused
    every step, and with the distributed optimizer only this rank's chunk is reduced
    (``optimizer.full_grad(p)`` gathers one). ``dtype`` "bf16"/"fp16" runs the
    forward under autocast with fp32 weights; fp16 needs a ``grad_scaler``. A non-finite
    loss or gradient norm skips the update on every rank (both are global values, so all
    ranks decide alike) and sets ``nonfinite``. A model with 16-bit parameters
    (``params_dtype``) trains in that dtype through fp32 main weights whatever ``dtype`` says
    (leave it "fp32"); fp16 parameters need a ``grad_scaler`` too. ``loss_fn`` defaults to ``model.loss``.
    ``overlap_grad_reduce`` reduces gradient buckets over dp during the last microbatch's
    backward; ``optimizer`` may be a :class:`DistributedOptimizer` (``build_optimizer(...,
    distributed=True)``)."""
    ps = model.ps
    moving = activation_dtype(model)
    if (dtype == "fp16" or moving == torch.float16) and grad_scaler is None:
        raise ValueError("fp16 training needs a DynamicLossScaler (grad_scaler=...)")
    sharded_model = fsdp.is_fsdp(model)  # FSDP reduces (reduce-scatters) its own gradients
    if sharded_model:
        fsdp.check_step(optimizer, dtype, moving)
        optimizer.zero_grad(set_to_none=True)
        fsdp.begin_step(model)
        main_grads = None
    else:
        main_grads = _main_grads(model, optimizer)
        main_grads.zero_grad()
    loss_fn = loss_fn or model.loss
    if grad_scaler is not None:  # fp16: scale the loss so small gradients stay representable
        unscaled_fn = loss_fn
        loss_fn = lambda out, tgt: grad_scaler.scale(unscaled_fn(out, tgt))  # noqa: E731
        loss_fn.accepts_head_input = getattr(unscaled_fn, "accepts_head_input", False)
    with autocast(dtype, ps.device):
        # Under autocast the residual stream stays fp32 (fp32 embeddings + 16-bit branches);
        # with 16-bit parameters it is 16-bit, and so is what the pipeline moves.
        result = forward_backward(model, tokens, targets, micro_batch_size=micro_batch_size,
                                  schedule=schedule, activation_dtype=moving,
                                  loss_fn=loss_fn, verbose=verbose, trace=trace,
                                  final_backward=main_grads.final_backward
                                  if main_grads is not None and overlap_grad_reduce else None,
                                  loss_scale=grad_scaler.scale_value if grad_scaler else 1.0)
    if sharded_model:
        fsdp.finish_grads(model, ps)
    else:
        finalize_grads(model, main_grads)
    # With the distributed optimizer (or FSDP) only this rank's shard of each gradient is
    # reduced; the norm, clipping and unscaling act on exactly the reduced parts.
    loss = result.loss
    skipped = False
    if grad_scaler is not None:
        loss = loss / grad_scaler.scale_value
        skipped = not grad_scaler.unscale_(main_grads, ps)
    max_norm = 0.0 if skipped else max_grad_norm
    norm = fsdp.clip_(model, max_norm, ps) if sharded_model else main_grads.clip_(max_norm)
    # Each cp rank's loss is cp x its share of the sequence's mean: average over dp x cp.
    loss = comm.all_reduce(loss.reshape(1).clone(), ps.dp_cp_group)[0] / ps.dp_cp
    # One host sync for both; they are global, so every rank skips (or not) alike.
    loss_value, norm_value = torch.stack([loss.reshape(()), norm.float().reshape(())]).tolist()
    nonfinite = not skipped and not (math.isfinite(loss_value) and math.isfinite(norm_value))
    skipped = skipped or nonfinite
    if not skipped:
        optimizer.step()
    if grad_scaler is not None:
        grad_scaler.update(found_inf=skipped)
    # MoE: the step's expert load and aux losses, the router bias update (collective).
    moe = model.finish_step(update_bias=not skipped) if hasattr(model, "finish_step") else {}
    return StepResult(loss=loss_value, grad_norm=norm_value, peak_live=result.peak_live,
                      spans=result.spans, skipped=skipped, nonfinite=nonfinite, moe=moe)
