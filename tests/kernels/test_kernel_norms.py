import pytest
import torch
from kernel_testing import check_op, close

from megalite.kernels import layer_norm, rms_norm
from megalite.kernels.layer_norm import layer_norm_reference
from megalite.kernels.rms_norm import rms_norm_reference

SHAPES = [(13, 123), (3, 5, 1000), (40, 64), (1, 7)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    w = 1 + 0.1 * torch.randn(shape[-1], dtype=dtype)
    check_op(lambda x, w: rms_norm(x, w, 1e-6, backend="triton"),
             lambda x, w: rms_norm_reference(x, w, 1e-6), [x, w], dtype, grad_scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = 1 + 0.1 * torch.randn(shape[-1], dtype=dtype)
    b = 0.1 * torch.randn(shape[-1], dtype=dtype)
    check_op(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"),
             lambda x, w, b: layer_norm_reference(x, w, b, 1e-5), [x, w, b], dtype,
             grad_scale=4.0)


def test_layer_norm_without_affine_params():
    x = torch.randn(9, 77)
    check_op(lambda x: layer_norm(x, None, None, backend="triton"),
             lambda x: layer_norm_reference(x, None, None), [x], torch.float32)


def test_fp32_weights_with_half_activations():
    # mixed precision: fp16 activations, fp32 master weights; grads keep each input's dtype
    x = torch.randn(6, 200, dtype=torch.float16)
    w = torch.randn(200)
    y = rms_norm(x, w, backend="triton")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), rms_norm_reference(x, w).float(), atol=2e-3,
                               rtol=4e-3)


def test_weight_shape_errors():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(torch.randn(4, 8), torch.randn(8), torch.randn(9))


def test_reference_gradcheck_fp64():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm_reference(x, w), (x, w))
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm_reference(x, w, b), (x, w, b))


@pytest.mark.parametrize("with_ds", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 123), (2, 5, 64)])
def test_add_rms_norm_matches_add_then_norm(shape, dtype, with_ds):
    """Both outputs (normed, sum) and the gradients of x, residual and weight against the
    reference (add, then RMSNorm) in fp32; the residual stream may be fp32 while x is not."""
    from megalite.kernels import add_rms_norm
    from megalite.kernels.add_rms_norm import add_rms_norm_reference
    x = torch.randn(shape, dtype=dtype)
    res = torch.randn(shape)          # fp32 residual stream
    w = 1 + 0.1 * torch.randn(shape[-1])
    dy, ds = torch.randn(shape), torch.randn(shape)
    outs = {}
    for name, fn, cast in (("triton", lambda *a: add_rms_norm(*a, backend="triton"), False),
                           ("ref", add_rms_norm_reference, True)):
        leaves = [(t.float() if cast else t).clone().requires_grad_() for t in (x, res, w)]
        y, s = fn(*leaves)
        assert s.dtype == torch.float32 and y.dtype == torch.float32
        grads = torch.autograd.grad([y, s] if with_ds else [y], leaves,
                                    [dy, ds] if with_ds else [dy])
        outs[name] = (y, s, *grads)
    for a, b, what in zip(outs["triton"], outs["ref"], ("y", "s", "dx", "dres", "dw")):
        close(a, b, dtype, scale=4.0 if what == "dw" else 1.0, what=what)
    assert outs["triton"][2].dtype == dtype
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, res[..., :-1], w)
