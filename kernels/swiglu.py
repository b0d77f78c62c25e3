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


# ----------------------------------------------------------------------------- packed input
# The MLP's fused up-projection writes [..., 2f] = [gate | up]. Taking that buffer whole
# avoids what the two-tensor op costs when given its halves: two .contiguous() copies in the
# forward, and in the backward a cat of d_gate and d_up into the projection's gradient
# (SplitBackward). Here the gradient is written straight into one [..., 2f] buffer.
def swiglu_packed_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


@jit
def _swiglu_packed_fwd_kernel(h_ptr, y_ptr, n, F, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    src = (offs // F) * (2 * F) + offs % F  # row r, column c of gate; up is F further
    g = tl.load(h_ptr + src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + src + F, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)


@jit
def _swiglu_packed_bwd_kernel(h_ptr, dy_ptr, dh_ptr, n, F, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    src = (offs // F) * (2 * F) + offs % F
    g = tl.load(h_ptr + src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + src + F, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dh_ptr + src, (dy * u * s * (1.0 + g * (1.0 - s))).to(dh_ptr.dtype.element_ty),
             mask=m)
    tl.store(dh_ptr + src + F, (dy * g * s).to(dh_ptr.dtype.element_ty), mask=m)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, triton):
        ctx.save_for_backward(gate_up)
        ctx.triton = triton
        f = gate_up.shape[-1] // 2
        if not triton:
            gate, up = gate_up.chunk(2, dim=-1)
            return swiglu_reference(gate, up)
        gate_up = gate_up.contiguous()  # the projection's output already is
        y = torch.empty(*gate_up.shape[:-1], f, dtype=gate_up.dtype, device=gate_up.device)
        n = y.numel()
        _swiglu_packed_fwd_kernel[(cdiv(n, BLOCK),)](gate_up, y, n, f, BLOCK=BLOCK,
                                                     num_warps=4)
        return y

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        f = gate_up.shape[-1] // 2
        dh = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        if not ctx.triton:  # the same formulas in torch, written into dh's two halves
            g, u = (t.float() for t in gate_up.chunk(2, dim=-1))
            dyf = dy.float()
            s = torch.sigmoid(g)
            dg, du = dh.chunk(2, dim=-1)
            torch.mul(dyf * u * s, 1.0 + g * (1.0 - s), out=dg)
            torch.mul(dyf * g, s, out=du)
            return dh, None
        gate_up, dy = gate_up.contiguous(), dy.contiguous()
        n = dy.numel()
        _swiglu_packed_bwd_kernel[(cdiv(n, BLOCK),)](gate_up, dy, dh, n, f, BLOCK=BLOCK,
                                                     num_warps=4)
        return dh, None


def swiglu_packed(gate_up, *, backend="auto"):
    """silu(gate) * up with ``gate_up = [gate | up]`` along the last dim (the fused
    up-projection's output, [..., 2f] -> [..., f]); its gradient is one [..., 2f] tensor."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: the last dim ({gate_up.shape[-1]}) must be even: "
                         f"[gate | up] halves")
    return _SwiGLUPacked.apply(gate_up, use_triton(backend, gate_up))
