"""What one transformer layer saves for backward: predicted, counted, and Korthikanti's.

``saved_activation_bytes(cfg, micro_batch, seq, tp, sequence_parallel, recompute)`` predicts
the bytes one of *our* layers (``models.block.Block``, torch reference kernels) holds between
its forward and its backward, tensor by tensor (symbols: b micro-batch, s sequence, h
d_model, a heads, g kv heads, d head dim, f d_ff, t tp; e bytes per activation element):

=====================================  ========================  ===========================
tensor (who saves it)                  none                      kept by
=====================================  ========================  ===========================
layer input x (norm)                   e sbh / t_sp              all modes (full: only this)
norm stats: rmsnorm normalized x +     (e sbh + 4 sb) / t_sp     none
  rstd; layernorm mean + rstd          8 sb / t_sp
norm output (qkv / up linear)          e sbh     (no SP)         none, selective
  with SP: the all-gathered output     e sbh
qkv output (v is a view of it)         e sb(a+2g)d / t           none, selective
q, k after RoPE (attention)            e sb(a+g)d / t            none
logsumexp (attention)                  4 bas / t                 none
attention output o (proj linear)       e sbh / t                 none, selective
dropout masks (2, if dropout > 0)      2 sbh / t_sp x            none, selective
                                       (1 B CUDA, e B CPU)
residual after attention (norm)        e sbh / t_sp              none, selective
SwiGLU: gate|up, output               e 3 sbf / t               none, selective
GELU: input, output                    e 2 sbf / t               none, selective
=====================================  ========================  ===========================

(t_sp = t with sequence parallelism, else 1; the second norm repeats the first's rows.)
With the Triton kernels (GPU): RMSNorm keeps no normalized x, and the
attention output is saved twice ([b, a, s, d] by the kernel, [b, s, h] by proj) in none.
No [b, a, s, s] term: ``F.scaled_dot_product_attention`` (the torch reference attention)
runs a fused flash-style kernel on CPU and GPU, saving o and the logsumexp, and so does the
Triton kernel. This is where we differ from Korthikanti et al. (arXiv 2205.05198), whose
layer (GPT-2 style, unfused softmax, attention dropout, 16-bit) saves
``sbh(34 + 5as/h)`` bytes; ``korthikanti_bytes`` gives their formulas for comparison.

``count_saved_bytes(fn, *args)`` measures the same quantity: it runs ``fn`` under
saved-tensor hooks and sums the distinct storages saved (plus what recompute regions keep),
leaving out parameters and buffers.
"""
from __future__ import annotations

import torch

from megalite.kernels.attention import HEAD_DIMS as ATTENTION_HEAD_DIMS
from megalite.models.config import RECOMPUTE_MODES, GPTConfig
from megalite.models.recompute import observe_kept_inputs

STAT_BYTES = 4  # norm statistics and the attention logsumexp are fp32


