"""The benchmark sweep: for each op, the sizes, the work per mode and the providers.

A case's ``work`` maps a mode ("fwd", "bwd", "fwd+bwd") to the bytes a perfectly fused
implementation must move (memory-bound ops, reported as GB/s) or the FLOPs it must do
(attention and linear, reported as TFLOP/s). Every provider is charged the same work, so the
numbers compare like "effective bandwidth" in the Triton tutorials and Liger-Kernel.

Providers: "triton" (megalite), "torch" (eager PyTorch: the reference, or the plain
PyTorch call a user would write), "compile" (torch.compile of the same eager function,
dynamic shapes so each op compiles once) and, for attention, "sdpa_flash".
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import importlib

# The package re-exports each op under its module's name, so `from . import rms_norm` would
# give the function; fetch the modules themselves.
_attn, _ce, _ln, _lin, _rms, _rope, _sm, _sw, _lce, _gmm = (
    importlib.import_module(f"{__package__}.{name}") for name in
    ("attention", "cross_entropy", "layer_norm", "linear", "rms_norm", "rope", "softmax",
     "swiglu", "linear_cross_entropy", "grouped_matmul"))

OPS = ("softmax", "rms_norm", "layer_norm", "attention", "cross_entropy", "swiglu", "rope",
       "linear", "linear_cross_entropy", "grouped_matmul")


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    unit: str                      # "GB/s" or "TFLOP/s"
    work: dict                     # mode -> bytes or flops
    make_inputs: object            # () -> list of tensors (float ones get requires_grad)
    providers: dict = field(default_factory=dict)  # name -> fn(*inputs) -> tensor
    measure_memory: bool = False   # record peak memory of fwd+bwd (cross-entropy)
    cpu_providers: tuple = ("torch",)  # the providers worth timing on the CPU


_COMPILED = {}


def compiled(op, fn):
    """One torch.compile per op (dynamic shapes), shared by all sizes of the sweep."""
    if op not in _COMPILED:
        # The backward rows call autograd.grad on a graph kept with retain_graph; AOT
        # autograd's donated buffers refuse that ("compiled with non-empty donated buffers").
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False
        _COMPILED[op] = torch.compile(fn, dynamic=True)
    return _COMPILED[op]


def _rand(device, dtype):
    def make(*shape, scale=1.0, grad=True):
        t = torch.randn(*shape, device=device, dtype=dtype) * scale
        return t.requires_grad_(grad)
    return make


def eager_attention(q, k, v, causal=True):
    """Textbook attention in eager PyTorch (materialises the [s, s] scores)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _sdpa_flash(causal):
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return run


