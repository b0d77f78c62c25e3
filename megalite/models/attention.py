"""GPT attention: the fused qkv projection, q/k norms, RoPE, causal (optionally sliding
window) softmax attention, and its context-parallel path over the cp group.

``rope_tables`` builds the cos/sin tables GPT keeps once per stage; ``Attention`` reads them
at the positions of its tokens. Under context parallelism (cp > 1) the rank holds 2 of the
sequence's 2*cp chunks and the keys of the others arrive through
:func:`megalite.parallel.context.context_attention`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megalite import kernels
from megalite.models.config import GPTConfig
from megalite.models.norm import Norm
from megalite.models.recompute import checkpoint
from megalite.models.rope_scaling import attention_factor, inverse_frequencies
from megalite.parallel.context import check_context_parallel, context_attention
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalite.parallel.state import ParallelState

if TYPE_CHECKING:
    from megalite.models.gpt import _Init



def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                scaling: dict | None = None):
    """cos/sin tables [max_seq_len, head_dim] in the rotate-half (Llama) convention, with
    ``scaling`` (GPTConfig.rope_scaling) applied to the frequencies and, for YaRN, its
    attention factor to both tables."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    factor = attention_factor(scaling)
    return ((angles.cos() * factor).float().to(device),
            (angles.sin() * factor).float().to(device))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, ps: ParallelState, init: _Init, prefix: str):
        super().__init__()
        if cfg.n_heads % ps.tp or cfg.n_kv_heads % ps.tp:
            raise ValueError(f"n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads} must both "
                             f"be divisible by tp={ps.tp}; lower --tp or change the model")
        hd, sp = cfg.head_dim, cfg.sequence_parallel
        self.cfg, self.head_dim = cfg, hd
        self.local_heads, self.local_kv_heads = cfg.n_heads // ps.tp, cfg.n_kv_heads // ps.tp
        # Context parallelism: this rank holds 2 of the sequence's 2*cp chunks, attention
        # reaches the others' keys through the cp group (megalite.parallel.context).
        self.cp, self.cp_group = ps.cp, ps.cp_group
        check_context_parallel(None, ps.cp, cfg.cp_comm, cfg.n_heads, cfg.n_kv_heads, ps.tp)
        q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        self.qkv = ColumnParallelLinear(
            cfg.d_model, q + 2 * kv, bias=cfg.bias or cfg.qkv_bias, partition_sizes=[q, kv, kv],
            sequence_parallel=sp, init_method=init.normal(prefix + "qkv.weight", cfg.init_std),
            master_init=cfg.master_init, state=ps)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.proj = RowParallelLinear(
            q, cfg.d_model, bias=cfg.bias, sequence_parallel=sp,
            init_method=init.normal(prefix + "proj.weight", out_std),
            master_init=cfg.master_init, state=ps)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, ps, width=hd, per_head=True)
            self.k_norm = Norm(cfg, ps, width=hd, per_head=True)
        self.selective_recompute = False  # set by Block.set_recompute

    def forward(self, x, rope=None):
        qkv = self.qkv(x)  # [b, s, local q + 2 local kv] (full sequence)
        if self.cp > 1:
            out = self._context_parallel(qkv, rope)
        elif self.selective_recompute:
            out = checkpoint(self._core, qkv, rope)
        else:
            out = self._core(qkv, rope)
        return self.proj(out)

    def _context_parallel(self, qkv, rope):
        """Attention over the whole sequence of the cp group. Selective recompute
        recomputes the q/k norms and RoPE but not the attention: recomputing it would
        repeat the ring's communication, and it saves only q, k, v, the output and one
        log-sum-exp per row (no [s, s] scores) anyway."""
        if self.selective_recompute:
            q, k, v = checkpoint(self._heads, qkv, rope)
        else:
            q, k, v = self._heads(qkv, rope)
        out = context_attention(q, k, v, self.cp_group, window=self.cfg.sliding_window,
                                comm=self.cfg.cp_comm, backend=self.cfg.kernels)
        b, s = qkv.shape[:2]
        return out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)

    def _core(self, qkv, rope):
        """q/k norms, RoPE and softmax(q k^T) v, from the fused qkv projection to the input
        of proj."""
        q, k, v = self._heads(qkv, rope)
        b, s = qkv.shape[:2]
        out = kernels.attention(q, k, v, causal=True, window=self.cfg.sliding_window,
                                backend=self.cfg.kernels)
        return out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)

    def _heads(self, qkv, rope):
        """q, k, v [b, heads, s, head_dim] from the fused projection: split, q/k norms,
        RoPE (``rope`` tables already at these tokens' positions)."""
        b, s = qkv.shape[:2]
        hd = self.head_dim
        q, k, v = qkv.split([self.local_heads * hd, self.local_kv_heads * hd,
                             self.local_kv_heads * hd], dim=-1)
        q = q.view(b, s, self.local_heads, hd).transpose(1, 2)
        k = k.view(b, s, self.local_kv_heads, hd).transpose(1, 2)
        v = v.view(b, s, self.local_kv_heads, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm._normalize(q), self.k_norm._normalize(k)
        if rope is not None:
            cos, sin = rope[0][:s], rope[1][:s]
            q = kernels.apply_rope(q, cos, sin, backend=self.cfg.kernels)
            k = kernels.apply_rope(k, cos, sin, backend=self.cfg.kernels)
        return q, k, v