def saved_activation_bytes(cfg: GPTConfig, micro_batch: int, seq: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none",
                           act_bytes: int = 4, device_type: str = "cpu",
                           kernels: str = "torch") -> int:
    """Bytes one layer saves for backward, for one microbatch on one TP rank.

    ``act_bytes`` is the size of an activation element: 4 for fp32, where the prediction is
    exact (tests); 2 gives the same tensors at 16 bits, an estimate (the torch references
    upcast inside norms, RoPE and SwiGLU and save some fp32 copies; the Triton kernels save
    less in the norms and RoPE; under ``torch.autocast`` the residual stream stays fp32 and
    16-bit casts of matmul inputs are saved). ``device_type`` matters for dropout masks
    only: CUDA's fused dropout saves a bool mask, CPU's a float one. ``kernels`` is the
    path that runs: "torch" (the references: CPU, or ``cfg.kernels="torch"``) or "triton"
    (GPU with ``cfg.kernels`` "auto"/"triton"): the Triton RMSNorm keeps no normalized
    copy, and the attention output is copied once more to [b, s, h]. (SwiGLU runs on the
    packed [gate | up] projection in both paths and saves no silu(gate).)"""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; choose one of {RECOMPUTE_MODES}")
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels={kernels!r}; choose 'torch' or 'triton'")
    triton = kernels == "triton"
    b, s, h, t, e = micro_batch, seq, cfg.d_model, tp, act_bytes
    a, g, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    sp = sequence_parallel and tp > 1
    rows = b * s // (t if sp else 1)          # tokens this rank holds outside TP regions
    residual = e * rows * h                   # one [rows, h] tensor
    if recompute == "full":
        return residual
    selective = recompute == "selective"

    def norm() -> int:
        held = residual                                       # its input
        if not selective:
            if cfg.norm == "rmsnorm":  # rstd (and the torch reference's normalized x)
                held += STAT_BYTES * rows + (0 if triton else residual)
            else:                      # mean and rstd
                held += 2 * STAT_BYTES * rows
        return held + e * b * s * h                           # the (gathered) output

    qkv = e * b * s * (a + 2 * g) * d // t
    o = e * b * s * a * d // t  # the attention output, laid out [b, s, a, d]: proj's input too
    attention = qkv + o
    if not selective:
        attention += STAT_BYTES * b * a * s // t              # logsumexp
        if triton and cfg.head_dim in ATTENTION_HEAD_DIMS:    # o [b, a, s, d] and proj's copy
            attention += o
        if cfg.position == "rope":
            attention += e * b * s * (a + g) * d // t         # rotated q and k
        if cfg.qk_norm:                                       # normalized q, k and their rstd
            attention += (e * d + STAT_BYTES) * b * s * (a + g) // t
        if cfg.sliding_window is not None and not triton:     # SDPA's additive window mask
            attention += e * s * s
    if cfg.activation == "swiglu":  # swiglu_packed: gate|up and the output, no silu(gate)
        mlp = e * b * s * f * 3 // t
    else:
        mlp = e * b * s * f * 2 // t
    mask = e if device_type == "cpu" else 1  # CPU's dropout saves its scaled float mask
    masks = 2 * mask * rows * h if cfg.dropout > 0 else 0
    return 2 * norm() + attention + mlp + masks


def stage_saved_bytes(cfg: GPTConfig, num_layers: int, micro_batch: int, seq: int,
                      tp: int = 1, sequence_parallel: bool = False, **kwargs) -> int:
    """Bytes the ``num_layers`` layers of one pipeline stage save for one microbatch, with
    ``cfg.recompute`` and ``cfg.recompute_layers`` as GPT applies them (full recompute of
    the first ``recompute_layers`` layers, the others none). Embeddings, final norm, head
    and loss are not included. ``kwargs``: ``act_bytes``, ``device_type``, ``kernels``."""
    def layer(mode):
        return saved_activation_bytes(cfg, micro_batch, seq, tp, sequence_parallel, mode,
                                      **kwargs)
    n = num_layers if cfg.recompute_layers is None else min(cfg.recompute_layers, num_layers)
    return n * layer(cfg.recompute) + (num_layers - n) * layer("none")


def embedding_saved_bytes(micro_batch: int, seq: int) -> int:
    """Bytes the first stage's vocab-parallel lookup saves for one microbatch: the (masked)
    int64 token ids and the bool out-of-shard mask."""
    return micro_batch * seq * (8 + 1)


def final_norm_saved_bytes(cfg: GPTConfig, micro_batch: int, seq: int, tp: int = 1,
                           sequence_parallel: bool = False, kernels: str = "torch") -> int:
    """Bytes the last stage's final norm saves for one microbatch: its fp32 input and
    statistics (and the torch reference RMSNorm's normalized rows); freed by its backward,
    before the layers' backward runs."""
    rows = micro_batch * seq // (tp if sequence_parallel and tp > 1 else 1)
    held = 4 * rows * cfg.d_model
    if cfg.norm == "rmsnorm":
        return held + STAT_BYTES * rows + (0 if kernels == "triton" else 4 * rows * cfg.d_model)
    return held + 2 * STAT_BYTES * rows


