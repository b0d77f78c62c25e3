"""Mixed precision through its public switch (``train_step(dtype=...)``, ``--dtype``): the
16-bit format really in use, and bf16/fp16 steps against fp32 on the same weights.

These tests name only the switch, so they hold for any way of running in 16 bits (autocast
with fp32 weights today; 16-bit weights later): they check what the matmuls run in and how
far the numbers may be from fp32, not how the mode is built.

Breakages these tests were checked against (each one made in a copy, then reverted):
``precision.DTYPES["fp16"] = torch.bfloat16`` (fp16 runs as bf16) fails all three tests;
``"bf16": torch.float16`` fails the two dtype checks (train_step, command line); autocast
returning a null context for every dtype (16-bit runs as fp32) fails all three.
"""
import math
import runpy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training.precision import DynamicLossScaler
from megalite.training.step import train_step

SCRIPT = str(Path(__file__).resolve().parents[2] / "examples" / "pretrain_gpt.py")
CFG = GPTConfig(vocab_size=64, n_layers=2, n_heads=2, d_model=32, d_ff=64, max_seq_len=16,
                kernels="torch")
FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the operands of every matrix multiply that runs (after autocast's
    casts: this sees the kernels actually called)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _MATMULS:
            self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _model_and_batch():
    parallel.destroy()
    torch.manual_seed(0)
    model = GPT(CFG)
    data = torch.randint(0, CFG.vocab_size, (8, 17), generator=torch.Generator().manual_seed(1))
    return model, data[:, :-1], data[:, 1:]


def _scaler(dtype):
    return DynamicLossScaler() if dtype == "fp16" else None


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_train_step_runs_its_matmuls_in_the_chosen_format(dtype):
    """Every matmul of the step (forward and backward) runs in the chosen format and the
    linear layers' outputs are of it; master weights and their gradients stay fp32."""
    model, tokens, targets = _model_and_batch()
    outputs = set()
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.add(out.dtype))
             for m in model.modules() if type(m).__name__.endswith("ParallelLinear")]
    with MatmulDtypes() as matmuls:
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), tokens, targets,
                   micro_batch_size=4, dtype=dtype, grad_scaler=_scaler(dtype))
    for h in hooks:
        h.remove()
    assert matmuls.seen == {FORMATS[dtype]}, matmuls.seen
    assert outputs == {FORMATS[dtype]}, outputs
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="--dtype"):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), tokens, targets,
                   micro_batch_size=4, dtype="int8")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_steps_stay_within_the_formats_rounding_of_fp32(dtype):
    """Five training steps in 16 bits; before each, the same weights run one fp32 step (lr 0)
    as the reference. Bounds, from the format's machine epsilon (bf16 2^-7, fp16 2^-10):

    - gradients: relative norm error <= eps (observed about 0.5 eps for both formats:
      0.0032-0.0039 bf16, 0.00038-0.00051 fp16), and >= eps / 64, so the step did round to
      this format (fp32 would be ~1e-7, and bf16 passed off as fp16 is 8x over fp16's bound);
    - loss: relative error <= eps / 8 (observed <= 0.006 eps: the mean over 128 tokens of an
      fp32 softmax averages the logits' rounding).
    """
    eps = torch.finfo(FORMATS[dtype]).eps
    model, tokens, targets = _model_and_batch()
    ref, _, _ = _model_and_batch()
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=1e-2), _scaler(dtype)
    grad_errors, loss_errors, first_loss = [], [], None
    for _ in range(5):
        ref.load_state_dict(model.state_dict())
        full = train_step(ref, torch.optim.SGD(ref.parameters(), lr=0.0), tokens, targets,
                          micro_batch_size=4, max_grad_norm=0)
        low = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), tokens, targets,
                         micro_batch_size=4, max_grad_norm=0, dtype=dtype, grad_scaler=scaler)
        g16 = torch.cat([p.grad.flatten() for p in model.parameters()])
        g32 = torch.cat([p.grad.flatten() for p in ref.parameters()])
        grad_errors.append(((g16 - g32).norm() / g32.norm()).item())
        loss_errors.append(abs(low.loss - full.loss) / full.loss)
        first_loss = first_loss or full.loss
        step = train_step(model, opt, tokens, targets, micro_batch_size=4, dtype=dtype,
                          grad_scaler=scaler)
        assert not step.skipped and math.isfinite(step.loss)
    assert all(eps / 64 <= e <= eps for e in grad_errors), (eps, grad_errors)
    assert all(e <= eps / 8 for e in loss_errors), (eps, loss_errors)
    assert full.loss < first_loss  # and it trains


def test_the_command_line_dtype_flag_sets_the_matmul_format(monkeypatch, tmp_path):
    """--dtype through examples/pretrain_gpt.py (in this process, one step each): the linear
    layers' outputs are of the named format."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MEGALITE_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)
    main = runpy.run_path(SCRIPT, run_name="pretrain_gpt")["main"]
    outputs = []

    def record(module, args, out):
        if type(module).__name__.endswith("ParallelLinear"):
            outputs[-1].add(out.dtype)
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for dtype in ("bf16", "fp16"):
            outputs.append(set())
            assert main(["--model", "tiny", "--steps", "1", "--seq-len", "16",
                         "--global-batch-size", "2", "--micro-batch-size", "2",
                         "--dtype", dtype]) == 0
    finally:
        hook.remove()
        parallel.destroy()
    assert outputs == [{torch.bfloat16}, {torch.float16}], outputs
