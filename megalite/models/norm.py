"""The normalization layer: RMSNorm or LayerNorm through megalite.kernels, TP-aware."""
from __future__ import annotations

import torch
import torch.nn as nn

from megalite import kernels
from megalite.models.config import GPTConfig
from megalite.models.recompute import checkpoint
from megalite.parallel import comm
from megalite.parallel.state import ParallelState



class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim (``width``, default d_model), through
    megalite.kernels.

    The weight is replicated over the TP group. When the ranks normalize different rows
    (other tokens under sequence parallelism; other heads for the q/k norms, ``per_head``)
    its gradient is partial: ``copy_to_tp_region`` all-reduces it over the TP group.
    """

    def __init__(self, cfg: GPTConfig, ps: ParallelState, width: int | None = None,
                 per_head: bool = False):
        super().__init__()
        self.kind, self.eps, self.backend = cfg.norm, cfg.norm_eps, cfg.kernels
        self.group = ps.tp_group if cfg.sequence_parallel or per_head else None
        width = cfg.d_model if width is None else width
        self.weight = nn.Parameter(torch.ones(width, device=ps.device))
        self.bias = nn.Parameter(torch.zeros(width, device=ps.device)) \
            if cfg.norm == "layernorm" else None
        self.selective_recompute = False  # set by Block.set_recompute

    def forward(self, x):
        if self.selective_recompute:
            return checkpoint(self._normalize, x)
        return self._normalize(x)

    def _normalize(self, x):
        weight, bias = self.weight, self.bias
        if self.group is not None:
            weight = comm.copy_to_tp_region(weight, self.group)
            bias = None if bias is None else comm.copy_to_tp_region(bias, self.group)
        if self.kind == "rmsnorm":
            return kernels.rms_norm(x, weight, self.eps, backend=self.backend)
        return kernels.layer_norm(x, weight, bias, self.eps, backend=self.backend)
