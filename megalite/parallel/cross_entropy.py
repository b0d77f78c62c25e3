"""Cross-entropy over logits split by vocabulary across TP ranks.

The full ``[tokens, vocab]`` logits are never gathered. Each rank computes, over its own
columns, a logsumexp, the logit at the target (if it owns the target) and, for label
smoothing, the sum of its logits. One all-gather of the per-rank logsumexps gives the global
logsumexp; one all-reduce sums the target logits (and logit sums). The backward pass needs
no communication: ``softmax - onehot`` on the local columns. The math is fp32 whatever the
logits' dtype; the per-shard statistics and the gradient are the Triton kernels of
``megalite.kernels.cross_entropy`` (``shard_stats`` / ``shard_grad_``) on CUDA. Columns at or beyond ``vocab_size`` (vocabulary padding) are masked out.
"""
from __future__ import annotations

import torch

from megalite import kernels
from megalite.kernels.linear_cross_entropy import LinearCrossEntropyFunction, check_inputs
from megalite.parallel import comm
from megalite.parallel.layers import check_ids_in_range
from megalite.parallel.state import ParallelState, get_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ignore_index, label_smoothing, group,
                inplace_backward, backend):
        local_vocab = logits.shape[-1]
        vocab_start = comm.group_rank(group) * local_vocab
        x = logits.reshape(-1, local_vocab)
        t = target.reshape(-1)
        smoothing = label_smoothing > 0
        lse_local, target_logit, logit_sum = kernels.shard_stats(
            x, t, vocab_start, vocab_size, ignore_index, with_sum=smoothing, backend=backend)

        lse = torch.logsumexp(comm.all_gather(lse_local.unsqueeze(0), group, dim=0), dim=0)
        sums = comm.all_reduce(torch.stack([target_logit] + ([logit_sum] if smoothing else [])),
                               group)
        loss = lse - (1 - label_smoothing) * sums[0]
        if smoothing:
            loss = loss - label_smoothing / vocab_size * sums[1]
        loss = loss.masked_fill(t == ignore_index, 0.0)

        ctx.save_for_backward(logits, t, lse)
        ctx.args = (vocab_start, vocab_size, ignore_index, label_smoothing, inplace_backward,
                    backend)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, t, lse = ctx.saved_tensors
        vocab_start, vocab_size, ignore_index, smoothing, inplace, backend = ctx.args
        x = logits.reshape(-1, logits.shape[-1])
        out = x if inplace and x.is_contiguous() else torch.empty_like(x)
        grad = kernels.shard_grad_(x, t, lse, grad_loss.reshape(-1).float().contiguous(),
                                   vocab_start, vocab_size, ignore_index, smoothing, out=out,
                                   backend=backend)
        return grad.view_as(logits), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, *,
                                 state: ParallelState | None = None,
                                 inplace_backward: bool = False,
                                 backend: str = "auto") -> torch.Tensor:
    """Per-token fp32 loss from this rank's vocab shard of the logits.

    logits: ``[..., V_padded / tp]``; target: ``[...]`` global token ids. Returns a loss
    shaped like ``target`` (0 where ``target == ignore_index``). ``vocab_size`` (default: all
    columns) masks the padding columns out of the softmax. The vocabulary is split over the
    TP group of ``state`` (default: the current state). The per-shard work runs in
    ``megalite.kernels`` (Triton on CUDA, ``backend`` as there); ``inplace_backward`` writes
    the gradient into the logits buffer instead of a new one (saves a [tokens, vocab/tp]
    buffer; the logits are garbage after backward).
    """
    group = (state or get_state()).tp_group
    tp = comm.group_size(group)
    full = logits.shape[-1] * tp
    vocab_size = full if vocab_size is None else vocab_size
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {full}] (the padded vocab "
                         f"is {logits.shape[-1]} columns x tp={tp})")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         f"disagree: logits must be target.shape + [vocab shard]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    check_ids_in_range(target.masked_fill(target == ignore_index, 0), vocab_size, "targets",
                       f"use ids of the real vocabulary, or ignore_index={ignore_index}")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, ignore_index,
                                            label_smoothing, group, inplace_backward, backend)


def _combine_over(group):
    """Merge one chunk's per-rank statistics: logsumexp of the logsumexps, sum of the
    target logits (only the owning rank's is non-zero). One all-gather per chunk."""
    def combine(lse, target_logit):
        both = comm.all_gather(torch.stack([lse, target_logit]).unsqueeze(0), group, dim=0)
        return torch.logsumexp(both[:, 0], dim=0), both[:, 1].sum(dim=0)
    return combine


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                        target: torch.Tensor, vocab_size: int | None = None,
                                        ignore_index: int = -100, *,
                                        sequence_parallel: bool = False,
                                        reduction: str = "mean",
                                        chunk_size: int | None = None,
                                        state: ParallelState | None = None,
                                        backend: str = "auto") -> torch.Tensor:
    """The output head (``ColumnParallelLinear`` without bias, weight split by vocabulary
    rows) and the cross-entropy in one op: no rank ever holds the ``[tokens, V/tp]`` logits.

    hidden: ``[..., d]`` on every TP rank (``[b, s/tp, d]`` with ``sequence_parallel``: it is
    all-gathered along the sequence first, as the head does); weight: this rank's
    ``[V_padded/tp, d]`` shard; target: ``[...]`` global ids for the gathered tokens. Tokens
    are processed in chunks (``kernels.linear_cross_entropy``); per chunk each rank computes
    its shard's logits and statistics, and one all-gather over the TP group merges them.
    Returns the fp32 loss, mean over non-ignored targets (or ``reduction="sum"``); columns
    >= ``vocab_size`` (padding) are masked out.
    """
    group = (state or get_state()).tp_group
    tp = comm.group_size(group)
    full = weight.shape[0] * tp
    vocab_size = full if vocab_size is None else vocab_size
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {full}] (the padded vocab "
                         f"is {weight.shape[0]} rows x tp={tp})")
    if sequence_parallel:
        hidden = comm.gather_from_sequence_parallel_region(hidden, group)
    else:
        hidden = comm.copy_to_tp_region(hidden, group)
    check_inputs(hidden, weight, target, reduction, "vocab_parallel_linear_cross_entropy")
    check_ids_in_range(target.masked_fill(target == ignore_index, 0), vocab_size, "targets",
                       f"use ids of the real vocabulary, or ignore_index={ignore_index}")
    vocab_start = comm.group_rank(group) * weight.shape[0]
    return LinearCrossEntropyFunction.apply(
        hidden, weight, target, ignore_index, reduction, chunk_size, backend, vocab_start,
        vocab_size, _combine_over(group) if tp > 1 else None)
