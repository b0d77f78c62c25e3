"""Rotary position embedding: y = x * cos + rotate_half(x) * sin, fp32 math.

x is [b, h, s, d]; cos and sin are [s, d] (leading size-1 dims allowed), and
rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]) (the Llama / Hugging Face convention).

What is fused and why: eager PyTorch materialises rotate_half(x) and three products; the
kernel reads x once (both halves of a row in one program, so the rotation is free), reads
the small cos/sin table from cache, and writes y once. x may be a strided view (e.g. q from
a [b, s, h, d] projection transposed to [b, h, s, d]); only the last dim must be contiguous.
The backward is the transpose of the rotation, the same kernel with signs swapped:
    dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1.
"""
import torch

from ._backend import cdiv, jit, next_pow2, tl, upcast, use_triton


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_reference(x, cos, sin):
    xf = upcast(x)
    return (xf * cos.to(xf.dtype) + rotate_half(xf) * sin.to(xf.dtype)).to(x.dtype)


@jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, R, H, S, sxb, sxh, sxs,
                 HALF: tl.constexpr, BACKWARD: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inb = (rows[:, None] < R) & (cols[None, :] < HALF)
    pos = rows % S
    bh = rows // S
    xrow = (bh // H) * sxb + (bh % H) * sxh + pos * sxs  # strided input row start
    x1p = x_ptr + xrow[:, None] + cols[None, :]
    x1 = tl.load(x1p, mask=inb, other=0.0).to(tl.float32)
    x2 = tl.load(x1p + HALF, mask=inb, other=0.0).to(tl.float32)
    tab = pos[:, None] * (2 * HALF) + cols[None, :]
    c1 = tl.load(cos_ptr + tab, mask=inb, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tab + HALF, mask=inb, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tab, mask=inb, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tab + HALF, mask=inb, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    yp = y_ptr + rows[:, None] * (2 * HALF) + cols[None, :]
    tl.store(yp, y1.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(yp + HALF, y2.to(y_ptr.dtype.element_ty), mask=inb)


def _rope_launch(x, cos, sin, backward):
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, s, d = x.shape
    y = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
    R = b * h * s
    block = max(16, next_pow2(d // 2))
    rows = max(1, min(64, 2048 // block))
    _rope_kernel[(cdiv(R, rows),)](x, cos, sin, y, R, h, s, *x.stride()[:3], HALF=d // 2,
                                   BACKWARD=backward, ROWS=rows, BLOCK=block, num_warps=4)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos2, sin2 = (t.reshape(t.shape[-2:]).contiguous() for t in (cos, sin))
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None,
                              cos2, sin2)
        ctx.table_shape = cos.shape
        return _rope_launch(x, cos2, sin2, backward=False)

    @staticmethod
    def backward(ctx, dy):
        x, cos, sin = ctx.saved_tensors
        dx = _rope_launch(dy, cos, sin, backward=True) if ctx.needs_input_grad[0] else None
        dcos = dsin = None
        if x is not None:  # tables rarely need gradients: plain torch, not worth a kernel
            dyf, xf = dy.float(), x.float()
            if ctx.needs_input_grad[1]:
                dcos = (dyf * xf).sum((0, 1)).reshape(ctx.table_shape).to(cos.dtype)
            if ctx.needs_input_grad[2]:
                dsin = (dyf * rotate_half(xf)).sum((0, 1)).reshape(ctx.table_shape).to(sin.dtype)
        return dx, dcos, dsin


def _check(x, cos, sin):
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be [b, h, s, d], got shape {tuple(x.shape)}")
    s, d = x.shape[-2:]
    if d % 2:
        raise ValueError(f"apply_rope: head dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[-2:] != (s, d) or any(n != 1 for n in t.shape[:-2]):
            raise ValueError(f"apply_rope: {name} must be [s, d] = [{s}, {d}] (leading size-1 "
                             f"dims allowed), got {tuple(t.shape)}; slice the table to "
                             f"{name}[:s] for a shorter sequence")


def apply_rope(x, cos, sin, *, backend="auto"):
    """x * cos + rotate_half(x) * sin for x [b, h, s, d] and cos/sin [s, d]; fp32 math,
    output x.dtype; differentiable in x (and in cos/sin if they require grad)."""
    _check(x, cos, sin)
    if not use_triton(backend, x, cos, sin):
        return apply_rope_reference(x, cos, sin)
    return _Rope.apply(x, cos, sin)