def routed_group_sizes(rows, experts, skew, seed=0):
    """Tokens per expert of a router whose expert probabilities are softmax(skew * noise):
    skew 0 is perfectly balanced, 1 a typical imbalance early in training."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(skew * torch.randn(experts, generator=g), 0)
    sizes = (p * rows).floor().long()
    sizes[p.argmax()] += rows - sizes.sum()
    return sizes


def per_expert_loop(x, weight, sizes):
    """The eager PyTorch a user would write: one matmul per expert, in the input dtype, with
    the group sizes already on the host (the loop's best case: no sync is charged), and
    ``unbind`` (``weight[e]``'s backward would write E full-size zero gradients)."""
    return torch.cat([xe @ we for xe, we in zip(x.split(sizes), weight.unbind(0))])


def grouped_mm_provider(offsets):
    """torch._grouped_mm (torch >= 2.8; CUDA bf16 on sm90+, CPU in recent versions), or None."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    return lambda x, w: torch._grouped_mm(x, w, offs=offsets)


def cases(op, device, dtype, quick=False):
    """The sweep for one op. ``quick``: one size (CPU timings, smoke runs)."""
    r = _rand(device, dtype)
    e = torch.tensor([], dtype=dtype).element_size()
    tiny = device == "cpu"
    out = []

    if op == "softmax":
        sizes = [(2, 4, 128)] if tiny else [(4, 8, 1024), (4, 8, 2048), (2, 8, 4096)]
        for b, h, s in sizes[:1] if quick else sizes:
            n = b * h * s * s
            out.append(Case(op, f"{b}x{h}x{s}x{s}", dtype, "GB/s",
                            {"fwd": 2 * n * e, "bwd": 3 * n * e, "fwd+bwd": 5 * n * e},
                            lambda b=b, h=h, s=s: [r(b, h, s, s, scale=3)], {
                "triton": lambda x: _sm.scaled_causal_softmax(x, 0.125, backend="triton"),
                "torch": lambda x: _sm.causal_softmax_reference(x, 0.125),
                "compile": lambda x: compiled(op, _sm.causal_softmax_reference)(x, 0.125)}))

    elif op in ("rms_norm", "layer_norm"):
        sizes = [(256, 512)] if tiny else [(131072, 1024), (32768, 4096), (16384, 8192)]
        for m, n in sizes[:1] if quick else sizes:
            mn = m * n
            if op == "rms_norm":
                mk = lambda m=m, n=n: [r(m, n), 1 + r(n, scale=0.1)]  # noqa: E731
                prov = {"triton": lambda x, w: _rms.rms_norm(x, w, backend="triton"),
                        "torch": _rms.rms_norm_reference,
                        "compile": lambda x, w: compiled(op, _rms.rms_norm_reference)(x, w)}
            else:
                mk = lambda m=m, n=n: [r(m, n), 1 + r(n, scale=0.1), r(n)]  # noqa: E731
                prov = {"triton": lambda x, w, b: _ln.layer_norm(x, w, b, backend="triton"),
                        # eager baseline: PyTorch's own LayerNorm kernel
                        "torch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
                        "compile": lambda x, w, b: compiled(op, _ln.layer_norm_reference)(
                            x, w, b)}
            out.append(Case(op, f"{m}x{n}", dtype, "GB/s",
                            {"fwd": 2 * mn * e, "bwd": 3 * mn * e, "fwd+bwd": 5 * mn * e},
                            mk, prov))

    elif op == "attention":
        # (batch, heads, kv_heads, seq, head_dim, causal)
        sizes = [(1, 2, 2, 128, 64, True)] if tiny else [
            (8, 16, 16, 1024, 128, True), (4, 16, 16, 2048, 128, True),
            (2, 16, 16, 4096, 128, True), (4, 16, 16, 2048, 64, True),
            (4, 16, 16, 2048, 128, False), (4, 32, 8, 2048, 128, True)]
        for b, h, hkv, s, d, causal in sizes[:1] if quick else sizes:
            fwd = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
            label = f"b{b} h{h}/{hkv} s{s} d{d} {'causal' if causal else 'full'}"
            prov = {"triton": lambda q, k, v, c=causal: _attn.attention(q, k, v, c,
                                                                       backend="triton"),
                    "torch": lambda q, k, v, c=causal: eager_attention(q, k, v, c),
                    "compile": lambda q, k, v, c=causal: compiled(op, eager_attention)(
                        q, k, v, c)}
            if device == "cuda":
                prov["sdpa_flash"] = _sdpa_flash(causal)
            out.append(Case(op, label, dtype, "TFLOP/s",
                            {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd},
                            lambda b=b, h=h, hkv=hkv, s=s, d=d: [r(b, h, s, d), r(b, hkv, s, d),
                                                              r(b, hkv, s, d)], prov))

    elif op == "cross_entropy":
        sizes = [(64, 1000)] if tiny else [(8192, 32000), (8192, 128256), (16384, 128256)]
        for n, v in sizes[:1] if quick else sizes:
            t = torch.randint(0, v, (n,), device=device)
            nv = n * v
            # The Triton op writes its gradient into the logits buffer; a view makes the
            # benchmark's leaf tensor look like an LM head's output (a non-leaf).
            out.append(Case(op, f"{n}x{v}", dtype, "GB/s",
                            {"fwd": nv * e, "bwd": 2 * nv * e, "fwd+bwd": 3 * nv * e},
                            lambda n=n, v=v: [r(n, v, scale=2)], {
                "triton": lambda x, t=t: _ce.cross_entropy(x.view_as(x), t, backend="triton"),
                "torch": lambda x, t=t: F.cross_entropy(x, t, reduction="none"),
                "compile": lambda x, t=t: compiled(op, F.cross_entropy)(x, t, reduction="none")},
                measure_memory=device == "cuda"))

    elif op == "swiglu":
        sizes = [(64, 256)] if tiny else [(8192, 11008), (16384, 14336)]
        for m, n in sizes[:1] if quick else sizes:
            mn = m * n
            out.append(Case(op, f"{m}x{n}", dtype, "GB/s",
                            {"fwd": 3 * mn * e, "bwd": 5 * mn * e, "fwd+bwd": 8 * mn * e},
                            lambda m=m, n=n: [r(m, n), r(m, n)], {
                "triton": lambda g, u: _sw.swiglu(g, u, backend="triton"),
                "torch": lambda g, u: F.silu(g) * u,
                "compile": lambda g, u: compiled(op, _sw.swiglu_reference)(g, u)}))

    elif op == "rope":
        sizes = [(1, 4, 64, 64)] if tiny else [(4, 32, 2048, 128), (8, 32, 4096, 128)]
        for b, h, s, d in sizes[:1] if quick else sizes:
            n = b * h * s * d
            ang = torch.rand(s, d // 2, device=device) * 6
            cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), \
                torch.cat([ang, ang], -1).sin().to(dtype)
            out.append(Case(op, f"{b}x{h}x{s}x{d}", dtype, "GB/s",
                            {"fwd": 2 * n * e, "bwd": 2 * n * e, "fwd+bwd": 4 * n * e},
                            lambda b=b, h=h, s=s, d=d: [r(b, h, s, d)], {
                "triton": lambda x, c=cos, s_=sin: _rope.apply_rope(x, c, s_, backend="triton"),
                "torch": lambda x, c=cos, s_=sin: x * c + _rope.rotate_half(x) * s_,
                "compile": lambda x, c=cos, s_=sin: compiled(op, _rope.apply_rope_reference)(
                    x, c, s_)}))

    elif op == "linear":
        sizes = [(128, 256, 128)] if tiny else [(4096, 4096, 4096), (8192, 8192, 4096),
                                                (8192, 11008, 4096)]
        for m, n, k in sizes[:1] if quick else sizes:
            act = "gelu_tanh"
            out.append(Case(op, f"{m}x{n}x{k} +bias {act}", dtype, "TFLOP/s",
                            {"fwd": 2 * m * n * k, "bwd": 4 * m * n * k, "fwd+bwd": 6 * m * n * k},
                            lambda m=m, n=n, k=k: [r(m, k), r(n, k, scale=k ** -0.5), r(n)], {
                "triton": lambda x, w, b: _lin.linear(x, w, b, act, backend="triton"),
                "torch": lambda x, w, b: _lin.linear_reference(x, w, b, act),
                "compile": lambda x, w, b: compiled(op, _lin.linear_reference)(x, w, b, act)}))
    elif op == "linear_cross_entropy":
        # (tokens, d_model, vocab): the output head + loss of llama-1b at 16,384 tokens.
        sizes = [(1024, 64, 8192)] if tiny else [(16384, 2048, 128256), (8192, 4096, 32000)]
        for n, d, v in sizes[:1] if quick else sizes:
            t = torch.randint(0, v, (n,), device=device)
            mm = 2 * n * d * v  # one [n, d] x [d, v] matmul; fwd 1, bwd 2 (unfused)
            out.append(Case(op, f"{n}x{d}x{v}", dtype, "TFLOP/s",
                            {"fwd": mm, "bwd": 2 * mm, "fwd+bwd": 3 * mm},
                            lambda n=n, d=d, v=v: [r(n, d), r(v, d, scale=d ** -0.5)], {
                "fused": lambda x, w, t=t: _lce.linear_cross_entropy(x, w, t),
                "torch": lambda x, w, t=t: F.cross_entropy((x @ w.t()).float(), t),
                "compile": lambda x, w, t=t: compiled(op, _lce.linear_cross_entropy_reference)(
                    x, w, t)},
                measure_memory=True, cpu_providers=("torch", "fused")))
    elif op == "grouped_matmul":
        # (routed rows = tokens x top-k, experts, K, N, routing skew): Mixtral-8x7B's fused
        # gate/up and down projections at 8k tokens x top-2; Qwen3-30B-A3B's (128 experts,
        # expert d_ff 768) at 8k tokens x top-8.
        sizes = [(64, 4, 32, 48, None)] if tiny else [
            (16384, 8, 4096, 28672, 0.3), (16384, 8, 14336, 4096, 0.3),
            (16384, 8, 14336, 4096, 1.0), (65536, 128, 2048, 1536, 0.5),
            (65536, 128, 768, 2048, 0.5)]
        for t, ne, k, n, skew in sizes[:1] if quick else sizes:
            # the CPU case has an empty expert and K, N off the interpreter's blocks
            group = torch.tensor([20, 0, 37, 7]) if skew is None else \
                routed_group_sizes(t, ne, skew)
            host, dev_sizes = group.tolist(), group.to(device)
            offsets = torch.cumsum(dev_sizes, 0).to(torch.int32)
            prov = {"triton": lambda x, w, g=dev_sizes: _gmm.grouped_matmul(x, w, g,
                                                                             backend="triton"),
                    "torch": lambda x, w, h=host: per_expert_loop(x, w, h)}
            if grouped_mm_provider(offsets):
                prov["grouped_mm"] = grouped_mm_provider(offsets)
            flops = 2 * t * k * n
            label = f"T{t} E{ne} {k}x{n}" + ("" if skew is None else f" skew{skew}")
            out.append(Case(op, label, dtype, "TFLOP/s",
                            {"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
                            lambda t=t, ne=ne, k=k, n=n: [r(t, k), r(ne, k, n, scale=k ** -0.5)],
                            prov, cpu_providers=tuple(p for p in ("torch", "grouped_mm")
                                                      if p in prov)))
    else:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    return out
