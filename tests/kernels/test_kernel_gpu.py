"""GPU tier: compiled kernels on CUDA, bf16/fp16 and large shapes (skipped without CUDA).

Large shapes are compared by relative error norm, which is robust to the few elements
where bf16 rounding differs, against the references evaluated in fp32.
"""
import pytest
import torch
import torch.nn.functional as F

from megalite import kernels as K
from megalite.kernels.layer_norm import layer_norm_reference
from megalite.kernels.linear import linear_reference
from megalite.kernels.rms_norm import rms_norm_reference
from megalite.kernels.rope import apply_rope_reference
from megalite.kernels.softmax import causal_softmax_reference, masked_softmax_reference
from megalite.kernels.linear_cross_entropy import linear_cross_entropy_reference
from megalite.kernels.memory import peak_bytes
from megalite.kernels.swiglu import swiglu_packed_reference, swiglu_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.bfloat16, torch.float16]
REL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel_close(a, b, dtype, factor=1.0, what=""):
    a, b = a.float(), b.float()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err < REL[dtype] * factor, f"{what}: relative error {err:.2e}"


def compare(fn, ref, args, dtype, factor=1.0):
    """fn on args (dtype) vs ref on fp32 copies: output and gradients of float inputs."""
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a
              for a in args]
    ref_leaves = [a.detach().float().requires_grad_() if a.is_floating_point() else a
                  for a in args]
    out = fn(*leaves)
    exp = ref(*ref_leaves)
    rel_close(out, exp, dtype, factor, "output")
    dy = torch.randn_like(exp)
    diff = [a for a in leaves if a.is_floating_point()]
    rdiff = [a for a in ref_leaves if a.is_floating_point()]
    grads = torch.autograd.grad(out, diff, dy.to(out.dtype))
    rgrads = torch.autograd.grad(exp, rdiff, dy)
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        rel_close(g, r, dtype, factor, f"grad {i}")


def rnd(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=dtype) * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sk", [1024, 4097])
def test_softmax_gpu(dtype, sk):
    x = rnd(2, 4, 256, sk, dtype=dtype, scale=3)
    compare(lambda x: K.scaled_causal_softmax(x, 0.5, backend="triton"),
            lambda x: causal_softmax_reference(x, 0.5), [x], dtype)
    mask = torch.rand(2, 1, 256, sk, device="cuda") < 0.2
    compare(lambda x: K.scaled_masked_softmax(x, mask, 0.5, backend="triton"),
            lambda x: masked_softmax_reference(x, mask, 0.5), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4096, 8191])
def test_norms_gpu(dtype, n):
    x, w, b = rnd(2048, n, dtype=dtype), 1 + rnd(n, dtype=dtype, scale=0.1), rnd(n, dtype=dtype)
    compare(lambda x, w: K.rms_norm(x, w, backend="triton"), rms_norm_reference, [x, w], dtype)
    compare(lambda x, w, b: K.layer_norm(x, w, b, backend="triton"), layer_norm_reference,
            [x, w, b], dtype)


# bf16 on every case; fp16 and fp32 on one (each dtype/head-dim/causal mix is a compile).
@pytest.mark.parametrize("dtype,case", [
    (torch.bfloat16, (2, 16, 16, 2048, 128, True)), (torch.bfloat16, (2, 16, 4, 1000, 64, True)),
    (torch.bfloat16, (1, 8, 8, 1537, 128, False)), (torch.bfloat16, (2, 8, 2, 512, 32, False)),
    (torch.float16, (2, 16, 4, 1000, 64, True)), (torch.float32, (1, 4, 2, 777, 64, True))])