def head_saved_bytes(cfg: GPTConfig, micro_batch: int, seq: int, tp: int = 1,
                     sequence_parallel: bool = False, fused_loss: bool | None = None,
                     padded_vocab: int | None = None, act_bytes: int = 4,
                     kernels: str = "torch") -> int:
    """Bytes the last stage's final norm, output head and loss keep for one microbatch on
    one TP rank, until that microbatch's backward.

    ``fused_loss`` (default ``cfg.fused_loss``): the head and cross-entropy run as one op
    (``parallel.vocab_parallel_linear_cross_entropy``) whose forward already computes the
    gradients: it keeps ``dx`` [b*s, h] (the gathered tokens, in the hidden states' dtype:
    fp32, since the residual stream is fp32) and an fp32 ``dW`` [V_padded/t, h], and no
    logits. Unfused: the head saves its (gathered) input, the cross-entropy the logits
    [b*s, V_padded/t] (its backward overwrites them with their gradient, no second buffer),
    the masked int64 targets and the fp32 log-sum-exp. Both keep what the final norm saves
    (as :func:`saved_activation_bytes`'s norms: input, rstd, the torch reference's
    normalized rows). ``padded_vocab``: the vocabulary padded for ``tp`` (default
    ``vocab_size``)."""
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels={kernels!r}; choose 'torch' or 'triton'")
    fused = cfg.fused_loss if fused_loss is None else fused_loss
    b, s, h, t = micro_batch, seq, cfg.d_model, tp
    vocab = (padded_vocab or cfg.vocab_size) // t
    tokens = b * s                                    # gathered over the sequence under SP
    held = final_norm_saved_bytes(cfg, micro_batch, seq, tp, sequence_parallel, kernels)
    if fused:
        return held + 4 * tokens * h + 4 * vocab * h  # dx and the fp32 dW
    return held + act_bytes * tokens * h + act_bytes * tokens * vocab + tokens * (8 + 4)


def korthikanti_bytes(cfg: GPTConfig, micro_batch: int, seq: int, tp: int = 1,
                      sequence_parallel: bool = False, recompute: str = "none") -> int:
    """Korthikanti et al.'s activation bytes per layer (16-bit, their GPT layer, Table 2):
    none ``sbh(10 + 24/t + 5as/(ht))``, with sequence parallelism ``sbh(34/t + 5as/(ht))``
    (t = 1: ``sbh(34 + 5as/h)``); selective drops the ``5as/(ht)`` term; full keeps the
    layer input, ``2sbh`` (``2sbh/t`` with sequence parallelism)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; choose one of {RECOMPUTE_MODES}")
    s, b, h, a, t = seq, micro_batch, cfg.d_model, cfg.n_heads, tp
    sbh = s * b * h
    sp = sequence_parallel and tp > 1
    if recompute == "full":
        return 2 * sbh // (t if sp else 1)
    base = 34 * sbh / t if sp else sbh * (10 + 24 / t)
    quadratic = 0 if recompute == "selective" else 5 * a * s * s * b / t
    return round(base + quadratic)


def count_saved_bytes(fn, *args, exclude=()):
    """``(fn(*args), bytes)``: the distinct storages autograd saves for backward while
    ``fn`` runs, plus the inputs recompute regions keep, leaving out the storages of
    ``exclude`` (pass the parameters and buffers: they are not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}  # data_ptr -> storage; holding it keeps the address from being reused

    def note(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage
        return t

    def kept(tensors):
        for t in tensors:
            note(t)

    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t), \
            observe_kept_inputs(kept):
        out = fn(*args)
    return out, sum(st.nbytes() for st in storages.values())
