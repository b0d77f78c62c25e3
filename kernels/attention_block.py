"""One block of attention for ring attention: (out, lse) of a query block against a key
block at a position offset, and its backward from the rows' final lse.

Context parallelism (megalite.parallel.context) computes one query shard against the key
shards of every rank, one block at a time, and merges the blocks exactly through their
log-sum-exps. A block's queries and keys are two contiguous position ranges: query row i
is at position i + offset in the keys' frame (offset = first query position - first key
position), so "causal" means key j <= i + offset and the window i + offset - window < j.

The Triton path runs :mod:`attention`'s kernels with that offset; on the CPU, torch's
fused flash attention takes the blocks it can express, else the reference.
"""
import math

import torch

from ._backend import use_triton
from .attention import HEAD_DIMS, LOG2E, _check, _launch_backward, _launch_forward


def block_mask(sq: int, sk: int, offset: int, causal: bool, window, device=None):
    """[sq, sk] bool, True where query row i sees key j (None: every key)."""
    if not causal:
        return None
    i = torch.arange(sq, device=device)[:, None] + offset
    j = torch.arange(sk, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    return keep


def _expand_kv(t, group):
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def attention_block_reference(q, k, v, causal=True, scale=None, window=None, offset=0):
    """(out, lse) of one block: out as ``attention`` with the mask at ``offset``, lse the
    natural log-sum-exp of each row's scaled scores [b, h, sq] in fp32 (-inf, with out = 0,
    for a row that sees no key)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    s = q.float() @ _expand_kv(k, group).float().transpose(-1, -2) * scale
    keep = block_mask(q.shape[2], k.shape[2], offset, causal, window, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return (p @ _expand_kv(v, group).float()).to(q.dtype), lse


def attention_block_backward_reference(q, k, v, do, lse, delta, causal=True, scale=None,
                                       window=None, offset=0):
    """(dq, dk, dv) of one block, given the rows' lse over *all* their keys (so the block's
    probabilities are the final softmax's) and delta = rowsum(dO * O_final)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = h // hkv
    kk, vv = _expand_kv(k, group).float(), _expand_kv(v, group).float()
    s = q.float() @ kk.transpose(-1, -2) * scale
    p = torch.exp(s - lse[..., None])
    keep = block_mask(sq, sk, offset, causal, window, q.device)
    if keep is not None:
        p = p.masked_fill(~keep, 0.0)
    do = do.float()
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ vv.transpose(-1, -2) - delta[..., None])
    dq = ds @ kk * scale
    dk = ds.transpose(-1, -2) @ q.float() * scale
    dk = dk.view(b, hkv, group, sk, d).sum(2)
    dv = dv.view(b, hkv, group, sk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check_block_window(causal, window, where):
    """A window is a sliding *causal* window: every path (Triton, torch's flash, the
    reference's ``block_mask``) must agree on what a block sees, so refuse it without causal
    (as :func:`attention` does) rather than let the paths differ."""
    if window is not None and not causal:
        raise ValueError(f"{where}: window is a sliding causal window; pass causal=True (or "
                         f"window=None for a block the window does not cut)")


def _block_triton(backend, q, k, v):
    if not use_triton(backend, q, k, v):
        return False
    if q.shape[-1] not in HEAD_DIMS:
        if backend == "triton":
            raise ValueError(f"attention_block: Triton kernel supports head_dim in "
                             f"{HEAD_DIMS}, got {q.shape[-1]}; use backend='torch'")
        return False
    return True


def _cpu_flash(q, causal, window, offset, sk):
    """torch's fused CPU flash attention (what SDPA runs on CPU) returns the lse too and
    takes it back in its backward, so it computes the blocks it can express: unmasked, or
    causal on the diagonal (offset 0, square). It is ~7x faster than the reference on the
    CPU; the reference stays the specification (the two agree to 1e-6 in the tests)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and window is None
            and (not causal or (offset == 0 and q.shape[2] == sk))
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def attention_block(q, k, v, *, causal=True, scale=None, window=None, offset=0,
                    backend="auto"):
    """Forward of one attention block without autograd: (out [b, h, sq, d], lse [b, h, sq]
    fp32, natural log). See :func:`attention_block_reference` for the meaning."""
    _check(q, k, v)
    _check_block_window(causal, window, "attention_block")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _block_triton(backend, q, k, v):
        if _cpu_flash(q, causal, window, offset, k.shape[2]):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, attn_mask=None, scale=scale)
        return attention_block_reference(q, k, v, causal, scale, window, offset)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o, lse2 = _launch_forward(q, k, v, causal, scale, window, int(offset))
    return o, lse2 / LOG2E


def attention_block_backward(q, k, v, do, lse, delta, *, causal=True, scale=None,
                             window=None, offset=0, backend="auto", out=None):
    """(dq, dk, dv) of one block (dk, dv summed over the query heads sharing a kv head)
    from the rows' final natural ``lse`` and ``delta`` = rowsum(dO * O_final) [b, h, sq].
    ``out``: those rows' final output (O_final), which torch's CPU flash backward takes
    instead of ``delta``; without it the reference runs."""
    _check_block_window(causal, window, "attention_block_backward")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _block_triton(backend, q, k, v):
        if _cpu_flash(q, causal, window, offset, k.shape[2]) and out is not None:
            # delta is rowsum(dO * out), computed inside from the final output
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do.contiguous(), q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)
        return attention_block_backward_reference(q, k, v, do, lse, delta, causal, scale,
                                                  window, offset)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _launch_backward(q, k, v, do.contiguous(), (lse * LOG2E).contiguous(),
                            delta.float().contiguous(), causal, scale, window, int(offset))
