"""AdamW with the usual no-decay groups, and warmup + cosine/linear learning-rate decay.

Each rank's optimizer sees only its own shards; AdamW is elementwise, so sharded states
update exactly as the full ones would (the global grad-norm clip happens before the step).
"""
from __future__ import annotations

import math

import torch

from megalite.training.step import distributed_optimizer, main_param_optimizer


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


_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def fused_supported(params) -> bool:
    """Whether torch's single-kernel AdamW (``fused=True``) runs these parameters: floating
    dtypes, on one device type that torch ships the fused kernel for (CUDA, and the CPU
    since torch 2.4)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices
    params = list(params)
    devices = {p.device.type for p in params}
    return (len(devices) <= 1 and devices <= set(_get_fused_kernels_supported_devices())
            and all(p.dtype in _FUSED_DTYPES for p in params))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas=(0.9, 0.95), eps: float = 1e-8, decay_embeddings: bool = False,
                    distributed: bool = False, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over ``model``'s decay / no-decay groups. ``distributed=True`` shards its state
    over the data-parallel group (ZeRO-1, :func:`megalite.training.step.distributed_optimizer`).
    A trainable model with 16-bit parameters (``GPTConfig(params_dtype="bf16")``) gets one
    over fp32 main weights (:class:`megalite.parallel.MainParamOptimizer`; the distributed
    one shards them too).
    ``fused=None`` (default) uses torch's fused kernel (one launch per step for all
    parameters) where it supports the parameters' device and dtype, else the ``foreach``
    (multi-tensor) path; ``True`` insists on the fused kernel; ``False`` is torch's default
    implementation."""
    groups = param_groups(model, weight_decay, decay_embeddings)
    params = [p for g in groups for p in g["params"]]
    supported = fused_supported(params)
    if fused and not supported:
        raise ValueError(f"fused AdamW is not available for parameters on "
                         f"{sorted({p.device.type for p in params})} with dtypes "
                         f"{sorted({str(p.dtype) for p in params})}; pass fused=None to fall "
                         f"back to the foreach implementation")
    if fused is None:
        kind = {"fused": True} if supported else {"foreach": True}
    else:
        kind = {"fused": True} if fused else {}
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)
    if distributed:
        return distributed_optimizer(optimizer, model)
    if hasattr(model, "stages") and any(p.dtype != torch.float32 for p in params):
        # a trainable model (train_step) with 16-bit weights: fp32 main weights
        return main_param_optimizer(optimizer, model)
    return optimizer


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
