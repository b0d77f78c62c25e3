"""Linear layer with a fused epilogue: y = act(x @ weight^T + bias).

x is [..., K], weight [N, K] (nn.Linear's layout), bias [N] or None, and activation one of
None, "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "relu".

What is fused and why: cuBLAS followed by eager PyTorch writes the [M, N] product, reads it
back to add the bias, and once more for the activation. Here a tiled Triton matmul applies
bias and activation to the fp32 accumulator while it is still in registers, so the output
is written once. For the backward the kernel also writes the pre-activation z when the
activation's derivative needs it (gelu variants; relu's derivative is read from y).
The backward is dz = dy * act'(z) (one fused elementwise Triton kernel) followed by torch
matmuls, dx = dz @ W and dW = dz^T @ x, which cuBLAS already does at peak.
"""
import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, cdiv, dot_precision, jit, tl, triton, use_triton

ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
_ACT_ID = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def linear_reference(x, weight, bias=None, activation=None):
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return F.relu(y)


def _configs():
    if not HAS_TRITON:
        return None
    # Large tiles for big bf16 GEMMs on Hopper, a medium and a small one for thin shapes.
    shapes = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (64, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for m, n, k, s, w in shapes]


@jit(configs=_configs(), key=["M", "N", "K"],
     interpret_meta={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, M, N, K, sxm, sxk, swn, swk,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_Z: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: consecutive programs share rows of x, so tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols wrap around instead of being masked: they load valid memory,
    # their results are discarded by the store mask, and the inner loop stays mask-free in
    # M and N.
    x_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + (rn % N).to(tl.int64)[None, :] * swn + rk[:, None] * swk  # W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    inb = (rm[:, None] < M) & (rn[None, :] < N)
    if SAVE_Z:
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=inb)
    if ACT == 1:    # exact gelu: z * Phi(z)
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACT == 2:  # tanh gelu; tanh(u) = 2 * sigmoid(2u) - 1 (no libdevice needed)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    elif ACT == 3:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=inb)


@jit
def _act_grad_kernel(dy_ptr, z_ptr, dz_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # dz = dy * act'(z); for relu z_ptr holds y (y > 0 exactly where z > 0).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ACT == 1:
        d = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) \
            + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 \
            * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        d = tl.where(z > 0.0, 1.0, 0.0)
    tl.store(dz_ptr + offs, (dy * d).to(dz_ptr.dtype.element_ty), mask=m)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        M, N = x2.shape[0], weight.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        act = _ACT_ID[activation]
        needs_grad = any(ctx.needs_input_grad[:3])
        save_z = needs_grad and act in (1, 2)
        z = torch.empty_like(y) if save_z else y
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _linear_kernel[grid](x2, weight, bias if bias is not None else y, y, z, M, N, K,
                             x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                             HAS_BIAS=bias is not None, ACT=act, SAVE_Z=save_z,
                             PREC=dot_precision(x.dtype))
        ctx.act = act
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight, z if save_z else (y if act == 3 else None))
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0])
        if ctx.act == 0:
            dz = dy2
        else:
            dy2 = dy2.contiguous()
            dz = torch.empty_like(dy2)
            n = dz.numel()
            _act_grad_kernel[(cdiv(n, 1024),)](dy2, z, dz, n, ACT=ctx.act, BLOCK=1024,
                                               num_warps=4)
        dx = (dz @ weight).view(*dy.shape[:-1], x2.shape[-1]) if ctx.needs_input_grad[0] else None
        dw = dz.t() @ x2 if ctx.needs_input_grad[1] else None
        db = dz.sum(0, dtype=torch.float32).to(dz.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def linear(x, weight, bias=None, activation=None, *, backend="auto"):
    """act(x @ weight^T + bias) for x [..., K], weight [N, K], bias [N] or None;
    activation in (None, "gelu", "gelu_tanh", "relu"). Differentiable in all three."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; use one of {ACTIVATIONS}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x [..., K] and weight [N, K] disagree: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)} (weight is nn.Linear's [out, in])")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not use_triton(backend, x, weight, bias):
        return linear_reference(x, weight, bias, activation)
    if x.dtype != weight.dtype:
        raise ValueError(f"linear: x ({x.dtype}) and weight ({weight.dtype}) dtypes differ; "
                         "cast one (autocast is not applied inside the kernel)")
    if x.numel() == 0:
        return linear_reference(x, weight, bias, activation)
    return _Linear.apply(x, weight, bias, activation)
