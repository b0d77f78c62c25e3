"""Backend selection: the env var is read at call time, triton is optional."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megalite import kernels
from megalite.kernels import use_triton


def test_backend_rule(no_interpreter, monkeypatch):
    x = torch.randn(3)
    assert not use_triton("torch", x)
    assert not use_triton("auto", x)  # CPU without the interpreter: reference
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton("triton", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("auto", x) == kernels.HAS_TRITON
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton("cuda", x)


def _rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], -1)


@pytest.mark.parametrize("interpret", [False, True])
def test_every_op_computes_its_documented_function_under_every_backend(interpret,
                                                                        monkeypatch):
    """Every public op with backend "auto" and "torch" (and, under the interpreter, "triton")
    against the formula the design documents for it, written here in plain torch (not the
    op's own reference). Without the interpreter "auto" runs the torch references, with it
    the Triton kernels. Breakage checked: swiglu's reference as silu(up) * gate fails."""
    if interpret:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 16, generator=g)
    sq = torch.randn(2, 2, 5, 5, generator=g)
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.6
    mask &= ~torch.eye(5, dtype=torch.bool)  # no fully masked row
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    logits, target = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    cos, sin = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    lin_w, lin_b = torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    expected = {
        "scaled_causal_softmax": (lambda be: kernels.scaled_causal_softmax(sq, 0.7, backend=be),
                                  torch.softmax((sq * 0.7).masked_fill(causal, -math.inf), -1)),
        "scaled_masked_softmax": (
            lambda be: kernels.scaled_masked_softmax(sq, mask, 0.7, backend=be),
            torch.softmax((sq * 0.7).masked_fill(mask, -math.inf), -1)),
        "attention": (lambda be: kernels.attention(x, x, x, backend=be),
                      torch.softmax((x @ x.transpose(-1, -2) / 4.0).masked_fill(
                          causal, -math.inf), -1) @ x),
        "rms_norm": (lambda be: kernels.rms_norm(x, w, backend=be),
                     x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
        "layer_norm": (lambda be: kernels.layer_norm(x, w, b, backend=be),
                       (x - x.mean(-1, keepdim=True))
                       / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b),
        "cross_entropy": (lambda be: kernels.cross_entropy(logits, target, backend=be),
                          torch.logsumexp(logits, -1) - logits.gather(1, target[:, None])[:, 0]),
        "swiglu": (lambda be: kernels.swiglu(x, sq.sum(-1, keepdim=True) + x, backend=be),
                   x * torch.sigmoid(x) * (sq.sum(-1, keepdim=True) + x)),
        "apply_rope": (lambda be: kernels.apply_rope(x, cos, sin, backend=be),
                       x * cos + _rotate_half(x) * sin),
        "linear": (lambda be: kernels.linear(x, lin_w, lin_b, activation="relu", backend=be),
                   torch.relu(x @ lin_w.t() + lin_b)),
    }
    backends = ("auto", "torch", "triton") if interpret else ("auto", "torch")
    for name, (op, want) in expected.items():
        for backend in backends:
            torch.testing.assert_close(op(backend), want, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}, backend={backend}: {m}")


def run_python(code, **env):
    """Run code in a fresh interpreter; TRITON_INTERPRET only if passed in env."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_and_run_without_triton():
    out = run_python("""
        import sys
        sys.modules["triton"] = None          # make `import triton` fail
        import torch
        from megalite import kernels
        assert not kernels.HAS_TRITON
        x = torch.randn(4, 8)
        kernels.rms_norm(x, torch.ones(8))   # auto -> reference
        try:
            kernels.rms_norm(x, torch.ones(8), backend="triton")
        except RuntimeError as e:
            print("error:", e)
    """, TRITON_INTERPRET="1")
    assert "needs the triton package" in out


def test_interpreter_enabled_after_import():
    # triton imported (and its jit functions decorated) before TRITON_INTERPRET is set,
    # as when another test folder imports megalite.kernels first.
    run_python("""
        import os, torch, triton
        from megalite import kernels
        from megalite.kernels.rms_norm import rms_norm_reference
        os.environ["TRITON_INTERPRET"] = "1"
        x, w = torch.randn(5, 33), torch.randn(33)
        y = kernels.rms_norm(x, w, backend="triton")
        torch.testing.assert_close(y, rms_norm_reference(x, w))
        g = torch.randn(5, 33)
        torch.testing.assert_close(kernels.swiglu(g, x, backend="triton"),
                                   torch.nn.functional.silu(g) * x)
    """)
