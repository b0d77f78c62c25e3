"""Backend selection shared by every op: is Triton usable, and should this call use it?

Rules (DESIGN.md, principle 4):
  * ``backend="torch"``  -> the torch reference, always.
  * ``backend="triton"`` -> the Triton kernel; a clear error if it cannot run here.
  * ``backend="auto"``   -> Triton when the tensors are on CUDA, or when they are on the CPU
    and ``TRITON_INTERPRET=1`` is set (read at call time), else the reference.

Importing this module never requires triton: without it, ``jit`` returns a placeholder
whose kernels are never launched, because dispatch never picks Triton.

Why a lazy ``jit`` instead of ``triton.jit``: ``triton.jit`` decides *when the module is
imported* whether a kernel is compiled or interpreted (it reads ``TRITON_INTERPRET`` then).
Other test folders may import megalite.kernels before tests/kernels sets the variable, and a
GPU test run mixes CPU (interpreted) and CUDA (compiled) tensors in one process. So the
choice is made per launch from the tensors' device instead.
"""
import contextlib
import os
import sys

import torch

try:  # triton is optional (pip install megalite[triton])
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    HAS_TRITON = False

    class _TlPlaceholder:
        """Lets kernel signatures (``BLOCK: tl.constexpr``) be defined without triton."""
        constexpr = object
        float32 = float16 = bfloat16 = int32 = int64 = None

    tl = _TlPlaceholder()

BACKENDS = ("auto", "torch", "triton")


def interpreting():
    """True when TRITON_INTERPRET is set now (not when this module was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(backend, *tensors):
    """Decide whether an op call runs its Triton kernel; raise on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    runnable = HAS_TRITON and (on_cuda or (on_cpu and interpreting()))
    if backend == "triton" and not runnable:
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: "
                               "pip install 'megalite[triton]' (or use backend='auto').")
        if not (on_cuda or on_cpu):
            raise ValueError("backend='triton': all tensors must be on the same device "
                             f"type, got {[str(t.device) for t in tensors]}")
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "(the Triton interpreter); or move the tensors to CUDA.")
    return runnable


class jit:
    """``triton.jit`` replacement that picks compiled vs interpreted at each launch.

    ``configs``/``key`` turn on ``triton.autotune`` for compiled launches. The interpreter
    cannot autotune, so interpreted launches take ``interpret_meta`` (block sizes) as the
    meta-parameters instead; callers therefore never pass autotuned meta-parameters.
    """

    def __init__(self, fn=None, *, configs=None, key=None, interpret_meta=None):
        self.configs, self.key, self.interpret_meta = configs, key, interpret_meta or {}
        self._compiled = self._interpreted = None
        self.fn = fn

    def __call__(self, fn):  # used as @jit(configs=...)
        self.fn = fn
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            interpret = not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            if not interpret:
                return self._compiler()[grid](*args, **kwargs)
            with _interpretable_stdlib():
                return self._interpreter()[grid](*args, **{**self.interpret_meta, **kwargs})
        return launch

    def _interpreter(self):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def _compiler(self):
        if self._compiled is None:
            from triton.runtime.jit import JITFunction
            kernel = JITFunction(self.fn)
            if self.configs:
                kernel = triton.autotune(configs=self.configs, key=self.key)(kernel)
            self._compiled = kernel
        return self._compiled


_STDLIB_TWINS = None


@contextlib.contextmanager
def _interpretable_stdlib():
    """Let an interpreted kernel call triton's own jit functions (tl.sum, tl.max, ...).

    Those are decorated when triton is imported; if TRITON_INTERPRET was unset then, they
    are compiled-mode JITFunctions that the interpreter refuses to call. For the duration of
    an interpreted launch, swap each for an interpreted twin (restored afterwards, so
    compiled launches in the same process are unaffected).
    """
    global _STDLIB_TWINS
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    if _STDLIB_TWINS is None:
        owners = [m for name, m in list(sys.modules.items())
                  if name.startswith("triton.language") and m is not None] + [tl.tensor]
        _STDLIB_TWINS = [(owner, name, fn, InterpretedFunction(fn.fn))
                         for owner in owners for name, fn in list(vars(owner).items())
                         if isinstance(fn, JITFunction)]
    for owner, name, _, twin in _STDLIB_TWINS:
        setattr(owner, name, twin)
    try:
        yield
    finally:
        for owner, name, fn, _ in _STDLIB_TWINS:
            setattr(owner, name, fn)


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype):
    """tl.dot precision for fp32 inputs that follows torch's own matmul setting."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def cdiv(a, b):
    return (a + b - 1) // b


def num_sms(t):
    """Streaming multiprocessors of t's GPU; a small number for interpreted (CPU) launches,
    where every program instance costs milliseconds."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 4


def upcast(t):
    """The compute dtype of the references: fp32 for 16/32-bit inputs, fp64 kept (so the
    references can be gradchecked in double precision)."""
    return t if t.dtype == torch.float64 else t.float()
