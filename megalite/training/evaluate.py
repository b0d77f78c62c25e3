"""Validation loss: held-out batches through the pipeline, forward only.

Each batch runs the F actions of the training schedule (`pipeline.forward_schedule`) under
``torch.no_grad`` with the model in eval mode (no dropout): no gradient is made, no
parameter or optimizer state changes. The loss is the training loss's (the mean token
cross-entropy of the global batch, averaged over dp), so it is the same at every layout.
"""
from __future__ import annotations

import math

import torch

from megalite.parallel import comm
from megalite.pipeline import forward_schedule, run_schedule
from megalite.training.data import get_batch
from megalite.training.precision import activation_dtype, autocast
from megalite.training.sampler import dp_shard
from megalite.training.step import context_shard, pipeline_schedule, split_microbatches


def forward_loss(model, tokens, targets, *, micro_batch_size: int, schedule="1f1b",
                 dtype: str = "fp32") -> torch.Tensor:
    """Mean loss of a global batch whose dp slice on this rank is ``tokens``/``targets``
    ``[batch, seq]``, computed forward only through ``schedule`` (a name or the training
    table); the same value on every rank."""
    ps = model.ps
    tokens, targets = context_shard(tokens, targets, model)
    inputs = split_microbatches(tokens, micro_batch_size)
    labels = split_microbatches(targets, micro_batch_size)
    m = len(inputs)
    table = forward_schedule(pipeline_schedule(model, schedule, m))
    # as in training: a loss marked accepts_head_input (GPT's fused head) takes the stages'
    # HeadInput instead of logits
    stages = (model.stage_modules(head_input=True)
              if getattr(model.loss, "accepts_head_input", False) else model.stage_modules())
    with autocast(dtype, ps.device):
        result = run_schedule(table, stages, ps, num_microbatches=m,
                              activation_shape=model.activation_shape(micro_batch_size,
                                                                      tokens.shape[1]),
                              activation_dtype=activation_dtype(model), inputs=inputs,
                              targets=labels,
                              loss_fn=model.loss, forward_only=True)
    return comm.all_reduce(result.loss.reshape(1).clone(), ps.dp_cp_group)[0] / ps.dp_cp


def evaluate(model, dataset, batches, *, micro_batch_size: int, schedule="1f1b",
             dtype: str = "fp32") -> float:
    """Mean loss over ``batches`` (global batches of indices into ``dataset``, e.g.
    `sampler.heldout_batches`); each dp rank runs its slice of every batch. ``model``: any
    :class:`~megalite.training.trainable.TrainableModel` (an ``nn.Module``: it is put in
    eval mode meanwhile)."""
    ps = model.ps
    was_training = getattr(model, "training", None)  # an nn.Module: no dropout meanwhile
    if was_training is not None:
        model.eval()
    try:
        losses = []
        for batch in batches:
            tokens, targets = get_batch(dataset, dp_shard(batch, ps.dp_rank, ps.dp))
            losses.append(forward_loss(model, tokens.to(ps.device), targets.to(ps.device),
                                       micro_batch_size=micro_batch_size, schedule=schedule,
                                       dtype=dtype))
    finally:
        if was_training is not None:
            model.train(was_training)
    return torch.stack(losses).mean().item()


def perplexity(loss: float) -> float:
    """exp(loss), inf past float range."""
    return math.exp(loss) if loss < 700 else math.inf
