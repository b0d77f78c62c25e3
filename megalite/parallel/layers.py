"""Tensor-parallel layers: column- and row-parallel linears and a vocab-parallel embedding.

Initialization is layout invariant by default: each layer fills the *full* master weight
(on CPU, in fp32, from the caller's RNG) and keeps this rank's slice, so the gathered weights
are the tp=1 weights. ``master_init=False`` fills only the local shard (a different one on
each TP rank), for models too large for a full master tensor.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import comm
from megalite.parallel.param_meta import set_param_meta
from megalite.parallel.state import ParallelState, get_state

InitMethod = Callable[[torch.Tensor], object]


def default_init(fan_in: int) -> InitMethod:
    """nn.Linear's weight distribution: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda w: nn.init.uniform_(w, -bound, bound)


def shard_segments(full: torch.Tensor, sizes: Sequence[int], dim: int, tp: int,
                   rank: int) -> torch.Tensor:
    """Rank's part of ``full``: each segment of ``sizes`` along ``dim`` is split in ``tp``."""
    segments = full.split(list(sizes), dim=dim)
    return torch.cat([seg.chunk(tp, dim=dim)[rank] for seg in segments], dim=dim)


def set_tp_layout(param: nn.Parameter, dim: int, sizes: Sequence[int],
                  real_size: int | None = None) -> None:
    """Record how the full tensor maps to shards: along ``dim`` each segment of ``sizes`` is
    split across TP ranks; ``real_size`` (vocab tables) is the unpadded length of ``dim``.
    :mod:`megalite.parallel.sharding` uses it to gather or re-shard any parameter. It lives in
    :mod:`megalite.parallel.param_meta` (read it with ``param_meta(param)``)."""
    set_param_meta(param, tp_dim=dim, tp_sizes=list(sizes), tp_real_size=real_size)


def check_ids_in_range(ids: torch.Tensor, high: int, what: str, fix: str) -> None:
    """Out-of-range ids would be masked to zero by the vocab-parallel ops, a silent wrong
    answer. On CPU raise a ValueError; on GPU assert on the device, so the check costs no
    host synchronization (a bad id aborts the kernel stream with a device-side assert)."""
    if not ids.numel():
        return
    if ids.device.type == "cpu":
        low, top = int(ids.min()), int(ids.max())
        if low < 0 or top >= high:
            raise ValueError(f"{what} must lie in [0, {high}); got range [{low}, {top}]: {fix}")
    else:
        torch._assert_async(((ids >= 0) & (ids < high)).all(),
                            f"{what} must lie in [0, {high}): {fix}")


