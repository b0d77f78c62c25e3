"""megalite.kernels: fused ops for the hot paths.

Every op has a torch reference that is its specification and CPU fallback. (Bootstrap
version: references only; Triton implementations are added per op.)
"""
import math

import torch
import torch.nn.functional as F


def scaled_causal_softmax(x, scale):
    sq, sk = x.shape[-2:]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(sk - sq + 1)
    return scaled_masked_softmax(x, mask, scale)


def scaled_masked_softmax(x, mask, scale):
    y = (x.float() * scale).masked_fill(mask, float("-inf"))
    p = torch.softmax(y, dim=-1).nan_to_num(0.0)
    return p.to(x.dtype)


def attention(q, k, v, causal=True, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def cross_entropy(logits, target, ignore_index=-100):
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")


def swiglu(gate, up):
    return F.silu(gate) * up


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def linear(x, weight, bias=None, activation=None):
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    raise ValueError(f"unknown activation {activation!r}")
