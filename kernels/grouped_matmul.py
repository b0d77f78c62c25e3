"""Grouped matmul for expert MLPs: y[rows of expert e] = x[rows of expert e] @ weight[e].

x is [T, K] with its rows (tokens) sorted by expert, weight [E, K, N], group_sizes [E]
integers summing to T (zeros allowed: an expert that received no tokens); the result is
[T, N]. Layout: weight[e] is the right-hand matrix of the product (``x_e @ weight[e]``),
as in ``torch._grouped_mm`` and Megatron-Core's grouped MLP, so an expert MLP's fused
gate/up projection is ``[E, d_model, 2 * d_ff]`` and its down projection ``[E, d_ff,
d_model]``. Weights stored the nn.Linear way (``[E, out, in]``, Hugging Face's
``gate_up_proj``/``down_proj``) are passed as ``w.transpose(1, 2)``: the kernels read
weights through their strides, so the view costs no copy, and the weight gradient comes
back in the same layout.

What the kernels do:
  * forward ``y_e = x_e @ W_e`` and input gradient ``dx_e = dy_e @ W_e^T`` share one kernel
    (the gradient passes the weight's strides swapped). One program computes one
    [BLOCK_M, BLOCK_N] tile; tiles never straddle two experts. The list of (expert, first
    row, end row) per row tile is built on the device with a few torch ops from
    group_sizes, for at most ``T // BLOCK_M + min(E, T)`` tiles (every non-empty expert
    adds at most one partial tile), so the launch never waits for the sizes to reach the
    host (no sync, CUDA-graph friendly); the unused slots do no work.
  * weight gradient ``dW_e = x_e^T @ dy_e``: one program per (expert, K tile, N tile) walks
    its expert's rows; an expert with no rows gets exact zeros. No atomics: deterministic.
  * 16-bit inputs are multiplied with fp32 accumulation and stored in the input dtype; fp32
    inputs follow ``torch.backends.cuda.matmul.allow_tf32`` like the other matmul kernels.

The reference, ``grouped_matmul_reference``, is the per-expert loop: the specification,
the CPU fallback and the tests' oracle.
"""
import torch

from ._backend import HAS_TRITON, cdiv, dot_precision, jit, tl, triton, upcast, use_triton


def grouped_matmul_reference(x, weight, group_sizes):
    """Per-expert loop: cat over e of x_e @ weight[e], computed in fp32 (fp64 kept).
    ``unbind`` rather than ``weight[e]``: indexing's backward writes a full [E, K, N] zero
    gradient per expert (O(E^2) work); unbind's stacks the E pieces once."""
    sizes = [int(s) for s in torch.as_tensor(group_sizes).tolist()]
    outs = [upcast(xe) @ we for xe, we in zip(x.split(sizes), upcast(weight).unbind(0))]
    return torch.cat(outs).to(x.dtype)


def _configs(tile_m):
    """Autotune candidates on CUDA; BLOCK_M is fixed by the caller for the forward kernel
    (the tile list is built for it before the launch), so only N/K tiles vary there."""
    if not HAS_TRITON:
        return None
    # The last of each list fits in ~100 KB of shared memory even in fp32 (L4, A10G).
    shapes = [(128, 64, 4, 4), (128, 64, 3, 8), (64, 64, 4, 4), (256, 64, 3, 8), (64, 32, 2, 4)]
    if tile_m:
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
                for n, k, s, w in shapes]
    # weight gradient: output tile BLOCK_K x BLOCK_N, reduction over BLOCK_M rows
    return [triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 64}, num_stages=3,
                          num_warps=8),
            triton.Config({"BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_M": 64}, num_stages=4,
                          num_warps=4),
            triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_M": 64}, num_stages=4,
                          num_warps=4),
            triton.Config({"BLOCK_K": 64, "BLOCK_N": 64, "BLOCK_M": 32}, num_stages=2,
                          num_warps=4)]


@jit(configs=_configs(True), key=["N", "K", "BLOCK_M"],
     interpret_meta={"BLOCK_N": 32, "BLOCK_K": 16})
