"""megalite.kernels: fused ops for the hot paths, one file per op.

Every op has a torch reference that is its specification, CPU fallback and test oracle.
Each public op takes ``backend="auto" | "torch" | "triton"``: "auto" runs the Triton kernel
when the tensors are on CUDA, or on the CPU when TRITON_INTERPRET=1 is set (the Triton
interpreter, for tests), and the reference otherwise. Importing this package never needs
triton. See docs/kernels.md.

Note: the op functions share their module's name (``kernels.cross_entropy`` is the function
after this import), so import module-level helpers by name, e.g.
``from megalite.kernels.cross_entropy import shard_stats``; the vocab-parallel building
blocks are also exported here and reachable as ``kernels.cross_entropy.shard_stats``.
"""
if __name__ == "kernels":
    # Imported by its folder's name: a script or `python -m` run from the repository root has
    # the root on sys.path. That name belongs to the PyPI package `kernels` (transformers >=
    # 5.25 requires and imports it), so hand the name over to that package, or to nothing.
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [p for p in _path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        importlib.import_module("kernels")  # the import statement returns sys.modules' entry
    finally:
        sys.path[:] = _path
else:
    from ._backend import BACKENDS, HAS_TRITON, interpreting, use_triton
    from .add_rms_norm import add_rms_norm
    from .attention import attention
    from .cross_entropy import cross_entropy, shard_grad_, shard_stats
    from .grouped_matmul import grouped_matmul
    from .layer_norm import layer_norm
    from .linear import ACTIVATIONS, linear
    from .linear_cross_entropy import linear_cross_entropy
    from .rms_norm import rms_norm
    from .rope import apply_rope
    from .softmax import scaled_causal_softmax, scaled_masked_softmax
    from .swiglu import swiglu, swiglu_packed
    # Let the DESIGN-style spelling kernels.cross_entropy.shard_stats(...) work even though the
    # package attribute ``cross_entropy`` is the op, not its module.
    cross_entropy.shard_stats = shard_stats
    cross_entropy.shard_grad_ = shard_grad_

    __all__ = [
        "scaled_causal_softmax", "scaled_masked_softmax", "attention", "rms_norm", "add_rms_norm", "layer_norm",
        "cross_entropy", "shard_stats", "shard_grad_", "swiglu", "swiglu_packed", "apply_rope", "linear",
        "linear_cross_entropy", "grouped_matmul",
        "ACTIVATIONS", "BACKENDS", "HAS_TRITON", "interpreting", "use_triton",
    ]
