"""The blocks ring attention is built from: attention at a causal offset (full, masked or
partly empty), returning the log-sum-exp, and the block backward from a given lse/delta.
The oracle is the softmax written out with the position mask, differentiated by autograd.
backend "torch" runs torch's fused CPU flash attention for the blocks it can express
(unmasked, or causal on the diagonal) and the reference for the others."""
import pytest
import torch

from megalite.kernels.attention_block import (attention_block, attention_block_backward,
                                              attention_block_reference)


def dense(q, k, v, offset, causal, window):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        i = torch.arange(q.shape[2])[:, None] + offset
        j = torch.arange(k.shape[2])[None, :]
        keep = j <= i
        if window is not None:
            keep = keep & (j > i - window)
        s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v, torch.logsumexp(s, -1)


# (heads, kv_heads, sq, sk, head_dim, offset, causal, window): the diagonal of a ring step,
# a block half in the past (the mask crosses the interpreter's 32x16 blocks), a window's
# edge with grouped-query heads, a full block, and a partly empty one (offset < 0).
CASES = [(2, 1, 37, 37, 16, 0, True, None), (2, 2, 33, 45, 16, 20, True, None),
         (4, 2, 40, 40, 32, 40, True, 45), (1, 1, 20, 45, 16, 0, False, None),
         (2, 1, 24, 24, 16, 25, True, 31)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}kv{}q{}k{}d{}o{}{}w{}".format(*c))
def test_block_forward_backward(case, backend):
    h, hkv, sq, sk, d, offset, causal, window = case
    q = torch.randn(1, h, sq, d, requires_grad=True)
    k = torch.randn(1, hkv, sk, d, requires_grad=True)
    v = torch.randn(1, hkv, sk, d, requires_grad=True)
    do = torch.randn(1, h, sq, d)
    ref, ref_lse = dense(q, k, v, offset, causal, window)
    ref.backward(do)
    out, lse = attention_block(q.detach(), k.detach(), v.detach(), causal=causal,
                               window=window, offset=offset, backend=backend)
    torch.testing.assert_close(out, ref.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=2e-5, rtol=2e-5)
    delta = (do * out).sum(-1)
    grads = attention_block_backward(q.detach(), k.detach(), v.detach(), do, lse, delta,
                                     causal=causal, window=window, offset=offset,
                                     backend=backend, out=out)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_rows_without_keys(backend):
    """offset -5: the first 5 query rows see no key: out 0, lse -inf (no NaN), the rest
    as the dense softmax."""
    q, k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 1, 37, 16), torch.randn(1, 1, 37, 16)
    out, lse = attention_block(q, k, v, causal=True, offset=-5, backend=backend)
    assert (out[:, :, :5] == 0).all() and torch.isinf(lse[:, :, :5]).all()
    ref, ref_lse = dense(q, k, v, -5, True, None)
    torch.testing.assert_close(out[:, :, 5:], ref[:, :, 5:], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[:, :, 5:], ref_lse[:, :, 5:], atol=2e-5, rtol=2e-5)
    assert torch.equal(attention_block_reference(q, k, v, True, None, None, -5)[0][:, :, :5],
                       out[:, :, :5])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_window_without_causal_is_refused(backend):
    """A window is causal only: the Triton kernel would apply it to a non-causal block and
    the reference's mask would not, so the block functions refuse the pair."""
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="sliding causal window"):
        attention_block(q, k, v, causal=False, window=3, offset=4, backend=backend)
    out, lse = attention_block(q, k, v, causal=True, window=3, offset=4, backend=backend)
    with pytest.raises(ValueError, match="sliding causal window"):
        attention_block_backward(q, k, v, q, lse, lse, causal=False, window=3, offset=4,
                                 backend=backend)