def _make_param(shape_full, sizes, split_dim, ps: ParallelState, init_method: InitMethod,
                master_init: bool, device, dtype) -> nn.Parameter:
    """Build this rank's shard of a ``shape_full`` weight split along ``split_dim``."""
    device = torch.device(device) if device is not None else ps.device
    dtype = dtype or torch.get_default_dtype()
    sizes = sizes if split_dim == 0 else [shape_full[1]]
    if master_init:
        full = torch.empty(shape_full, dtype=torch.float32)
        init_method(full)
        local = shard_segments(full, sizes, split_dim, ps.tp, ps.tp_rank)
    else:
        local_shape = list(shape_full)
        local_shape[split_dim] //= ps.tp
        local = torch.empty(local_shape, dtype=torch.float32)
        # A per-layer seed from the shared stream, offset by TP rank: every rank fills a
        # different shard, reproducibly, on CPU whatever the device.
        seed = int(torch.randint(0, 2**62, ()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + ps.tp_rank)
            init_method(local)
    param = nn.Parameter(local.to(device=device, dtype=dtype).contiguous())
    set_tp_layout(param, split_dim, sizes)
    return param


def _check_divisible(name: str, size: int, tp: int) -> None:
    if size % tp:
        raise ValueError(f"{name}={size} is not divisible by tp={tp}; choose sizes that are "
                         f"multiples of the tensor-parallel size")


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by rows (output features) across TP ranks.

    The input is replicated (or, with ``sequence_parallel``, sharded along the sequence and
    all-gathered here); the output is this rank's slice of features, or the whole output with
    ``gather_output``. ``create_weight=False`` makes a layer whose weight is passed to
    ``forward`` (tied output embeddings). ``partition_sizes`` fuses several linears (e.g.
    q, k, v) into one: each segment is split across ranks separately, so rank r holds [q_r; k_r; v_r].
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, *, sequence_parallel: bool = False,
                 skip_bias_add: bool = False, partition_sizes: Sequence[int] | None = None,
                 init_method: InitMethod | None = None, master_init: bool = True,
                 create_weight: bool = True, state: ParallelState | None = None,
                 device=None, dtype=None):
        super().__init__()
        ps = state or get_state()
        sizes = list(partition_sizes) if partition_sizes else [out_features]
        if sum(sizes) != out_features:
            raise ValueError(f"partition_sizes {sizes} must sum to out_features={out_features}")
        for size in sizes:
            _check_divisible("out_features" if len(sizes) == 1 else "partition size", size, ps.tp)
        if gather_output and len(sizes) > 1:
            raise ValueError("gather_output would interleave the fused segments; "
                             "gather each segment yourself or drop partition_sizes")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output=True cannot be combined with sequence_parallel")
        self.in_features, self.out_features = in_features, out_features
        self.partition_sizes = [s // ps.tp for s in sizes]
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.skip_bias_add, self.group = skip_bias_add, ps.tp_group
        init = init_method or default_init(in_features)
        if create_weight:
            self.weight = _make_param((out_features, in_features), sizes, 0, ps, init,
                                      master_init, device, dtype)
        else:  # the caller passes the weight to forward (tied output embeddings)
            self.register_parameter("weight", None)
        if bias:
            self.bias = _make_param((out_features,), sizes, 0, ps, nn.init.zeros_,
                                    master_init, device, dtype)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        """``weight`` overrides the layer's own (tied output embeddings pass theirs)."""
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError("this ColumnParallelLinear was built with create_weight=False: "
                             "pass the weight to forward")
        if self.sequence_parallel:
            x = comm.gather_from_sequence_parallel_region(x, self.group)
        else:
            x = comm.copy_to_tp_region(x, self.group)
        y = F.linear(x, weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            y = comm.gather_from_tp_region(y, self.group)
        return (y, self.bias) if self.skip_bias_add else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} "
                f"(local {sum(self.partition_sizes)}), sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by columns (input features) across TP ranks.

    Each rank multiplies its input slice, the partial outputs are all-reduced (or, with
    ``sequence_parallel``, reduce-scattered along the sequence), then the whole bias is added
    once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, *, sequence_parallel: bool = False,
                 skip_bias_add: bool = False, init_method: InitMethod | None = None,
                 master_init: bool = True, state: ParallelState | None = None,
                 device=None, dtype=None):
        super().__init__()
        ps = state or get_state()
        _check_divisible("in_features", in_features, ps.tp)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True (the input of a "
                             "row-parallel layer is already split by features)")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.skip_bias_add, self.group = skip_bias_add, ps.tp_group
        init = init_method or default_init(in_features)
        self.weight = _make_param((out_features, in_features), None, 1, ps, init,
                                  master_init, device, dtype)
        if bias:
            device = torch.device(device) if device is not None else ps.device
            self.bias = nn.Parameter(torch.zeros(out_features, device=device,
                                                 dtype=dtype or torch.get_default_dtype()))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = comm.scatter_to_tp_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = comm.reduce_from_tp_region(y, self.group, inplace=True)
        bias = self.bias
        if bias is not None and self.sequence_parallel:
            # Each rank saw only its tokens: sum the bias gradient over the TP group.
            bias = comm.copy_to_tp_region(bias, self.group)
        if self.skip_bias_add:
            return y, bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, sequence_parallel={self.sequence_parallel}")


def init_rows(init: InitMethod, rows: int) -> InitMethod:
    """Initialize the first ``rows`` rows with ``init`` and zero the rest (vocab padding)."""
    def fill(table):
        init(table[:rows])
        table[rows:].zero_()
    return fill


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Smallest size >= vocab_size divisible by ``tp * multiple``."""
    unit = tp * multiple
    return (vocab_size + unit - 1) // unit * unit


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary) across TP ranks.

    The table is padded to a multiple of tp (``pad_to_multiple`` more, for aligned shards);
    rank r holds rows [r*Vp/tp, (r+1)*Vp/tp) of the padded table, and the first
    ``num_embeddings`` rows of the gathered table are the real vocabulary (padding rows are
    zero and never looked up). Each rank looks up the tokens it owns; the partial results are
    all-reduced, or reduce-scattered along the sequence with ``sequence_parallel``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 sequence_parallel: bool = False, pad_to_multiple: int = 1,
                 init_method: InitMethod | None = None, master_init: bool = True,
                 state: ParallelState | None = None, device=None, dtype=None):
        super().__init__()
        ps = state or get_state()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_size = padded_vocab_size(num_embeddings, ps.tp, pad_to_multiple)
        self.rows_per_rank = self.padded_size // ps.tp
        self.vocab_start = ps.tp_rank * self.rows_per_rank
        self.sequence_parallel, self.group = sequence_parallel, ps.tp_group
        init = init_method or nn.init.normal_
        self.weight = _make_param((self.padded_size, embedding_dim), [self.padded_size], 0, ps,
                                  init_rows(init, num_embeddings) if master_init else init,
                                  master_init, device, dtype)
        set_tp_layout(self.weight, 0, [self.padded_size], real_size=num_embeddings)
        if not master_init:  # the local shard may hold padding rows: keep them zero
            with torch.no_grad():
                self.weight[max(0, num_embeddings - self.vocab_start):].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_ids_in_range(tokens, self.num_embeddings, "token ids",
                           "check the tokenizer against the model's vocab_size")
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return comm.reduce_from_tp_region(out, self.group, inplace=True)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (padded {self.padded_size}, local rows "
                f"[{self.vocab_start}, {self.vocab_start + self.rows_per_rank})), "
                f"{self.embedding_dim}")
