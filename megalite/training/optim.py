"""AdamW with the usual no-decay groups, and warmup + cosine/linear learning-rate decay.

Each rank's optimizer sees only its own shards; AdamW is elementwise, so sharded states
update exactly as the full ones would (the global grad-norm clip happens before the step).
"""
from __future__ import annotations

import math

import torch

from megalite.training.step import distributed_optimizer


def param_groups(model: torch.nn.Module, weight_decay: float,
                 decay_embeddings: bool = False) -> list[dict]:
    """Decay matrices only: not norms, biases (1-D) or embedding tables unless asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.startswith(("embed.", "pos_embed"))
        if p.dim() < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas=(0.9, 0.95), eps: float = 1e-8, decay_embeddings: bool = False,
                    distributed: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``model``'s decay / no-decay groups. ``distributed=True`` shards its state
    over the data-parallel group (ZeRO-1, :func:`megalite.training.step.distributed_optimizer`)."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, decay_embeddings), lr=lr,
                                  betas=betas, eps=eps)
    return distributed_optimizer(optimizer, model) if distributed else optimizer


def lr_lambda(warmup_steps: int, total_steps: int, decay: str = "cosine",
              min_ratio: float = 0.1):
    """Multiplier of the peak lr at a step: linear warmup, then cosine/linear to min_ratio."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr decay must be cosine, linear or constant, got {decay!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        if decay == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, decay: str = "cosine",
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps, total_steps, decay, min_ratio))
