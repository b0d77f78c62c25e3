"""What a model must offer to be trained by :class:`megalite.training.trainer.Trainer` (and
:func:`megalite.training.train_step`, and saved by :mod:`megalite.training.checkpoint`).

:class:`megalite.models.GPT` implements it; ``examples/custom_lm.py`` is a model written from
megalite's parallel layers that does too. The model is this rank's part: the pipeline
stages it holds, their weights TP-sharded by the parallel layers.

Checkpoints need no method of their own for the weights: they save every parameter under its
``named_parameters()`` name as the full (tp=1) tensor, gathered and re-sharded through the
layout that megalite's parallel layers attach to each parameter (``tp_dim``..., see
:mod:`megalite.parallel.sharding`); plain ``nn`` parameters are replicated over tp. So names
must be global (the same parameter has the same name whatever the layout: index layers by
their global position) and a parameter must be initialized the same whatever the layout
(for example from a seed derived from its name or global index), for two layouts to train
the same model.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from megalite.parallel.context import check_context_model
from megalite.parallel.state import ParallelState


@runtime_checkable
class TrainableModel(Protocol):
    ps: ParallelState        # the process groups the model was built in
    stages: list[int]        # the global pipeline stages this rank holds, ascending
    num_stages: int          # stages in the whole pipeline (pp x stages per rank)

    def parameters(self, recurse: bool = True): ...          # as nn.Module
    def named_parameters(self, *args, **kwargs): ...          # global names (see above)

    def stage_modules(self) -> dict[int, Callable]:
        """{stage: callable}: stage 0 takes tokens ``[batch, seq]``, the others the previous
        stage's output; every stage but the last returns ``activation_shape``."""

    def activation_shape(self, micro_batch_size: int, seq_len: int) -> tuple[int, ...]:
        """Shape of what one stage hands the next (and receives back as a gradient)."""

    def loss(self, output, targets: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one microbatch from the last stage's output."""

    def shared_embedding_params(self) -> list[torch.nn.Parameter]:
        """Parameters held by both the first and the last stage's ranks (a tied embedding),
        whose gradients are summed across them; [] when nothing is shared."""

    def checkpoint_config(self) -> dict:
        """A JSON-able description of the model, saved in each checkpoint's meta.json."""

    def check_checkpoint_config(self, saved: dict) -> None:
        """Raise ValueError("another model: ...") when ``saved`` (a checkpoint's
        ``checkpoint_config()``) describes a model whose tensors do not fit this one."""


# Optional: ``stage_parameters() -> {stage: [params]}`` lets data parallelism start reducing
# a stage's gradients as soon as its backward ends (else it waits for the whole rank);
# ``flops_per_token(seq_len)`` gives the metrics an ``mfu``; a ``loss`` marked
# ``accepts_head_input`` gets what ``stage_modules(head_input=True)`` returns (GPT's fused
# head and loss). ``supports_context_parallel = True`` says the model runs on a cp rank's
# chunks of each sequence (context-parallel attention and positions); without it cp > 1 is
# refused.


def check_trainable(model) -> None:
    """Raise a TypeError naming what ``model`` lacks of :class:`TrainableModel`, and a
    ValueError when its ``ps`` has cp > 1 and the model does not declare
    ``supports_context_parallel = True``."""
    missing = [name for name in ("ps", "stages", "num_stages", "parameters", "named_parameters",
                                 "stage_modules", "activation_shape", "loss",
                                 "shared_embedding_params", "checkpoint_config",
                                 "check_checkpoint_config") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} cannot be trained by megalite: it lacks "
                        f"{', '.join(missing)} (see megalite.training.trainable.TrainableModel)")
    check_context_model(model, model.ps.cp)
