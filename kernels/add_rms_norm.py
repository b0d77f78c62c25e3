"""Residual add + RMSNorm in one pass: ``s = x + residual``, ``y = rms_norm(s, weight)``.

What is fused and why: a pre-norm block does ``h = h + branch`` and then normalizes ``h`` for
the next branch. Eager PyTorch (and the two separate kernels) write the sum, read it back
for the norm, and in the backward add the norm's input gradient to the residual gradient in
a third pass. Here the forward reads ``x`` and ``residual`` once and writes both ``s`` and
``y``; the backward reads ``s``, ``dy`` and ``ds`` once and writes the summed gradient once
(it is the gradient of both ``x`` and ``residual``), plus the usual per-program ``dweight``
partial sums.

    ds_total = ds + (w * dy - s_hat * mean(w * dy * s_hat)) * rstd,   s_hat = s * rstd
"""
import torch

from ._backend import cdiv, num_sms
from .rms_norm import (_rms_bwd_kernel, _rms_fwd_kernel, check_norm_args, norm_uses_triton,
                       rms_norm_reference, row_config)


def add_rms_norm_reference(x, residual, weight, eps=1e-6):
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        dtype = torch.result_type(x, residual)
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = residual.reshape(-1, shape[-1]).contiguous()
        M, N = x2.shape
        s = torch.empty(M, N, dtype=dtype, device=x.device)
        y = torch.empty_like(s)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block, rows, warps = row_config(N)
        _rms_fwd_kernel[(cdiv(M, rows),)](x2, r2, s, weight, y, rstd, M, N, float(eps),
                                          HAS_RESIDUAL=True, ROWS=rows, BLOCK=block,
                                          num_warps=warps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.dtypes = (x.dtype, residual.dtype)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        M, N = s.shape
        dy2 = s.new_zeros(M, N) if dy is None else dy.reshape(M, N).contiguous()
        ds2 = None if ds is None else ds.reshape(M, N).contiguous()
        dsum = torch.empty_like(s)
        block, rows, warps = row_config(N)
        G = max(1, min(cdiv(M, rows), 2 * num_sms(s)))
        dw_part = torch.empty(G, N, dtype=torch.float32, device=s.device)
        _rms_bwd_kernel[(G,)](s, weight, dy2, dy2 if ds2 is None else ds2, rstd, dsum,
                              dw_part, M, N, HAS_DS=ds2 is not None, ROWS=rows,
                              BLOCK=block, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        shape = (dy if dy is not None else ds).shape
        x_dtype, r_dtype = ctx.dtypes
        dsum = dsum.view(shape)
        return dsum.to(x_dtype), dsum.to(r_dtype), dw, None


def add_rms_norm(x, residual, weight, eps=1e-6, *, backend="auto"):
    """``(rms_norm(x + residual, weight), x + residual)`` in one pass; the sum has the
    promoted dtype of x and residual (an fp32 residual stream stays fp32), fp32 math."""
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual "
                         f"{tuple(residual.shape)} must have the same shape")
    check_norm_args(x, {"weight": weight}, "add_rms_norm")
    if not norm_uses_triton("add_rms_norm", backend, x, residual, weight):
        return add_rms_norm_reference(x, residual, weight, eps)
    return _AddRMSNorm.apply(x, residual, weight, eps)
