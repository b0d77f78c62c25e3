"""One transformer layer: pre-norm attention and MLP (dense, or a mixture of experts), each
added to the residual stream after dropout; and its activation recomputation."""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch.nn as nn
import torch.nn.functional as F

from megalite import kernels
from megalite.models.attention import Attention
from megalite.models.config import RECOMPUTE_MODES, GPTConfig
from megalite.models.moe import MoE, MoEStats
from megalite.models.norm import Norm
from megalite.models.recompute import checkpoint
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.random import get_rng_tracker
from megalite.parallel.state import ParallelState

if TYPE_CHECKING:
    from megalite.models.gpt import _Init



def _tp_fork(active: bool):
    """Dropout on a tensor that differs across TP ranks draws from the TP stream."""
    tracker = get_rng_tracker()
    if active and "tensor-parallel" in tracker.states:
        return tracker.fork()
    return contextlib.nullcontext()


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, ps: ParallelState, init: _Init, prefix: str):
        super().__init__()
        self.activation, self.backend = cfg.activation, cfg.kernels
        sp, f = cfg.sequence_parallel, cfg.d_ff
        sizes = [f, f] if cfg.activation == "swiglu" else [f]
        self.up = ColumnParallelLinear(
            cfg.d_model, sum(sizes), bias=cfg.bias, partition_sizes=sizes, sequence_parallel=sp,
            init_method=init.normal(prefix + "up.weight", cfg.init_std),
            master_init=cfg.master_init, state=ps)
        self.down = RowParallelLinear(
            f, cfg.d_model, bias=cfg.bias, sequence_parallel=sp,
            init_method=init.normal(prefix + "down.weight", cfg.init_std / math.sqrt(2 * cfg.n_layers)),
            master_init=cfg.master_init, state=ps)
        self.selective_recompute = False  # set by Block.set_recompute

    def forward(self, x):
        h = self.up(x)
        if self.selective_recompute:
            return self.down(checkpoint(self._activate, h))
        return self.down(self._activate(h))

    def _activate(self, h):
        if self.activation == "swiglu":  # h = [gate | up]: one buffer, one gradient
            return kernels.swiglu_packed(h, backend=self.backend)
        return F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ps: ParallelState, init: _Init, index: int,
                 moe_stats: MoEStats | None = None):
        super().__init__()
        prefix = f"layers.{index}."
        self.attn_norm = Norm(cfg, ps)
        self.attn = Attention(cfg, ps, init, prefix + "attn.")
        self.mlp_norm = Norm(cfg, ps)
        if cfg.is_moe_layer(index):
            shared = MLP(cfg.replace(d_ff=cfg.moe_shared_d_ff), ps, init,
                         prefix + "mlp.shared.") if cfg.moe_shared_d_ff else None
            self.mlp = MoE(cfg, ps, init, prefix + "mlp.", shared, moe_stats, index)
        else:
            self.mlp = MLP(cfg, ps, init, prefix + "mlp.")
        self.dropout, self.sequence_parallel = cfg.dropout, cfg.sequence_parallel
        self.recompute = "none"

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation of this layer. "full": keep only the layer's input and
        recompute the whole layer in backward; "selective": recompute the cheap,
        memory-heavy parts (the norms, RoPE + attention core, the MLP activation) and keep
        the matmul inputs; "none" (docs/memory.md)."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
        self.recompute = mode
        for part in (self.attn_norm, self.attn, self.mlp_norm, self.mlp):
            part.selective_recompute = mode == "selective"

    def _drop(self, x):
        if not self.training or self.dropout == 0.0:
            return x
        with _tp_fork(self.sequence_parallel):
            return F.dropout(x, self.dropout, training=True)

    def forward(self, x, rope=None):
        if self.recompute == "full":
            return checkpoint(self._layer, x, rope)
        return self._layer(x, rope)

    def _layer(self, x, rope):
        x = x + self._drop(self.attn(self.attn_norm(x), rope))
        return x + self._drop(self.mlp(self.mlp_norm(x)))
