import pytest
import torch
import torch.nn.functional as F
from kernel_testing import check_op, close

from megalite.kernels import attention
from megalite.kernels.attention import attention_reference

# (batch, heads, kv_heads, sq, sk, head_dim, causal): odd lengths cross the interpreter's
# 32x16 blocks; kv_heads < heads is grouped-query attention.
CASES = [
    (2, 4, 2, 37, 37, 16, True),
    (1, 2, 2, 50, 50, 32, False),
    (1, 3, 1, 20, 45, 16, False),
    (1, 2, 1, 45, 20, 16, True),
    (1, 2, 2, 33, 33, 64, True),
    (1, 2, 1, 17, 17, 128, False),
    (1, 1, 1, 19, 19, 128, True),
]


def sdpa(q, k, v, causal, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}q{}k{}d{}{}".format(
    *c[:6], "c" if c[6] else "n"))
def test_attention_matches_sdpa(case, dtype):
    b, h, hkv, sq, sk, d, causal = case
    q = torch.randn(b, h, sq, d, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, dtype=dtype)
    check_op(lambda q, k, v: attention(q, k, v, causal=causal, backend="triton"),
             lambda q, k, v: sdpa(q, k, v, causal), [q, k, v], dtype, scale=5.0)


def test_attention_custom_scale_and_strided_inputs():
    # q/k/v as views of a [b, s, 3, h, d] projection, transposed to [b, h, s, d]
    qkv = torch.randn(2, 29, 3, 2, 32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_op(lambda q, k, v: attention(q, k, v, causal=True, scale=0.3, backend="triton"),
             lambda q, k, v: sdpa(q, k, v, True, 0.3), [q, k, v], torch.float32, scale=5.0)


def test_attention_auto_uses_reference_for_other_head_dims():
    q = torch.randn(1, 2, 9, 24)
    close(attention(q, q, q), sdpa(q, q, q, True), torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, q, q, backend="triton")


def test_attention_shape_errors():
    q = torch.randn(1, 6, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv"):
        attention(q, torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16))
    with pytest.raises(ValueError, match="must match"):
        attention(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        attention(q[0], q[0], q[0])


def test_reference_gradcheck_fp64():
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_reference(q, k, v, True),
                                    (q, k, v))
