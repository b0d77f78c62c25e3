"""``--layout auto``: the trainer asks the planner (:func:`megalite.plan.auto.choose_layout`)
for the fastest layout of this world that fits the GPU memory, prints why, and runs it.

The planner models GPUs: on a GPU the device (its table entry, else the H100) and its memory
(or ``--gpu-memory``); on CPU, where there is no GPU memory, the layout is ranked by the
predicted step time on an H100 with memory unbounded, or bounded by ``--gpu-memory`` when it
is given. The layout flags are the planner's to choose: giving one too is refused.
"""
from __future__ import annotations

import os

import torch

from megalite import plan
from megalite.models import GPTConfig
from megalite.parallel.state import cuda_selected
from megalite.plan.auto import LayoutChoice, choose_layout

# The flags --layout auto sets; one of them given as well is a usage error.
CHOSEN_FLAGS = ("--tp", "--pp", "--schedule", "--virtual-stages", "--schedule-file",
                "--micro-batch-size", "--sequence-parallel", "--recompute",
                "--recompute-layers", "--distributed-optimizer", "--cp", "--cp-comm", "--ep",
                "--fsdp")
# Dimensions the planner may choose when this trainer has their flag (else held at none).
SEARCHED = ("cp", "cp_comm", "ep", "fsdp")


def conflicting_flags(argv: list[str]) -> list[str]:
    """The CHOSEN_FLAGS among the command line's tokens (``--tp 2`` or ``--tp=2``)."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    return [flag for flag in CHOSEN_FLAGS if flag in given]


def plan_extras(args) -> dict:
    """The planner's precision mode and cp / ep / FSDP for these flags. A trainer without
    the --autocast flag runs bf16/fp16 under autocast; one without --cp / --ep / --fsdp
    runs none of them (getattr: the flags arrive with their own branches)."""
    return dict(autocast=args.dtype != "fp32" and getattr(args, "autocast", True),
                cp=getattr(args, "cp", 1), ep=getattr(args, "ep", 1),
                cp_comm=getattr(args, "cp_comm", "ring"), fsdp=getattr(args, "fsdp", False))


def choose_for_run(args, world_size: int, memory_budget: float | None,
                   cfg: GPTConfig) -> LayoutChoice:
    """The planner's layout of the model ``cfg`` for these flags on ``world_size``
    processes (ValueError when none fits)."""
    gpu = plan.gpu_for_device(torch.cuda.get_device_name(
        int(os.environ.get("LOCAL_RANK", "0")))) if cuda_selected() else None
    cfg = cfg.replace(kernels=args.kernels, dropout=args.dropout)
    extras = plan_extras(args)
    fixed = {name: extras[name] for name in SEARCHED if not hasattr(args, name)}
    return choose_layout(cfg, world_size, gpu or "h100", args.seq_len, args.global_batch_size,
                         memory_budget if memory_budget is not None else float("inf"),
                         dtype=args.dtype, autocast=extras["autocast"],
                         kernels="torch" if args.kernels == "torch" else "triton", **fixed)


def apply(args, choice: LayoutChoice) -> None:
    """Set the layout flags of ``args`` to the chosen layout."""
    L = choice.layout
    args.tp, args.pp, args.micro_batch_size = L.tp, L.pp, L.micro_batch_size
    args.schedule, args.virtual_stages, args.schedule_file = L.schedule, L.virtual_stages, None
    args.sequence_parallel, args.distributed_optimizer = L.sequence_parallel, \
        L.distributed_optimizer
    args.recompute, args.recompute_layers = L.recompute, L.recompute_layers
    for name in SEARCHED:
        if hasattr(args, name):
            setattr(args, name, getattr(L, name))
