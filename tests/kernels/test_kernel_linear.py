import pytest
import torch
from kernel_testing import check_op

from megalite.kernels import ACTIVATIONS, linear
from megalite.kernels.linear import linear_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_matches_reference(activation, bias, dtype):
    x = torch.randn(3, 13, 123, dtype=dtype)
    w = (torch.randn(77, 123) / 123 ** 0.5).to(dtype)
    args = [x, w] + ([torch.randn(77, dtype=dtype)] if bias else [])
    check_op(lambda x, w, *b: linear(x, w, *b, activation=activation, backend="triton"),
             lambda x, w, *b: linear_reference(x, w, *b, activation=activation), args, dtype,
             scale=5.0)


def test_linear_odd_small_shapes():
    x, w = torch.randn(1, 5), torch.randn(3, 5)
    check_op(lambda x, w: linear(x, w, activation="gelu", backend="triton"),
             lambda x, w: linear_reference(x, w, activation="gelu"), [x, w], torch.float32)


def test_linear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown activation"):
        linear(x, torch.randn(3, 8), activation="tanh")
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        linear(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="bias"):
        linear(x, torch.randn(3, 8), torch.randn(4))
    with pytest.raises(ValueError, match="dtypes differ"):
        linear(x, torch.randn(3, 8, dtype=torch.float16), backend="triton")


def test_reference_gradcheck_fp64():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
               for s in [(3, 4), (2, 4), (2,)])
    for act in ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda x, w, b: linear_reference(x, w, b, act),
                                        (x, w, b))
