"""One optimizer step of a (tp, pp, dp) model: the pipeline schedule, then gradient sync.

The same function trains every layout: a single process is pp = 1 with a schedule of
``0F0 0B0 0F1 0B1 ...`` (plain gradient accumulation), so there is one code path.

Data-parallel gradient reduction: with dp > 1 (or the distributed optimizer) gradients live
in the model's :class:`~megalite.parallel.grad_buffer.GradBuffer` (``model.grad_buffer``)
and, with ``overlap_grad_reduce`` (the default), each bucket is reduced as soon as the last
microbatch's backward has finished its gradients. ``overlap_grad_reduce=False`` without the
distributed optimizer reduces after the schedule in separate bucketed all-reduces, as
before the buffer existed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megalite.parallel import comm, fsdp
from megalite.parallel.distributed_optimizer import DistributedOptimizer
from megalite.parallel.grad_buffer import GradBuffer
from megalite.parallel.grads import (DEFAULT_BUCKET_BYTES, allreduce_data_parallel,
                                     allreduce_shared, clip_grad_norm_)
from megalite.pipeline import build_schedule, run_schedule, stage_to_rank
from megalite.training.precision import autocast


@dataclass
class StepResult:
    loss: float             # mean loss of the global batch (every rank)
    grad_norm: float        # before clipping
    peak_live: int          # most in-flight microbatches on this stage
    spans: list = field(default_factory=list)
    skipped: bool = False   # the optimizer step was skipped (fp16 overflow or nonfinite)
    nonfinite: bool = False  # skipped for a NaN/inf loss or gradient norm (not fp16 overflow)


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
                     final_backward=None):
    """Run the pipeline schedule (a name such as "1f1b", "interleaved-1f1b", "zbv", or a
    {pipeline rank: actions} table) over this rank's batch; gradients accumulate in
    ``model``. ``loss_fn(logits, targets)`` defaults to ``model.loss``. A ``loss_fn`` marked
    ``accepts_head_input`` (``model.loss`` is) gets the last stage's ``HeadInput`` instead
    of logits, so the fused head + loss never stores them. ``final_backward``: see
    :func:`megalite.pipeline.run_schedule`."""
    ps = model.ps
    loss_fn = loss_fn or model.loss
    inputs = split_microbatches(tokens, micro_batch_size)
    labels = split_microbatches(targets, micro_batch_size)
    m = len(inputs)
    table = pipeline_schedule(model, schedule, m)
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


def attach_grad_buffer(model, shard: bool = False,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> GradBuffer:
    """The model's flat gradient buffer (``model.grad_buffer``), made on first use;
    ``shard=True`` for the distributed optimizer (replaces an unsharded one)."""
    old = getattr(model, "grad_buffer", None)
    if old is not None and old.shard == shard:
        return old
    if old is not None:
        old.remove_hooks()
    if hasattr(model, "stage_parameters"):
        stage_params = model.stage_parameters()
    else:  # unknown per-stage use: overlap only where one stage holds everything
        stage_params = {s: list(model.parameters()) for s in model.stages}
    model.grad_buffer = GradBuffer(stage_params, model.ps, shard=shard,
                                   bucket_bytes=bucket_bytes,
                                   hold_back=model.shared_embedding_params())
    return model.grad_buffer


def distributed_optimizer(optimizer: torch.optim.Optimizer, model) -> DistributedOptimizer:
    """Shard ``optimizer`` (any elementwise torch optimizer over ``model``'s parameters, not
    stepped yet) over the data-parallel group: ZeRO-1, see
    :mod:`megalite.parallel.distributed_optimizer`."""
    return DistributedOptimizer(optimizer, attach_grad_buffer(model, shard=True))


def _grad_buffer(model, optimizer, overlap: bool) -> GradBuffer | None:
    """The buffer this step reduces through; None: plain ``.grad`` tensors (dp = 1, or no
    overlap without the distributed optimizer: the bucketed all-reduce after the schedule)."""
    buffer = getattr(model, "grad_buffer", None)
    distributed = isinstance(optimizer, DistributedOptimizer)
    if distributed and optimizer.grad_buffer is not buffer:
        raise ValueError("this DistributedOptimizer shards another gradient buffer than the "
                         "model's (built for another model, or a newer one replaced it): "
                         "build one optimizer per model and train with that one")
    if not distributed and buffer is not None and buffer.shard:
        raise ValueError("the model's gradients are sharded for a DistributedOptimizer: "
                         "train it with that optimizer")
    if distributed or (overlap and model.ps.dp > 1):
        return attach_grad_buffer(model, shard=distributed)
    return None


def finalize_grads(model, buffer: GradBuffer | None = None) -> None:
    """Once per step: sum tied-embedding copies across stages, average over dp (through
    ``buffer``, whose overlapped buckets may already be in flight)."""
    if buffer is None:
        allreduce_shared(model.shared_embedding_params(), model.ps)
        allreduce_data_parallel(model.parameters(), model.ps)
    else:
        buffer.finish(before_held=lambda params: allreduce_shared(params, model.ps))


def train_step(model, optimizer, tokens, targets, *, micro_batch_size: int,
               schedule="1f1b", max_grad_norm: float = 1.0, grad_scaler=None,
               dtype: str = "fp32", verbose=False, trace=False, loss_fn=None,
               overlap_grad_reduce: bool = True) -> StepResult:
    """Forward and backward over this dp rank's ``tokens``/``targets`` ``[batch, seq]``,
    gradient sync, clipping and the optimizer step. Gradients are left in the parameters
    (zeroed at the start of the next step) for inspection: with a gradient buffer (dp > 1)
    they are views into it, reused every step, and with the distributed optimizer only this
    rank's chunk is reduced (``optimizer.full_grad(p)`` gathers one). ``dtype`` "bf16"/"fp16" runs the
    forward under autocast with fp32 weights; fp16 needs a ``grad_scaler``. A non-finite
    loss or gradient norm skips the update on every rank (both are global values, so all
    ranks decide alike) and sets ``nonfinite``. ``loss_fn`` defaults to ``model.loss``.
    ``overlap_grad_reduce`` reduces gradient buckets over dp during the last microbatch's
    backward; ``optimizer`` may be a :class:`DistributedOptimizer` (``build_optimizer(...,
    distributed=True)``)."""
    ps = model.ps
    if dtype == "fp16" and grad_scaler is None:
        raise ValueError("fp16 training needs a DynamicLossScaler (grad_scaler=...)")
    sharded_model = fsdp.is_fsdp(model)  # FSDP reduces (reduce-scatters) its own gradients
    if sharded_model and isinstance(optimizer, DistributedOptimizer):
        raise ValueError("an FSDP model shards its optimizer state already: build a plain "
                         "optimizer over its parameters (no distributed optimizer)")
    if sharded_model and dtype == "fp16":
        raise ValueError("--fsdp supports --dtype fp32 and bf16, not fp16: use bf16")
    buffer = None if sharded_model else _grad_buffer(model, optimizer, overlap_grad_reduce)
    if sharded_model:
        optimizer.zero_grad(set_to_none=True)
        fsdp.begin_step(model)
    elif buffer is None:
        optimizer.zero_grad(set_to_none=True)
    else:
        buffer.zero_grad()
    loss_fn = loss_fn or model.loss
    if grad_scaler is not None:  # fp16: scale the loss so small gradients stay representable
        unscaled_fn = loss_fn
        loss_fn = lambda out, tgt: grad_scaler.scale(unscaled_fn(out, tgt))  # noqa: E731
        loss_fn.accepts_head_input = getattr(unscaled_fn, "accepts_head_input", False)
    with autocast(dtype, ps.device):
        # The residual stream stays fp32 under autocast (fp32 embeddings + 16-bit branches).
        result = forward_backward(model, tokens, targets, micro_batch_size=micro_batch_size,
                                  schedule=schedule, activation_dtype=torch.float32,
                                  loss_fn=loss_fn, verbose=verbose, trace=trace,
                                  final_backward=buffer.final_backward
                                  if buffer is not None and overlap_grad_reduce else None)
    if sharded_model:
        fsdp.finish_grads(model, ps)
    else:
        finalize_grads(model, buffer)
    sharded = sharded_model or isinstance(optimizer, DistributedOptimizer)
    # With the distributed optimizer or FSDP only this rank's shard of each gradient is reduced.
    params = list(model.parameters())
    if sharded_model:
        params = fsdp.local_grads(params)
    elif sharded:
        params = optimizer.shard_parameters(params)
    loss = result.loss
    skipped = False
    if grad_scaler is not None:
        loss = loss / grad_scaler.scale_value
        skipped = not grad_scaler.unscale_(params, ps)
    norm = clip_grad_norm_(params, 0.0 if skipped else max_grad_norm, ps, dp_sharded=sharded)
    loss = comm.all_reduce(loss.reshape(1).clone(), ps.dp_group)[0] / ps.dp
    # One host sync for both; they are global, so every rank skips (or not) alike.
    loss_value, norm_value = torch.stack([loss.reshape(()), norm.float().reshape(())]).tolist()
    nonfinite = not skipped and not (math.isfinite(loss_value) and math.isfinite(norm_value))
    skipped = skipped or nonfinite
    if not skipped:
        optimizer.step()
    if grad_scaler is not None:
        grad_scaler.update(found_inf=skipped)
    return StepResult(loss=loss_value, grad_norm=norm_value, peak_live=result.peak_live,
                      spans=result.spans, skipped=skipped, nonfinite=nonfinite)