def _gmm_kernel(x_ptr, w_ptr, y_ptr, tiles_ptr, num_slots, N, K, sxm, sxk, swe, swk, swn,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Swizzled order (as in linear.py): consecutive programs share row tiles of x.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_slots - first_m, GROUP_M)
    slot = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    expert = tl.load(tiles_ptr + 3 * slot)
    row_start = tl.load(tiles_ptr + 3 * slot + 1)
    row_end = tl.load(tiles_ptr + 3 * slot + 2)
    # An unused slot of the upper-bound grid (row_start == row_end) runs no K step and
    # stores nothing (a zero-trip loop rather than an early return, which some Triton
    # backends lower badly).
    k_end = tl.where(row_start < row_end, K, 0)
    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past the expert's end and columns past N wrap onto valid memory (their results
    # are discarded by the store mask), which keeps the inner loop mask-free in M and N.
    rows = tl.where(rm < row_end, rm, row_start)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + expert.to(tl.int64) * swe + (rn % N)[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, k_end, BLOCK_K):
        a = tl.load(x_ptrs, mask=rk[None, :] < K - k0, other=0.0)
        b = tl.load(w_ptrs, mask=rk[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < row_end) & (rn[None, :] < N))


@jit(configs=_configs(False), key=["N", "K"],
     interpret_meta={"BLOCK_K": 16, "BLOCK_N": 32, "BLOCK_M": 16})
def _gmm_weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, N, K, sxm, sxk, sdm, sdn,
                            swe, swk, swn, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dW[e] = x_e^T @ dy_e: one output tile of one expert per program, experts outermost.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_expert = tl.cdiv(K, BLOCK_K) * num_n
    expert = pid // per_expert
    pid_k = (pid % per_expert) // num_n
    pid_n = (pid % per_expert) % num_n
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for m0 in tl.range(row_start, row_end, BLOCK_M):  # no iteration for an empty expert
        rows = m0 + rm
        valid = rows < row_end
        a = tl.load(x_ptr + rows.to(tl.int64)[None, :] * sxm + (rk % K)[:, None] * sxk,
                    mask=valid[None, :], other=0.0)                   # x_e^T tile [BK, BM]
        b = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * sdm + (rn % N)[None, :] * sdn,
                    mask=valid[:, None], other=0.0)                   # dy_e tile [BM, BN]
        acc = tl.dot(a, b, acc, input_precision=PREC)
    ptrs = dw_ptr + expert.to(tl.int64) * swe + rk[:, None] * swk + rn[None, :] * swn
    tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rn[None, :] < N))


def _block_m(num_rows, num_experts, device):
    """Row tile of the forward/input-gradient kernel. Small under the interpreter (each
    program instance costs milliseconds there); on the GPU 64 when the average expert gets
    few rows (less padding in each expert's last tile), else 128."""
    if device.type != "cuda":
        return 16
    return 64 if num_rows < 128 * num_experts else 128


