import pytest
import torch
from kernel_testing import check_op, close, fwd_bwd

from megalite.kernels import scaled_causal_softmax, scaled_masked_softmax
from megalite.kernels.softmax import causal_softmax_reference, masked_softmax_reference

SHAPES = [(2, 3, 13, 123), (1, 2, 7, 1000), (5, 17, 40), (3, 1, 1)]
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_causal_softmax_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    check_op(lambda x: scaled_causal_softmax(x, 0.37, backend="triton"),
             lambda x: causal_softmax_reference(x, 0.37), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_softmax_matches_reference(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    # Megatron's padding mask broadcasts over heads: [b, 1, sq, sk].
    mshape = (shape[0], 1, *shape[-2:]) if len(shape) == 4 else shape[-2:]
    mask = torch.rand(mshape) < 0.3
    check_op(lambda x: scaled_masked_softmax(x, mask, 1.25, backend="triton"),
             lambda x: masked_softmax_reference(x, mask, 1.25), [x], dtype)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    x = torch.randn(2, 2, 5, 33)
    mask = torch.rand(2, 1, 5, 33) < 0.5
    mask[:, :, 1] = True  # every key hidden from query 1
    y, (dx,), _ = fwd_bwd(lambda x: scaled_masked_softmax(x, mask, 0.5, backend="triton"), [x])
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[:, :, 1] == 0).all() and (dx[:, :, 1] == 0).all()
    assert (y.masked_select(mask.expand_as(y)) == 0).all()
    close(y.sum(-1)[:, :, [0, 2, 3, 4]], torch.ones(2, 2, 4), torch.float32)


def test_all_unmasked_equals_plain_softmax():
    x = torch.randn(3, 4, 9, 70)
    mask = torch.zeros(9, 70, dtype=torch.bool)
    y = scaled_masked_softmax(x, mask, 0.8, backend="triton")
    close(y, torch.softmax(x * 0.8, -1), torch.float32)
    close(scaled_masked_softmax(x, None, 0.8, backend="triton"), y, torch.float32)


@pytest.mark.parametrize("sq,sk", [(9, 5), (4, 11)])
def test_causal_softmax_is_bottom_right_aligned(sq, sk):
    x = torch.randn(2, sq, sk)
    y = scaled_causal_softmax(x, 1.0, backend="triton")
    close(y, causal_softmax_reference(x, 1.0), torch.float32)
    if sq > sk:  # the first sq - sk queries see no key at all
        assert (y[:, : sq - sk] == 0).all()


def test_reference_gradcheck_fp64():
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: masked_softmax_reference(x, mask, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda x: causal_softmax_reference(x, 0.7), (x,))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="bool"):
        scaled_masked_softmax(x, torch.zeros(4, 5), 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        scaled_masked_softmax(x, torch.zeros(4, 6, dtype=torch.bool), 1.0)
