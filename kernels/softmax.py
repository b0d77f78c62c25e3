"""Scaled masked / causal softmax over attention scores, Megatron's semantics.

    y = softmax(x * scale, masked positions removed), computed in fp32, stored in x.dtype.

A masked position gets probability 0; a row whose positions are all masked gives zeros
(not NaN, not uniform). Causal masking is bottom-right aligned like Megatron's
``ScaledUpperTriangMaskedSoftmax``: query i of sq sees keys j <= i + (sk - sq).

What is fused and why: scaling, masking, the fp32 upcast, the softmax and the downcast are
one read of x and one write of y (eager PyTorch makes ~5 passes over the [sq, sk] scores).
The backward, dx = scale * y * (dy - sum(dy * y)), is likewise one read of y and dy and one
write of dx; it needs only the saved output, never x.
"""
import torch

from ._backend import cdiv, jit, next_pow2, tl, upcast, use_triton

# Rows longer than this do not fit one program's registers; they use the reference.
MAX_COLS = 32768


# ----------------------------------------------------------------------------- reference
def causal_mask(sq, sk, device=None):
    """True = masked out: key j is hidden from query i when j > i + (sk - sq)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)


def masked_softmax_reference(x, mask, scale):
    y = upcast(x) * scale
    if mask is not None:
        y = y.masked_fill(mask, float("-inf"))
    # A fully masked row is all -inf: softmax gives NaN there, which we define as zeros.
    return torch.softmax(y, dim=-1).nan_to_num(0.0).to(x.dtype)


def causal_softmax_reference(x, scale):
    return masked_softmax_reference(x, causal_mask(*x.shape[-2:], device=x.device), scale)


# ----------------------------------------------------------------------------- kernels
@jit
def _softmax_fwd_kernel(x_ptr, y_ptr, m_ptr, R, H, SQ, SK, smb, smh, smq, smk, scale,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # A [ROWS, BLOCK] tile: several short rows per program keep small-sk launches efficient.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inb = (rows[:, None] < R) & (cols[None, :] < SK)
    offs = rows[:, None] * SK + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32) * scale
    i = rows % SQ  # query index of each row
    keep = inb
    if CAUSAL:
        keep = keep & (cols[None, :] <= (i + SK - SQ)[:, None])
    if HAS_MASK:  # the mask may broadcast over batch/heads: index it with its own strides
        bh = rows // SQ
        moff = (bh // H) * smb + (bh % H) * smh + i * smq
        m = tl.load(m_ptr + moff[:, None] + cols[None, :] * smk, mask=inb, other=1)
        keep = keep & (m == 0)
    x = tl.where(keep, x, float("-inf"))
    mx = tl.max(x, axis=1)
    # A fully masked row has mx = -inf; use 0 instead so exp(-inf - 0) = 0, not NaN.
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(x - mx[:, None])
    den = tl.sum(e, axis=1)
    y = e / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@jit
def _softmax_bwd_kernel(y_ptr, dy_ptr, dx_ptr, R, SK, scale,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inb = (rows[:, None] < R) & (cols[None, :] < SK)
    offs = rows[:, None] * SK + cols[None, :]
    y = tl.load(y_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    dot = tl.sum(y * dy, axis=1)
    dx = scale * y * (dy - dot[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)


def _launch_config(sk):
    block = max(16, next_pow2(sk))
    rows = max(1, min(16, 2048 // block))
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, rows, num_warps


def _as_4d(x):
    """[..., sq, sk] -> [B, H, sq, sk] (a view when possible) so broadcast masks index it."""
    if x.dim() < 2:
        raise ValueError(f"softmax input must be [..., sq, sk], got shape {tuple(x.shape)}")
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x.reshape(-1, *x.shape[-3:])


class _MaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, causal):
        shape = x.shape
        x4 = _as_4d(x).contiguous()
        B, H, SQ, SK = x4.shape
        R = B * H * SQ
        y = torch.empty_like(x4)
        if mask is not None:
            m4 = _as_4d(mask.expand(shape)).view(torch.uint8)
            strides = m4.stride()
        else:
            m4, strides = x4, (0, 0, 0, 0)  # never read: HAS_MASK=False
        block, rows, warps = _launch_config(SK)
        _softmax_fwd_kernel[(cdiv(R, rows),)](
            x4, y, m4, R, H, SQ, SK, *strides, float(scale),
            CAUSAL=causal, HAS_MASK=mask is not None, ROWS=rows, BLOCK=block,
            num_warps=warps)
        ctx.save_for_backward(y)
        ctx.scale = float(scale)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        SK = y.shape[-1]
        R = y.numel() // SK
        dy = dy.contiguous()
        dx = torch.empty_like(y)
        block, rows, warps = _launch_config(SK)
        _softmax_bwd_kernel[(cdiv(R, rows),)](
            y, dy, dx, R, SK, ctx.scale, ROWS=rows, BLOCK=block, num_warps=warps)
        return dx.view(dy.shape), None, None, None



def _check(x, mask):
    if not x.is_floating_point():
        raise ValueError(f"softmax input must be floating point, got {x.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = masked out), got {mask.dtype}; "
                             "convert an additive mask with mask = additive < 0")
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to scores "
                             f"{tuple(x.shape)}; use [b or 1, h or 1, sq, sk]") from None
        if torch.broadcast_shapes(mask.shape, x.shape) != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} would enlarge scores "
                             f"{tuple(x.shape)}")


def _triton_ok(backend, *tensors):
    run = use_triton(backend, *tensors)
    if run and tensors[0].shape[-1] > MAX_COLS:
        if backend == "triton":
            raise ValueError(f"Triton softmax supports rows up to {MAX_COLS} keys, got "
                             f"{tensors[0].shape[-1]}; use backend='torch' or flash attention")
        return False
    return run


# ----------------------------------------------------------------------------- public ops
def scaled_masked_softmax(x, mask, scale, *, backend="auto"):
    """softmax(x * scale) over the last dim with ``mask`` (bool, True = masked out,
    broadcastable to x, e.g. [b, 1, sq, sk]) removed; fp32 math, output in x.dtype;
    fully masked rows give zeros. ``mask=None`` means no masking."""
    _check(x, mask)
    if not _triton_ok(backend, x, *([mask] if mask is not None else [])):
        return masked_softmax_reference(x, mask, scale)
    return _MaskedSoftmax.apply(x, mask, scale, False)


def scaled_causal_softmax(x, scale, *, backend="auto"):
    """softmax(x * scale) over the last dim of scores x [..., sq, sk] with a bottom-right
    aligned causal mask (query i sees keys j <= i + sk - sq); fp32 math, output x.dtype."""
    _check(x, None)
    if not _triton_ok(backend, x):
        return causal_softmax_reference(x, scale)
    return _MaskedSoftmax.apply(x, None, scale, True)