def test_attention_gpu(dtype, case):
    b, h, hkv, s, d, causal = case
    q, k, v = rnd(b, h, s, d, dtype=dtype), rnd(b, hkv, s, d, dtype=dtype), \
        rnd(b, hkv, s, d, dtype=dtype)
    ref = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=causal, enable_gqa=h != hkv)
    compare(lambda q, k, v: K.attention(q, k, v, causal=causal, backend="triton"), ref,
            [q, k, v], dtype, factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window_attention_gpu(dtype):
    """Mistral-like: 4096 tokens, a 1024-token window, GQA, head dim 128."""
    from megalite.kernels.attention import window_mask
    b, h, hkv, s, d, window = 1, 16, 4, 4096, 128, 1024
    q, k, v = rnd(b, h, s, d, dtype=dtype), rnd(b, hkv, s, d, dtype=dtype), \
        rnd(b, hkv, s, d, dtype=dtype)
    mask = window_mask(s, s, window, device="cuda")
    ref = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=mask, enable_gqa=True)
    compare(lambda q, k, v: K.attention(q, k, v, window=window, backend="triton"), ref,
            [q, k, v], dtype, factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_gpu_large_vocab(dtype):
    N, V = 2048, 128256
    x = rnd(N, V, dtype=dtype, scale=2)
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = -100
    ref = lambda x: F.cross_entropy(x, t, reduction="none")  # noqa: E731
    compare(lambda x: K.cross_entropy(x * 1, t, backend="triton"), ref, [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_shards_gpu(dtype):
    N, V, shards = 1024, 50001, 4
    part = -(-V // shards)
    x = rnd(N, part * shards, dtype=dtype, scale=2)
    t = torch.randint(0, V, (N,), device="cuda")
    stats = [K.shard_stats(s, t, r * part, V, backend="triton")
             for r, s in enumerate(x.split(part, -1))]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), 0)
    loss = lse - sum(s[1] for s in stats)
    rel_close(loss, F.cross_entropy(x[:, :V].float(), t, reduction="none"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_gpu(dtype):
    g, u = rnd(4096, 11008, dtype=dtype), rnd(4096, 11008, dtype=dtype)
    compare(lambda g, u: K.swiglu(g, u, backend="triton"), swiglu_reference, [g, u], dtype)
    h = rnd(4096, 2 * 5504, dtype=dtype)
    compare(lambda h: K.swiglu_packed(h, backend="triton"), swiglu_packed_reference, [h], dtype)
    x = rnd(2, 32, 2048, 128, dtype=dtype)
    ang = torch.rand(2048, 64, device="cuda") * 6
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    compare(lambda x: K.apply_rope(x, cos, sin, backend="triton"),
            lambda x: apply_rope_reference(x, cos, sin), [x], dtype)


@pytest.mark.parametrize("dtype,activation", [
    (torch.bfloat16, None), (torch.bfloat16, "gelu"), (torch.bfloat16, "gelu_tanh"),
    (torch.bfloat16, "relu"), (torch.float16, "gelu")])
def test_linear_gpu(dtype, activation):
    x, w, b = rnd(2048, 1024, dtype=dtype), rnd(3000, 1024, dtype=dtype, scale=0.03), \
        rnd(3000, dtype=dtype)
    compare(lambda x, w, b: K.linear(x, w, b, activation, backend="triton"),
            lambda x, w, b: linear_reference(x, w, b, activation), [x, w, b], dtype)


def test_linear_cross_entropy_gpu_llama_head():
    """The fused head + loss at a llama vocabulary under bf16 autocast, against the unfused
    fp32 head, and its peak memory against the unfused bf16 path (logits never stored)."""
    N, d, V = 4096, 1024, 128256
    x, w = rnd(N, d, dtype=torch.float32), rnd(V, d, dtype=torch.float32, scale=d ** -0.5)
    t = torch.randint(0, V, (N,), device="cuda")
    t[::9] = -100

    def fused(x, w):
        with torch.autocast("cuda", torch.bfloat16):
            return K.linear_cross_entropy(x, w, t)
    compare(fused, lambda x, w: linear_cross_entropy_reference(x, w, t), [x, w],
            torch.bfloat16)

    def unfused(x, w):
        with torch.autocast("cuda", torch.bfloat16):
            return F.cross_entropy((x @ w.t()).float(), t)
    mem = {}
    x = rnd(16384, d, dtype=torch.float32)  # the 16,384 tokens
    t = torch.randint(0, V, (16384,), device="cuda")
    for name, fn in (("fused", fused), ("unfused", unfused)):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        mem[name] = peak_bytes(lambda: fn(xl, wl).backward(), "cuda")
    assert mem["fused"] <= mem["unfused"] / 4, mem


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_gpu(dtype):
    from megalite.kernels.add_rms_norm import add_rms_norm_reference
    x, res, w = rnd(8192, 2048, dtype=dtype), rnd(8192, 2048, dtype=dtype), \
        1 + rnd(2048, dtype=dtype, scale=0.1)
    compare(lambda x, r, w: K.add_rms_norm(x, r, w, backend="triton")[0],
            lambda x, r, w: add_rms_norm_reference(x, r, w)[0], [x, res, w], dtype)
