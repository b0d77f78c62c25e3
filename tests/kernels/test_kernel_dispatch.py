"""Backend selection: the env var is read at call time, triton is optional."""
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


def test_every_op_accepts_backend_keyword(no_interpreter):
    x = torch.randn(2, 2, 4, 16)
    w = torch.ones(16)
    t = torch.tensor([1, 2])
    for backend in ("auto", "torch"):
        kernels.scaled_causal_softmax(x, 1.0, backend=backend)
        kernels.scaled_masked_softmax(x, x > 0, 1.0, backend=backend)
        kernels.attention(x, x, x, backend=backend)
        kernels.rms_norm(x, w, backend=backend)
        kernels.layer_norm(x, w, w, backend=backend)
        kernels.cross_entropy(x[0, 0, :2], t, backend=backend)
        kernels.swiglu(x, x, backend=backend)
        kernels.apply_rope(x, x[0, 0], x[0, 0], backend=backend)
        kernels.linear(x, torch.ones(3, 16), backend=backend)


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
