"""Flash-style fused attention, forward and backward: softmax(q k^T * scale) v.

q is [b, h, sq, d]; k and v are [b, h_kv, sk, d] with h % h_kv == 0 (grouped-query
attention: query head i reads kv head i // (h / h_kv)). Causal masking follows
``scaled_dot_product_attention(is_causal=True)``: query i sees keys j <= i (top-left
aligned; with sq == sk, as in training, this is the usual causal mask). A sliding
``window`` (causal only; Mistral's, as Hugging Face masks it) narrows that to
i - window < j <= i: each query sees at most ``window`` keys, itself included.

What is fused and why (FlashAttention-2's algorithm): the [sq, sk] score matrix is never
stored. Each program owns a block of queries and streams key/value blocks through an online
softmax (running max m, running sum l, rescaled accumulator), so memory is O(s * d) and
q, k, v are read from HBM about once. The forward saves only the output and one number per
query row, lse = m + log(l) (kept in base 2, since the kernels use exp2 with log2(e) folded
into the scale). The backward recomputes the probabilities block by block from lse:
  * delta_i = sum_d dO_i * O_i                          (a tiny torch reduction)
  * dK/dV: one program per key block loops over the query blocks of every query head that
    shares its kv head, so grouped-query gradients are summed in registers (no atomics,
    no [b, h, sk, d] temporaries):   dV += P^T dO,  dS = P * (dO V^T - delta),  dK += dS^T Q
  * dQ: one program per query block loops over the key blocks:  dQ += dS K
Causal programs skip the blocks that are entirely masked, halving the work; with a window
they also skip the blocks entirely outside it (the loops' bounds, not only the masks), so
the work grows as seq * window, not seq^2.
"""
import math

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, cdiv, dot_precision, jit, tl, triton, use_triton

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def attention_reference(q, k, v, causal=True, scale=None, window=None):
    gqa = k.shape[1] != q.shape[1]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(
        q.shape[2], k.shape[2], window, q.device), scale=scale, enable_gqa=gqa)


