"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, fp32 math.

What is fused and why: the fp32 upcast, the mean of squares, the rsqrt, both products and
the downcast are one read of x and one write of y, plus 4 bytes per row (rstd) kept for the
backward. The backward reads x, dy and rstd once, writes dx, and reduces dweight through
per-program fp32 partial sums (one small [programs, N] buffer summed by torch) instead of
atomics, so it is deterministic.
"""
import torch

from ._backend import cdiv, jit, next_pow2, num_sms, tl, upcast, use_triton

MAX_COLS = 65536  # rows wider than this exceed a program's registers: reference path


def rms_norm_reference(x, weight, eps=1e-6):
    xf = upcast(x)
    # xf * xf, not xf.pow(2): the same values, and pow's backward copies x (x.pow(1)).
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


@jit
def _rms_fwd_kernel(x_ptr, r_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, M, N, eps,
                    HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inb = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # add_rms_norm: normalize s = x + residual, and store s
        x += tl.load(r_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        # rounded to its storage dtype first, so y normalizes exactly the s returned
        x = x.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, x, mask=inb)
        x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@jit
def _rms_bwd_kernel(x_ptr, w_ptr, dy_ptr, ds_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, N,
                    HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks row tiles pid, pid + G, ... and keeps its dweight partial sum in
    # registers, so dweight costs one [N] write per program instead of one per row.
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, ROWS), G):
        rows = tile * ROWS + tl.arange(0, ROWS).to(tl.int64)
        inb = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, axis=1) / N
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DS:  # add_rms_norm: the gradient reaching the sum x + residual directly
            dx += tl.load(ds_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=cols < N)


def row_config(n):
    """(BLOCK, ROWS, num_warps) for a row-wise kernel over rows of n elements."""
    block = max(16, next_pow2(n))
    rows = max(1, min(16, 4096 // block))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, rows, warps


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        M, N = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block, rows, warps = row_config(N)
        _rms_fwd_kernel[(cdiv(M, rows),)](x2, x2, x2, weight, y, rstd, M, N, float(eps),
                                          HAS_RESIDUAL=False, ROWS=rows, BLOCK=block,
                                          num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N).contiguous()
        dx = torch.empty_like(x2)
        block, rows, warps = row_config(N)
        G = max(1, min(cdiv(M, rows), 2 * num_sms(x2)))
        dw_part = torch.empty(G, N, dtype=torch.float32, device=x2.device)
        _rms_bwd_kernel[(G,)](x2, weight, dy2, dy2, rstd, dx, dw_part, M, N, HAS_DS=False,
                              ROWS=rows, BLOCK=block, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None


def check_norm_args(x, params, name):
    n = x.shape[-1] if x.dim() else 0
    for pname, p in params.items():
        if p is not None and p.shape != (n,):
            raise ValueError(f"{name}: {pname} must have shape ({n},) to match x's last "
                             f"dim, got {tuple(p.shape)}")


def norm_uses_triton(name, backend, x, *tensors) -> bool:
    """Whether a norm runs its Triton kernel: as ``use_triton`` decides, and only for rows
    of at most ``MAX_COLS`` (wider rows take the reference; asking for Triton is an error)."""
    if not use_triton(backend, x, *tensors):
        return False
    if x.shape[-1] > MAX_COLS:
        if backend == "triton":
            raise ValueError(f"Triton {name} supports hidden <= {MAX_COLS}, got "
                             f"{x.shape[-1]}; use backend='torch'")
        return False
    return True


def rms_norm(x, weight, eps=1e-6, *, backend="auto"):
    """RMSNorm over the last dim of x with ``weight`` [hidden]; fp32 math, output x.dtype;
    differentiable in x and weight."""
    check_norm_args(x, {"weight": weight}, "rms_norm")
    if not norm_uses_triton("rms_norm", backend, x, weight):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
