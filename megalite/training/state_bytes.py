"""Bytes per parameter of a rank's training state, measured on its real tensors.

:func:`measure` counts what this rank holds for ``model`` trained by ``optimizer``: the
parameters themselves, the main-gradient buffers (padding included), the fp32 main weights
the optimizer keeps of 16-bit parameters, and the optimizer's state tensors (AdamW's two
moments). :func:`megatron_bytes_per_param` is Megatron-Core's published table (its
distributed-optimizer docs) for the same mode, the figure to set it beside.
``examples/bytes_per_param.py`` prints both for the layouts of a world; a new mode (FSDP)
adds a row there by building its model and optimizer, and may add a ``measure`` term here.
"""
from __future__ import annotations

import torch

from megalite.parallel.distributed_optimizer import MainParamOptimizer


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(model, optimizer) -> dict:
    """{"params": this rank's parameter count, "weights", "grads", "main_weights",
    "optimizer_state", "total": bytes} on this rank (``model.main_grads`` must exist:
    after a step, or after building the optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    main_grads = getattr(model, "main_grads", None)
    grads = main_grads.nbytes() if main_grads is not None else \
        sum(_bytes(p.grad) for p in params if p.grad is not None)
    mains, inner = 0, optimizer
    if isinstance(optimizer, MainParamOptimizer):
        inner = optimizer.optimizer
        mains = sum(_bytes(main) for p, main, _, _ in optimizer._shards.values()
                    if p.dtype != torch.float32)  # fp32 mains alias the parameter
    state = sum(_bytes(v) for st in inner.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim())
    row = {"params": n, "weights": sum(_bytes(p) for p in params), "grads": grads,
           "main_weights": mains, "optimizer_state": state}
    row["total"] = row["weights"] + grads + mains + state
    return row


def megatron_bytes_per_param(params_dtype: str, distributed: bool, dp: int) -> float:
    """Megatron-Core's table (docs: distributed optimizer), AdamW, fp32 gradients for bf16:
    fp32 16 / 8 + 8/d, bf16 18 / 6 + 12/d, fp16 (fp16 gradients) 20 / 4 + 16/d."""
    if params_dtype == "fp32":
        return 8 + 8 / dp if distributed else 16.0
    if params_dtype == "bf16":
        return 6 + 12 / dp if distributed else 18.0
    return 4 + 16 / dp if distributed else 20.0


def expected_bytes_per_param(model, distributed: bool, dp: int) -> float:
    """megalite's formula for ``model``'s actual parameter dtypes, without bucket padding:
    per parameter its own bytes + 4 (fp32 main gradient) + (4 main weight if 16-bit + 8
    moments) / (dp if distributed else 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    shard = dp if distributed else 1
    total = sum(p.numel() * (p.element_size() + 4 +
                             ((4 if p.dtype != torch.float32 else 0) + 8) / shard)
                for p in params)
    return total / sum(p.numel() for p in params)