def tile_table(group_sizes, block_m, num_rows):
    """(expert, first row, end row) of each row tile, as a flat int32 tensor of
    ``T // block_m + min(E, T)`` slots (an upper bound that needs no host sync); slots past
    the last tile have first row == end row (== 0)."""
    sizes = group_sizes.to(torch.int64)
    num_experts = sizes.numel()
    ends = torch.cumsum(sizes, 0)
    tiles = (sizes + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles, 0)
    slot = torch.arange(num_rows // block_m + min(num_experts, num_rows), device=sizes.device)
    expert = torch.searchsorted(tile_ends, slot, right=True).clamp_(max=num_experts - 1)
    first_tile = tile_ends[expert] - tiles[expert]
    group_start = ends[expert] - sizes[expert]
    start = group_start + (slot - first_tile) * block_m
    end = ends[expert]
    used = slot < tile_ends[-1]
    start = torch.where(used, start, 0)
    end = torch.where(used, end, 0)
    return torch.stack([expert, start, end], 1).to(torch.int32).contiguous()


def _launch_gmm(x, weight, w_strides, N, tiles, block_m, prec):
    """y [T, N] = grouped x @ W, W[e][k, n] read at weight + e*swe + k*swk + n*swn for
    ``w_strides`` = (swe, swk, swn)."""
    T, K = x.shape
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    num_slots = tiles.shape[0]
    grid = lambda meta: (num_slots * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gmm_kernel[grid](x, weight, y, tiles, num_slots, N, K, x.stride(0), x.stride(1),
                      *w_strides, PREC=prec, BLOCK_M=block_m, GROUP_M=8)
    return y


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group_sizes):
        T, K = x.shape
        E, _, N = weight.shape
        block_m = _block_m(T, E, x.device)
        tiles = tile_table(group_sizes, block_m, T)
        prec = dot_precision(x.dtype)
        y = _launch_gmm(x, weight, weight.stride(), N, tiles, block_m, prec)
        ctx.save_for_backward(x, weight, group_sizes, tiles)
        ctx.block_m, ctx.prec = block_m, prec
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, group_sizes, tiles = ctx.saved_tensors
        E, K, N = weight.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dx_e = dy_e @ W_e^T: the forward kernel reading W with its K and N strides swapped
            swe, swk, swn = weight.stride()
            dx = _launch_gmm(dy, weight, (swe, swn, swk), K, tiles, ctx.block_m, ctx.prec)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(weight)  # keeps the weight's layout (e.g. a transposed view)
            offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
            offsets[1:] = torch.cumsum(group_sizes, 0, dtype=torch.int32)
            def grid(meta):
                return (E * cdiv(K, meta["BLOCK_K"]) * cdiv(N, meta["BLOCK_N"]),)
            _gmm_weight_grad_kernel[grid](x, dy, dw, offsets, N, K, x.stride(0), x.stride(1),
                                          dy.stride(0), dy.stride(1), dw.stride(0),
                                          dw.stride(1), dw.stride(2), PREC=ctx.prec)
        return dx, dw, None


def grouped_matmul(x, weight, group_sizes, *, backend="auto"):
    """Grouped matmul over experts: rows ``[o_e, o_e + group_sizes[e])`` of ``x [T, K]``
    (tokens sorted by expert, ``o_e`` = sizes of the experts before e) times
    ``weight[e] [K, N]``, giving ``[T, N]``. ``group_sizes``: ``[E]`` integers (a tensor on
    any device, or a list), zeros allowed, summing to T. Differentiable in x and weight;
    16-bit inputs accumulate in fp32; under autocast both operands are cast to its dtype.
    See the module docstring for the weight layout."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"grouped_matmul: x must be [T, K] and weight [E, K, N]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)} (weights stored "
                         "[E, out, in] are passed as weight.transpose(1, 2))")
    num_experts = weight.shape[0]
    if num_experts == 0:
        raise ValueError("grouped_matmul: weight has no experts (E = 0)")
    if not isinstance(group_sizes, torch.Tensor):
        group_sizes = torch.tensor(list(group_sizes), dtype=torch.int64)
    if group_sizes.dim() != 1 or group_sizes.numel() != num_experts \
            or group_sizes.is_floating_point() or group_sizes.is_complex():
        raise ValueError(f"grouped_matmul: group_sizes must be {num_experts} integers (one "
                         f"per expert), got {group_sizes.dtype} {tuple(group_sizes.shape)}")
    if group_sizes.device.type == "cpu":
        # Checked only when the sizes are on the host already: reading device sizes back
        # would stall the GPU stream at every call.
        if bool((group_sizes < 0).any()) or int(group_sizes.sum()) != x.shape[0]:
            raise ValueError(f"grouped_matmul: group_sizes must be >= 0 and sum to T = "
                             f"{x.shape[0]} (the rows of x), got {group_sizes.tolist()}")
    if torch.is_autocast_enabled(x.device.type):
        # Like a matmul under autocast: both operands in the autocast dtype (the cast is
        # differentiable, so fp32 leaves get fp32 gradients), then no autocast inside.
        compute = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_matmul(x.to(compute), weight.to(compute), group_sizes,
                                  backend=backend)
    if not use_triton(backend, x, weight):
        return grouped_matmul_reference(x, weight, group_sizes)
    if x.dtype != weight.dtype:
        raise ValueError(f"grouped_matmul: x ({x.dtype}) and weight ({weight.dtype}) dtypes "
                         "differ; cast one (autocast is not applied inside the kernel)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        if backend == "triton":
            raise ValueError(f"grouped_matmul: the Triton kernel takes fp32/fp16/bf16, got "
                             f"{x.dtype}; use backend='auto' or 'torch' (the reference)")
        return grouped_matmul_reference(x, weight, group_sizes)
    if x.numel() == 0 or weight.numel() == 0:
        return grouped_matmul_reference(x, weight, group_sizes)
    return _GroupedMatmul.apply(x, weight, _sizes_on(x.device, group_sizes))


def _sizes_on(device, sizes):
    """The sizes as int32 on ``device``. Host sizes go to a GPU through pinned memory and a
    non-blocking copy: a plain copy from pageable memory would wait for the GPU's queue."""
    sizes = sizes.to(torch.int32)
    if device.type == "cuda" and sizes.device.type == "cpu":
        return sizes.pin_memory().to(device, non_blocking=True)
    return sizes.to(device)
