"""Grouped matmul (expert MLPs) under the Triton interpreter, against the per-expert loop.

Shapes are odd and tiny (the interpreter runs 16-row tiles, 32 columns, 16-deep K steps):
empty experts (first, middle and last), an expert with one token, an expert spanning two
row tiles, K and N not multiples of the blocks.
"""
import pytest
import torch
from kernel_testing import check_op, close

from megalite.kernels import grouped_matmul
from megalite.kernels.grouped_matmul import grouped_matmul_reference, tile_table

SIZES = [0, 5, 1, 0, 17, 9, 0]  # T = 32


def _weights(e, k, n, dtype):
    return (torch.randn(e, k, n) / k ** 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_matmul_matches_per_expert_loop(dtype):
    x = torch.randn(sum(SIZES), 37, dtype=dtype)
    w = _weights(len(SIZES), 37, 45, dtype)
    check_op(lambda x, w: grouped_matmul(x, w, torch.tensor(SIZES), backend="triton"),
             lambda x, w: grouped_matmul_reference(x, w, SIZES), [x, w], dtype, scale=2.0)


def test_grouped_matmul_layouts_and_empty_experts():
    """Weights stored [E, N, K] (nn.Linear / Hugging Face) passed as a transposed view, x a
    strided slice, sizes as a device int32 tensor; the weight gradient keeps the weight's
    layout and is exactly zero for experts without tokens."""
    sizes = [3, 0, 20, 0]
    stored = torch.randn(4, 19, 33) / 33 ** 0.5           # [E, N, K]
    w = stored.transpose(1, 2).detach().requires_grad_()  # [E, K, N] view
    wide = torch.randn(sum(sizes), 40)
    x = wide[:, 3:36].detach().requires_grad_()           # row stride 40
    y = grouped_matmul(x, w, torch.tensor(sizes, dtype=torch.int32), backend="triton")
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    yr = grouped_matmul_reference(xr, wr, sizes)
    dxr, dwr = torch.autograd.grad(yr, [xr, wr], dy)
    for a, b, what in [(y, yr, "y"), (dx, dxr, "dx"), (dw, dwr, "dw")]:
        close(a, b, torch.float32, what=what)
    assert dw.stride() == w.stride(), "the weight gradient lost the weight's layout"
    assert dw[1].eq(0).all() and dw[3].eq(0).all(), "experts without tokens: zero gradient"

    # only the weight differentiated (the input gradient kernel is skipped)
    (dw_only,) = torch.autograd.grad(
        grouped_matmul(x.detach(), w, torch.tensor(sizes), backend="triton"), [w], dy)
    close(dw_only, dwr, torch.float32, what="dw without dx")

    # under autocast: fp32 leaves, fp16 compute and output, fp32 gradients
    x, w = torch.randn(9, 20, requires_grad=True), torch.randn(2, 20, 17, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = grouped_matmul(x, w, [4, 5], backend="triton")
    assert y.dtype == torch.float16
    dx, dw = torch.autograd.grad(y, [x, w], torch.ones_like(y))
    assert dx.dtype == dw.dtype == torch.float32
    xr, wr = x.detach().half().float().requires_grad_(), w.detach().half().float().requires_grad_()
    yr = grouped_matmul_reference(xr, wr, [4, 5])
    close(y, yr, torch.float16, what="autocast y")
    for a, b in zip((dx, dw), torch.autograd.grad(yr, [xr, wr], torch.ones_like(yr))):
        close(a, b, torch.float16, scale=2.0, what="autocast grads")

    # every token to one expert; a single token; no tokens at all (reference path)
    for sizes, k, n in [([0, 0, 18], 16, 32), ([1], 5, 3), ([0, 0], 8, 4)]:
        x = torch.randn(sum(sizes), k)
        w = _weights(len(sizes), k, n, torch.float32)
        check_op(lambda x, w: grouped_matmul(x, w, sizes, backend="triton"),
                 lambda x, w: grouped_matmul_reference(x, w, sizes), [x, w], torch.float32)


def test_tile_table_covers_each_expert_once():
    for sizes, block_m in [(SIZES, 16), ([0, 0, 0], 16), ([40, 1, 0, 16, 15], 16),
                           ([7] * 9, 4)]:
        table = tile_table(torch.tensor(sizes), block_m, sum(sizes)).tolist()
        assert len(table) == sum(sizes) // block_m + min(len(sizes), sum(sizes))
        expected, start = [], 0
        for e, s in enumerate(sizes):
            expected += [[e, r, start + s] for r in range(start, start + s, block_m)]
            start += s
        used = [row for row in table if row[1] < row[2]]
        assert used == expected
        assert all(row[1] == row[2] for row in table[len(used):])


def test_grouped_matmul_errors():
    x, w = torch.randn(6, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"\[E, K, N\]"):
        grouped_matmul(x, torch.randn(2, 4, 8), [3, 3])
    with pytest.raises(ValueError, match="sum to T = 6"):
        grouped_matmul(x, w, [3, 2])
    with pytest.raises(ValueError, match=">= 0"):
        grouped_matmul(x, w, [7, -1])
    with pytest.raises(ValueError, match="2 integers"):
        grouped_matmul(x, w, [6])
    with pytest.raises(ValueError, match="2 integers"):
        grouped_matmul(x, w, torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="dtypes differ"):
        grouped_matmul(x, w.half(), [3, 3], backend="triton")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        grouped_matmul(x.double(), w.double(), [3, 3], backend="triton")


def test_reference_gradcheck_fp64():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: grouped_matmul_reference(x, w, [2, 0, 3]),
                                    (x, w))
    # fp64 under "auto" (interpreter on) takes the reference too
    assert torch.autograd.gradcheck(lambda x, w: grouped_matmul(x, w, [2, 0, 3]), (x, w))


def test_bench_case_providers_agree():
    """The benchmark's torch._grouped_mm provider (where torch has one that runs here) and
    the per-expert loop compute the same thing, forward and backward."""
    from megalite.kernels._bench_cases import cases
    case = cases("grouped_matmul", "cpu", torch.float32, quick=True)[0]
    if "grouped_mm" not in case.providers:
        pytest.skip("this torch has no torch._grouped_mm")
    x, w = case.make_inputs()
    dy = None
    results = []
    for name in ("torch", "grouped_mm"):
        try:
            y = case.providers[name](x, w)
        except RuntimeError as exc:  # e.g. a CPU build without a grouped_mm kernel
            pytest.skip(f"torch._grouped_mm does not run here: {exc}")
        dy = torch.randn_like(y) if dy is None else dy
        results.append((y, *torch.autograd.grad(y, [x, w], dy)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_matmul_gpu(dtype):
    """Compiled kernels at a real size (3,000 routed rows, 8 experts, two of them empty),
    nn.Linear-layout weights passed transposed too; relative error norm against the
    per-expert loop in fp32."""
    from megalite.kernels._bench_cases import routed_group_sizes
    sizes = routed_group_sizes(3000, 8, 1.0)
    sizes[0] += sizes[3] + sizes[6]
    sizes[3] = sizes[6] = 0
    k, n = 1000, 1543
    x = torch.randn(3000, k, device="cuda", dtype=dtype)
    stored = torch.randn(8, n, k, device="cuda") / k ** 0.5
    for w in (stored.transpose(1, 2).contiguous().to(dtype), stored.to(dtype).transpose(1, 2)):
        xs, ws = x.clone().requires_grad_(), w.detach().requires_grad_()
        xr, wr = x.float().requires_grad_(), w.detach().float().requires_grad_()
        y = grouped_matmul(xs, ws, sizes.cuda(), backend="triton")
        yr = grouped_matmul_reference(xr, wr, sizes)
        dy = torch.randn_like(yr)
        got = (y, *torch.autograd.grad(y, [xs, ws], dy.to(dtype)))
        want = (yr, *torch.autograd.grad(yr, [xr, wr], dy))
        for a, b, what in zip(got, want, ("y", "dx", "dw")):
            err = ((a.float() - b).norm() / b.norm()).item()
            assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3), f"{what}: {err:.2e}"
        assert got[2][3].eq(0).all() and got[2][6].eq(0).all()
        assert got[2].stride() == ws.stride()
