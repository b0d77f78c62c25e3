"""LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, fp32 math.

What is fused and why: like RMSNorm, one read of x and one write of y (plus mean and rstd,
8 bytes per row, for the backward). The backward computes dx and the weight/bias partial
sums in one pass over x and dy; partials are reduced by torch ([programs, N] fp32), which
keeps the result deterministic. ``weight`` and ``bias`` may each be None.
"""
import torch
import torch.nn.functional as F

from ._backend import cdiv, jit, num_sms, tl, upcast
from .rms_norm import check_norm_args, norm_uses_triton, row_config


def layer_norm_reference(x, weight, bias, eps=1e-5):
    xf = upcast(x)
    w = weight.to(xf.dtype) if weight is not None else None
    b = bias.to(xf.dtype) if bias is not None else None
    return F.layer_norm(xf, x.shape[-1:], w, b, eps).to(x.dtype)


@jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inb = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(inb, x - mean[:, None], 0.0)  # padding must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@jit
def _ln_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                   M, N, HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    else:
        w = tl.full((BLOCK,), 1.0, tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, ROWS), G):
        rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)
        inb = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        xhat = tl.where(inb, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(wdy * xhat, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=cols < N)
    tl.store(db_part_ptr + pid * N + cols, db, mask=cols < N)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        M, N = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, rows, warps = row_config(N)
        _ln_fwd_kernel[(cdiv(M, rows),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2,
            y, mean, rstd, M, N, float(eps), HAS_W=weight is not None,
            HAS_B=bias is not None, ROWS=rows, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N).contiguous()
        dx = torch.empty_like(x2)
        block, rows, warps = row_config(N)
        G = max(1, min(cdiv(M, rows), 2 * num_sms(x2)))
        dw_part = torch.empty(G, N, dtype=torch.float32, device=x2.device)
        db_part = torch.empty_like(dw_part)
        _ln_bwd_kernel[(G,)](x2, weight if weight is not None else x2, dy2, mean, rstd, dx,
                             dw_part, db_part, M, N, HAS_W=weight is not None,
                             ROWS=rows, BLOCK=block, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db_part.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.view(dy.shape), dw, db, None


def layer_norm(x, weight, bias, eps=1e-5, *, backend="auto"):
    """LayerNorm over the last dim of x; ``weight``/``bias`` are [hidden] or None; fp32 math,
    output x.dtype; differentiable in x, weight and bias."""
    check_norm_args(x, {"weight": weight, "bias": bias}, "layer_norm")
    if not norm_uses_triton("layer_norm", backend, x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)