def window_mask(sq: int, sk: int, window: int, device=None) -> torch.Tensor:
    """[sq, sk] bool, True where query i may see key j: i - window < j <= i."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _configs(pairs):
    """Autotune candidates for compiled launches: (BLOCK_M, BLOCK_N, warps, stages)."""
    if not HAS_TRITON:
        return None
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in pairs]


# Interpreted launches use small blocks so tests on short sequences cross block edges.
_INTERP = {"BLOCK_M": 32, "BLOCK_N": 16}


# Few candidates on purpose: each one is a compile per (head dim, causal, dtype).
@jit(configs=_configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]),
     key=["D", "CAUSAL", "HAS_WINDOW"], interpret_meta=_INTERP)
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                     H, GROUP, SQ, SK, WINDOW, OFFSET, qk_scale,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
                     PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + (h // GROUP) * skh
    v_base = v_ptr + b * svb + (h // GROUP) * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(q_base + rows[:, None] * sqs + dims[None, :], mask=rows[:, None] < SQ,
                other=0.0)
    # Finite initial max: a block whose scores are all masked (-inf) then gives p = 0 and
    # alpha = 1 instead of NaN from (-inf) - (-inf).
    m_i = tl.full((BLOCK_M,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    lo = 0  # the key blocks to visit: none right of the diagonal, none left of the window
    hi = SK
    if CAUSAL:  # query row i sits at position i + OFFSET of the keys' frame
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + OFFSET)
    if HAS_WINDOW:
        lo = tl.maximum(0, pid_m * BLOCK_M + OFFSET - WINDOW + 1) // BLOCK_N * BLOCK_N
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + cols[None, :] * sks + dims[:, None], mask=cols[None, :] < SK,
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # log2-domain scores
        keep = cols[None, :] < SK
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + OFFSET)
        if HAS_WINDOW:
            keep = keep & (cols[None, :] > rows[:, None] + OFFSET - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svs + dims[None, :], mask=cols[:, None] < SK,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # A row that sees no key (possible only with OFFSET < 0 or a window) gives o = 0 and
    # lse = -inf: it adds nothing when ring attention merges blocks.
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = o_ptr + bh.to(tl.int64) * SQ * D
    tl.store(o_base + rows[:, None] * D + dims[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < SQ)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * SQ + rows, lse, mask=rows < SQ)


@jit(configs=_configs([(32, 128, 8, 2), (64, 64, 4, 3)]),
     key=["D", "CAUSAL", "HAS_WINDOW"], interpret_meta=_INTERP)
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                          H, HKV, GROUP, SQ, SK, WINDOW, OFFSET, qk_scale, scale,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
                          PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    kv_mask = cols[:, None] < SK
    k = tl.load(k_ptr + b * skb + hk * skh + cols[:, None] * sks + dims[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + cols[:, None] * svs + dims[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    lo = 0  # the query blocks that see this key block: from its diagonal to its window's end
    hi = SQ
    if CAUSAL:
        lo = (tl.maximum(0, pid_n * BLOCK_N - OFFSET) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(SQ, (pid_n + 1) * BLOCK_N + WINDOW - 1 - OFFSET)
    for g in tl.range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + (b * H + h) * SQ * D  # dO is made contiguous by the caller
        row_base = (b * H + h) * SQ
        for start_m in tl.range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + rows[:, None] * sqs + dims[None, :], mask=rows[:, None] < SQ,
                        other=0.0)
            do = tl.load(do_base + rows[:, None] * D + dims[None, :], mask=rows[:, None] < SQ,
                         other=0.0)
            lse = tl.load(lse_ptr + row_base + rows, mask=rows < SQ, other=0.0)
            delta = tl.load(delta_ptr + row_base + rows, mask=rows < SQ, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [N, M]
            keep = (cols[:, None] < SK) & (rows[None, :] < SQ)
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :] + OFFSET)
            if HAS_WINDOW:
                keep = keep & (cols[:, None] > rows[None, :] + OFFSET - WINDOW)
            pt = tl.where(keep, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    out = bhk.to(tl.int64) * SK * D + cols[:, None] * D + dims[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@jit(configs=_configs([(128, 32, 8, 2), (64, 64, 4, 3)]),
     key=["D", "CAUSAL", "HAS_WINDOW"], interpret_meta=_INTERP)
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                        H, GROUP, SQ, SK, WINDOW, OFFSET, qk_scale, scale,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, D: tl.constexpr,
                        PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    k_base = k_ptr + b * skb + (h // GROUP) * skh
    v_base = v_ptr + b * svb + (h // GROUP) * svh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_mask = rows[:, None] < SQ
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :], mask=row_mask,
                other=0.0)
    bh64 = bh.to(tl.int64)
    do = tl.load(do_ptr + bh64 * SQ * D + rows[:, None] * D + dims[None, :], mask=row_mask,
                 other=0.0)
    lse = tl.load(lse_ptr + bh64 * SQ + rows, mask=rows < SQ, other=0.0)
    delta = tl.load(delta_ptr + bh64 * SQ + rows, mask=rows < SQ, other=0.0)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    lo = 0  # the key blocks to visit: none right of the diagonal, none left of the window
    hi = SK
    if CAUSAL:
        hi = tl.minimum(SK, (pid_m + 1) * BLOCK_M + OFFSET)
    if HAS_WINDOW:
        lo = tl.maximum(0, pid_m * BLOCK_M + OFFSET - WINDOW + 1) // BLOCK_N * BLOCK_N
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * sks + dims[None, :], mask=cols[:, None] < SK,
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + dims[None, :], mask=cols[:, None] < SK,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        keep = (cols[None, :] < SK) & row_mask
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + OFFSET)
        if HAS_WINDOW:
            keep = keep & (cols[None, :] > rows[:, None] + OFFSET - WINDOW)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(dq_ptr + bh64 * SQ * D + rows[:, None] * D + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_mask)


def _strides(t):
    if t.stride(-1) != 1:
        raise AssertionError("last dim must be contiguous")  # guaranteed by _prepare
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_forward(q, k, v, causal, scale, window, offset):
    """(o, lse in base 2) of one attention call on the Triton kernel."""
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    o = torch.empty(B, H, SQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, SQ, dtype=torch.float32, device=q.device)  # base-2 lse
    grid = lambda meta: (cdiv(SQ, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v),
                           H, H // HKV, SQ, SK, window or 0, offset, scale * LOG2E,
                           CAUSAL=causal, HAS_WINDOW=window is not None, D=D,
                           PREC=dot_precision(q.dtype))
    return o, lse


def _launch_backward(q, k, v, do, lse, delta, causal, scale, window, offset):
    """(dq, dk, dv) on the Triton kernels, from the base-2 ``lse`` of the rows' whole
    softmax and ``delta`` = rowsum(dO * O); ``do`` contiguous."""
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    dq = torch.empty(B, H, SQ, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, HKV, SK, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, HKV, SK, D, dtype=v.dtype, device=v.device)
    common = dict(CAUSAL=causal, HAS_WINDOW=window is not None, D=D,
                  PREC=dot_precision(q.dtype))
    window = window or 0
    strides = (*_strides(q), *_strides(k), *_strides(v))
    grid_kv = lambda meta: (cdiv(SK, meta["BLOCK_N"]), B * HKV)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, *strides, H, HKV,
                                   H // HKV, SQ, SK, window, offset, scale * LOG2E,
                                   scale, **common)
    grid_q = lambda meta: (cdiv(SQ, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, *strides, H, H // HKV, SQ,
                                SK, window, offset, scale * LOG2E, scale, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window):
        o, lse = _launch_forward(q, k, v, causal, scale, window, 0)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O) = rowsum(P * dP)
        dq, dk, dv = _launch_backward(q, k, v, do, lse, delta, ctx.causal, ctx.scale,
                                      ctx.window, 0)
        return dq, dk, dv, None, None, None


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be [batch, heads, seq, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share "
                         "batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: query heads ({q.shape[1]}) must be a multiple of kv "
                         f"heads ({k.shape[1]}) for grouped-query attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def attention(q, k, v, causal=True, scale=None, *, window=None, backend="auto"):
    """softmax(q k^T * scale [+ causal mask]) v for q [b, h, sq, d] and k, v [b, h_kv, sk, d]
    (h_kv divides h). ``scale`` defaults to 1/sqrt(d). ``window`` (causal only): sliding-
    window attention, query i sees keys i - window < j <= i. The Triton path supports head
    dims 16, 32, 64, 128; other head dims use the reference under backend='auto'."""
    _check(q, k, v)
    if window is not None:
        if not causal:
            raise ValueError("attention: window is a sliding causal window; pass causal=True")
        if int(window) != window or window < 1:
            raise ValueError(f"attention: window must be a positive int, got {window!r}")
        window = int(window)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not use_triton(backend, q, k, v):
        return attention_reference(q, k, v, causal, scale, window)
    if D not in HEAD_DIMS:
        if backend == "triton":
            raise ValueError(f"attention: Triton kernel supports head_dim in {HEAD_DIMS}, got "
                             f"{D}; pad the head dim or use backend='torch'")
        return attention_reference(q, k, v, causal, scale, window)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, causal, scale, window)
