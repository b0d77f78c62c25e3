"""SwiGLU and RoPE."""
import pytest
import torch
from kernel_testing import check_op

from megalite.kernels import apply_rope, swiglu, swiglu_packed
from megalite.kernels.rope import apply_rope_reference
from megalite.kernels.swiglu import swiglu_packed_reference, swiglu_reference

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 123), (2, 3, 1000), (5,)])
def test_swiglu_matches_reference(shape, dtype):
    gate, up = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    check_op(lambda g, u: swiglu(g, u, backend="triton"), swiglu_reference, [gate, up], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 246), (2, 3, 10)])
def test_swiglu_packed_matches_reference(shape, dtype, backend):
    gate_up = torch.randn(shape, dtype=dtype) * 3
    check_op(lambda h: swiglu_packed(h, backend=backend), swiglu_packed_reference, [gate_up],
             dtype)


def rope_tables(s, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(s).float(), inv)
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 13, 32), (1, 2, 7, 128), (1, 1, 5, 6)])
def test_rope_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    cos, sin = rope_tables(shape[2], shape[3])
    check_op(lambda x: apply_rope(x, cos, sin, backend="triton"),
             lambda x: apply_rope_reference(x, cos, sin), [x], dtype)


def test_rope_strided_input_and_table_grads():
    # q as a [b, s, h, d] projection viewed as [b, h, s, d]; broadcast tables [1, 1, s, d]
    x = torch.randn(2, 11, 3, 16).transpose(1, 2)
    cos, sin = (t.view(1, 1, 11, 16) for t in rope_tables(11, 16))
    check_op(lambda x, c, s: apply_rope(x, c, s, backend="triton"), apply_rope_reference,
             [x, cos + 0.1, sin - 0.1], torch.float32)


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="even"):
        swiglu_packed(torch.randn(3, 5))
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\[s, d\]"):
        apply_rope(x, torch.randn(6, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 2, 5, 7), torch.randn(5, 7), torch.randn(5, 7))


def test_reference_gradcheck_fp64():
    g, u = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu_reference, (g, u))
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    c, s = (torch.randn(3, 4, dtype=torch.float64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x: apply_rope_reference(x, c, s), (x,))
