"""SwiGLU: silu(gate) * up, elementwise, fp32 math.

What is fused and why: eager PyTorch runs silu and the product as two kernels with an
intermediate tensor; here forward is one read of gate and up and one write. The backward
recomputes sigmoid(gate) instead of saving silu(gate) (recomputing is cheaper than the memory
traffic), and writes both input gradients in one pass:
    d_gate = dy * up * s * (1 + gate * (1 - s)),  d_up = dy * gate * s,  s = sigmoid(gate).
"""
import torch
import torch.nn.functional as F

from ._backend import cdiv, jit, tl, upcast, use_triton


def swiglu_reference(gate, up):
    return (F.silu(upcast(gate)) * upcast(up)).to(gate.dtype)


@jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty),
             mask=m)
    tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=m)


BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(cdiv(n, BLOCK),)](gate, up, dy, dg, du, n, BLOCK=BLOCK,
                                              num_warps=4)
        return dg, du


def swiglu(gate, up, *, backend="auto"):
    """silu(gate) * up for same-shaped gate and up; fp32 math, output gate.dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have "
                         "the same shape (split the fused projection with .chunk(2, -1))")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) dtypes differ")
    if not use_triton(backend, gate, up):
        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate, up)
