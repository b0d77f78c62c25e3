"""Mixed precision: the two modes, and fp16 loss scaling (docs/precision.md).

* 16-bit parameters (``--dtype bf16|fp16``, ``GPTConfig(params_dtype=...)``, Megatron's
  ``--bf16``): weights, activations, the residual stream and pipeline transfers are 16-bit;
  norm weights and the loss stay fp32; gradients accumulate in fp32 main-gradient buffers
  and the optimizer steps fp32 main weights (:mod:`megalite.parallel.distributed_optimizer`).
  :func:`activation_dtype` is the dtype the pipeline moves.
* autocast (``--autocast --dtype bf16|fp16``): fp32 parameters, gradients and optimizer;
  the matmuls run in 16 bits under ``torch.autocast`` (:func:`autocast`).

fp16's narrow range needs the loss scaled up before backward in both modes;
:class:`DynamicLossScaler` halves the scale and skips the step when any rank sees an inf/NaN
gradient, and doubles it after ``growth_interval`` clean steps.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megalite.parallel import comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def activation_dtype(model) -> torch.dtype:
    """What ``model``'s stages hand each other: its parameters' dtype (``model.dtype``, set
    by GPT from ``params_dtype``), fp32 for a model that does not say."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def autocast(dtype: str, device: torch.device):
    """The forward/backward context for ``--dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 backoff: float = 0.5, growth: float = 2.0, min_scale: float = 1.0):
        self.scale_value, self.growth_interval = init_scale, growth_interval
        self.backoff, self.growth, self.min_scale = backoff, growth, min_scale
        self.clean_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, params, ps) -> bool:
        """Divide gradients by the scale; True when every rank's gradients are finite.
        ``params``: parameters with ``.grad``, or a model's ``MainGrads``."""
        if hasattr(params, "unscale_"):
            return params.unscale_(1.0 / self.scale_value)
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1, device=ps.device)
        for g in grads:
            g.mul_(1.0 / self.scale_value)
            found += (~torch.isfinite(g)).any().float()
        comm.all_reduce(found, dist.group.WORLD, op=dist.ReduceOp.MAX)  # every rank agrees
        return found.item() == 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale_value = max(self.min_scale, self.scale_value * self.backoff)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale_value *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self.clean_steps = state["scale"], state["clean_steps"]
