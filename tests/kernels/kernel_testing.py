"""Helpers shared by the kernel tests: run an op forward and backward, compare with its
reference evaluated in fp32 (the oracle), with tolerances by dtype like Liger-Kernel's."""
import pytest
import torch

triton = pytest.importorskip("triton")  # noqa: F841  (the kernel tests need triton)

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def close(actual, expected, dtype, scale=1.0, what=""):
    """Elementwise ``|a - e| <= atol + rtol |e|``, with ``atol`` taken relative to the
    largest ``|e|`` when that is below 1: gradients of size ~1e-3 compared at an absolute
    2e-2 would let an all-zero gradient pass. The scale never drops below 0.1, so a gradient
    that is exactly zero in the reference (a query that sees only itself) still tolerates
    rounding."""
    tol = TOL[dtype]
    expected = expected.float()
    largest = expected.abs().max().item() if expected.numel() else 1.0
    magnitude = min(1.0, max(largest, 0.1))
    torch.testing.assert_close(actual.float(), expected, atol=tol["atol"] * scale * magnitude,
                               rtol=tol["rtol"] * scale, msg=lambda m: f"{what}: {m}")


def fwd_bwd(fn, args, dy=None, upcast=False):
    """fn(*args) on fresh leaf copies (fp32 copies if upcast); returns (out, grads, dy).
    Floating tensors are differentiated; others (masks, targets) are passed through."""
    leaves = []
    call = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach().clone()
            t = (t.float() if upcast else t).requires_grad_()
            leaves.append(t)
            call.append(t)
        else:
            call.append(a)
    out = fn(*call)
    if dy is None:
        dy = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype), allow_unused=True)
    return out, grads, dy


def check_op(fn_test, fn_ref, args, dtype, scale=1.0, grad_scale=None):
    """fn_test on args (in their dtype) against fn_ref on fp32 copies: output and every
    gradient, with the same upstream gradient."""
    out, grads, dy = fwd_bwd(fn_test, args)
    ref, ref_grads, _ = fwd_bwd(fn_ref, args, dy=dy.float(), upcast=True)
    assert out.dtype == args[0].dtype, f"output dtype {out.dtype} != input {args[0].dtype}"
    close(out, ref, dtype, scale, "output")
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for i, (g, r, a) in enumerate(zip(grads, ref_grads, inputs)):
        assert g is not None and g.dtype == a.dtype and g.shape == a.shape, f"grad {i}"
        close(g, r, dtype, grad_scale or scale, f"grad {i}")
