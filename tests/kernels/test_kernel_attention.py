import pytest
import torch
import torch.nn.functional as F
from kernel_testing import check_op, close, fwd_bwd

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


# ----------------------------------------------------------------------------- sliding window
def dense_window_attention(q, k, v, window):
    """Scores, masks and softmax written out, with Hugging Face's sliding-window rule
    (masking_utils.sliding_window_overlay on top of causal): key j is visible from
    query i when j <= i and j > i - window."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return scores.softmax(-1) @ v


# (batch, heads, kv_heads, seq, head_dim, window): windows shorter than a block, than the
# sequence, of one key (itself only), and at least the sequence (plain causal).
WINDOW_CASES = [(1, 2, 1, 45, 16, 7), (2, 4, 2, 37, 32, 16), (1, 1, 1, 33, 16, 1),
                (1, 2, 2, 40, 16, 40), (1, 2, 1, 20, 64, 64)]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "b{}h{}kv{}s{}d{}w{}".format(*c))
def test_window_attention_matches_dense(case):
    b, h, hkv, s, d, window = case
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    dense = lambda q, k, v: dense_window_attention(q, k, v, window)  # noqa: E731
    check_op(lambda q, k, v: attention(q, k, v, window=window, backend="triton"), dense,
             [q, k, v], torch.float32, scale=5.0)
    check_op(lambda q, k, v: attention(q, k, v, window=window, backend="torch"), dense,
             [q, k, v], torch.float32, scale=5.0)
    if window >= s:
        close(attention(q, k, v, window=window, backend="triton"), sdpa(q, k, v, True),
              torch.float32)


def test_window_attention_fp16():
    q, k, v = (torch.randn(1, 2, 41, 32, dtype=torch.float16) for _ in range(3))
    check_op(lambda q, k, v: attention(q, k, v, window=9, backend="triton"),
             lambda q, k, v: dense_window_attention(q, k, v, 9), [q, k, v], torch.float16,
             scale=5.0)


def test_window_blocks_outside_are_never_read():
    """The loops skip the key (query) blocks entirely outside every window of a query
    (key) block: NaN placed there cannot reach the results, which a mask alone would let
    through (NaN * 0 = NaN in p @ v). Interpreted blocks are 32 queries x 16 keys."""
    from megalite.kernels.attention import _INTERP
    assert (_INTERP["BLOCK_M"], _INTERP["BLOCK_N"]) == (32, 16)   # the layout assumed below
    s, window = 96, 16
    q, k, v, do = (torch.randn(1, 1, s, 16) for _ in range(4))
    ref, (dq_ref, dk_ref, dv_ref), _ = fwd_bwd(
        lambda q, k, v: dense_window_attention(q, k, v, window), [q, k, v], dy=do)

    # Keys 0..15 (key block 0) are outside the windows of queries 32.. (query blocks 1, 2).
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[..., :16, :] = v_bad[..., :16, :] = float("nan")
    out, (dq, _, _), _ = fwd_bwd(lambda q, k, v: attention(q, k, v, window=window,
                                                           backend="triton"),
                                 [q, k_bad, v_bad], dy=do)
    close(out[..., 32:, :], ref[..., 32:, :], torch.float32, 5.0, "output beyond the NaN keys")
    close(dq[..., 32:, :], dq_ref[..., 32:, :], torch.float32, 5.0, "dq beyond the NaN keys")
    # Without the window every query block reads key block 0: the NaN spreads (the check
    # above can fail).
    assert attention(q, k_bad, v_bad, backend="triton")[..., 32:, :].isnan().all()

    # Queries 64..95 (query block 2) see no key of blocks 0..2 (keys 0..47).
    q_bad, do_bad = q.clone(), do.clone()
    q_bad[..., 64:, :] = do_bad[..., 64:, :] = float("nan")
    _, (_, dk, dv), _ = fwd_bwd(lambda q, k, v: attention(q, k, v, window=window,
                                                          backend="triton"),
                                [q_bad, k, v], dy=do_bad)
    close(dk[..., :48, :], dk_ref[..., :48, :], torch.float32, 5.0, "dk before the NaN rows")
    close(dv[..., :48, :], dv_ref[..., :48, :], torch.float32, 5.0, "dv before the NaN rows")


def test_window_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, q, q, causal=False, window=4)
    with pytest.raises(ValueError, match="positive int"):
        attention(q, q, q, window=0)
