"""Cross-entropy over logits split by vocabulary across TP ranks.

The full ``[tokens, vocab]`` logits are never gathered. Each rank computes, over its own
columns, a logsumexp, the logit at the target (if it owns the target) and, for label
smoothing, the sum of its logits. One all-gather of the per-rank logsumexps gives the global
logsumexp; one all-reduce sums the target logits (and logit sums). The backward pass needs
no communication: ``softmax - onehot`` on the local columns. The math is fp32 whatever the
logits' dtype. Columns at or beyond ``vocab_size`` (vocabulary padding) are masked out.
"""
from __future__ import annotations

import torch

from megalite.parallel import comm
from megalite.parallel.state import ParallelState, get_state


def _shard_stats(x: torch.Tensor, target: torch.Tensor, col_start: int, valid_cols: int,
                 with_sum: bool):
    """Per-row (local logsumexp, target logit or 0, sum of valid logits) of an fp32 shard."""
    xv = x[:, :valid_cols].float()
    if valid_cols > 0:
        lse = torch.logsumexp(xv, dim=-1)
    else:
        lse = torch.full(x.shape[:1], float("-inf"), device=x.device)
    local_t = target - col_start
    owned = (local_t >= 0) & (local_t < valid_cols)
    picked = x.gather(1, local_t.clamp(0, max(x.shape[1] - 1, 0)).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(owned, picked.float(), torch.zeros_like(lse))
    logit_sum = xv.sum(-1) if with_sum else None
    return lse, target_logit, logit_sum


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, ignore_index, label_smoothing, group):
        local_vocab = logits.shape[-1]
        col_start = comm.group_rank(group) * local_vocab
        valid_cols = max(0, min(local_vocab, vocab_size - col_start))
        x = logits.reshape(-1, local_vocab)
        t = target.reshape(-1)
        ignored = t == ignore_index
        smoothing = label_smoothing > 0
        lse_local, target_logit, logit_sum = _shard_stats(x, t, col_start, valid_cols, smoothing)

        all_lse = comm.all_gather(lse_local.unsqueeze(0), group, dim=0)
        lse = torch.logsumexp(all_lse, dim=0)
        sums = torch.stack([target_logit] + ([logit_sum] if smoothing else []))
        sums = comm.all_reduce(sums, group)
        loss = lse - sums[0]
        if smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sums[1] / vocab_size)
        loss = loss.masked_fill(ignored, 0.0)

        ctx.save_for_backward(logits, t, lse, ignored)
        ctx.col_start, ctx.valid_cols = col_start, valid_cols
        ctx.vocab_size, ctx.label_smoothing = vocab_size, label_smoothing
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, t, lse, ignored = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1]).float()
        grad = torch.exp(x - lse.unsqueeze(1))
        grad[:, ctx.valid_cols:] = 0.0
        eps = ctx.label_smoothing
        if eps > 0:
            grad[:, :ctx.valid_cols] -= eps / ctx.vocab_size
        local_t = t - ctx.col_start
        owned = (local_t >= 0) & (local_t < ctx.valid_cols) & ~ignored
        rows = owned.nonzero().squeeze(1)
        grad[rows, local_t[rows]] -= 1.0 - eps
        scale = grad_loss.reshape(-1).float().masked_fill(ignored, 0.0)
        grad *= scale.unsqueeze(1)
        return grad.to(logits.dtype).view_as(logits), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, *,
                                 state: ParallelState | None = None) -> torch.Tensor:
    """Per-token fp32 loss from this rank's vocab shard of the logits.

    logits: ``[..., V_padded / tp]``; target: ``[...]`` global token ids. Returns a loss
    shaped like ``target`` (0 where ``target == ignore_index``). ``vocab_size`` (default: all
    columns) masks the padding columns out of the softmax. The vocabulary is split over the
    TP group of ``state`` (default: the current state).
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
    real = target[target != ignore_index]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal ignore_index="
                         f"{ignore_index}; got range [{int(real.min())}, {int(real.max())}]")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, ignore_index,
                                            label_smoothing, group)
