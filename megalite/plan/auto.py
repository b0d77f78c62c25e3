"""The planner's pick: the fastest layout that fits, why, and the flags that run it.

``--layout auto`` (the trainer) takes :func:`choose_layout`'s layout: the first of the
planner's ranking (:func:`~megalite.plan.search.search`), which ``python -m megalite.plan``
prints with :func:`launch_command`'s ready-to-run line.

    from megalite.models import GPTConfig
    from megalite.plan.auto import choose_layout
    choice = choose_layout(GPTConfig.preset("llama-7b"), gpus=8, gpu="h100", seq_len=4096,
                           global_batch_size=128, memory_budget=80e9)
    print(choice.why); print(" ".join(choice.flags))
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megalite.models.config import GPTConfig

from megalite.plan.gpus import GPU, get_gpu
from megalite.plan.layout import Layout
from megalite.plan.search import Candidate, search

GIB = 2**30


@dataclass
class LayoutChoice:
    layout: Layout
    why: str                # one line: the choice, its predicted speed and memory, the field
    flags: list[str]        # the trainer's layout flags for it
    candidate: Candidate    # the planner's figures (memory, step time)


def layout_flags(layout: Layout) -> list[str]:
    """The trainer flags (``--tp --pp --schedule ... --cp --ep --fsdp``) that run
    ``layout``; the precision (``--dtype``, ``--autocast``) is the caller's, not chosen."""
    flags = ["--tp", str(layout.tp), "--pp", str(layout.pp),
             "--micro-batch-size", str(layout.micro_batch_size), "--schedule", layout.schedule]
    if layout.virtual_stages:
        flags += ["--virtual-stages", str(layout.virtual_stages)]
    if layout.sequence_parallel:
        flags.append("--sequence-parallel")
    if layout.recompute != "none":
        flags += ["--recompute", layout.recompute]
    if layout.recompute_layers:
        flags += ["--recompute-layers", str(layout.recompute_layers)]
    if layout.distributed_optimizer:
        flags.append("--distributed-optimizer")
    if layout.cp > 1:
        flags += ["--cp", str(layout.cp)]
        if layout.cp_comm != "ring":
            flags += ["--cp-comm", layout.cp_comm]
    if layout.ep > 1:
        flags += ["--ep", str(layout.ep)]
    if layout.fsdp:
        flags.append("--fsdp")
    return flags


def choose_layout(cfg: GPTConfig, gpus: int, gpu: GPU | str, seq_len: int,
                  global_batch_size: int, memory_budget: float | None = None,
                  **options) -> LayoutChoice:
    """The planner's best layout of ``gpus`` processes: the lowest predicted step time among
    those whose every rank fits ``memory_budget`` bytes (None: the GPU's memory; ``inf``:
    rank by speed alone). ``options`` go to :func:`~megalite.plan.search.search` (``dtype``,
    ``fused_loss``, ``kernels``, ...). ValueError, with the closest misses, when none fits."""
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    budget = gpu.memory if memory_budget is None else memory_budget
    fits, rejected = search(cfg, gpus, gpu, seq_len, global_batch_size, memory_budget=budget,
                            **options)
    if not fits:
        misses = sorted((c for c in rejected if c.memory is not None),
                        key=lambda c: c.memory.total)
        invalid = [c for c in rejected if c.memory is None]
        closest = (misses or invalid)[0] if rejected else None
        raise ValueError(f"no layout of {gpus} processes fits"
                         + (f" {budget / GIB:.1f} GiB" if budget != float("inf") else "")
                         + (f"; closest: {closest.layout.describe()} {closest.rejected}"
                            if closest else ""))
    best = fits[0]
    kinds = Counter(c.rejected.split(":")[0] for c in rejected)
    field = f"{len(fits)} of {len(fits) + len(rejected)} layouts " + (
        "fit" if budget != float("inf") else "are valid")
    if kinds:
        field += " (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
    memory = (f"{best.memory.worst.total / GIB:.3g} GiB per rank"
              + (f" of {budget / GIB:.1f}" if budget != float("inf") else ", memory unbounded"))
    why = (f"{best.layout.describe()}: the fastest predicted on {gpu.name} "
           f"({best.time.step:.3g} s per step, MFU {best.time.mfu:.1%}, {memory}); {field}")
    if len(fits) > 1:
        runner_up = fits[1]
        why += (f"; next: {runner_up.layout.describe()} "
                f"({runner_up.time.step / best.time.step - 1:+.1%})")
    return LayoutChoice(best.layout, why, layout_flags(best.layout), best)


def launch_command(model: str, layout: Layout, gpus_per_node: int, **flags) -> str:
    """A ready-to-run command line for ``layout``: torchrun on one node, or the per-node
    line of a multi-node launch (docs/training.md), then the trainer's flags."""
    nodes = max(1, -(-layout.gpus // gpus_per_node))
    if layout.gpus % nodes:  # torchrun starts the same number of processes on every node
        raise ValueError(f"{layout.gpus} GPUs do not split evenly over {nodes} nodes of "
                         f"{gpus_per_node}: use a multiple of {gpus_per_node} GPUs")
    per_node = layout.gpus // nodes
    launcher = f"torchrun --nproc-per-node {per_node}"
    if nodes > 1:
        launcher += (f" --nnodes {nodes} --node-rank $NODE_RANK --master-addr $MASTER_ADDR "
                     f"--master-port 29500")
    rest = [f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if v is not None]
    if layout.autocast:
        rest.append("--autocast")
    return " ".join([launcher, "-m megalite.train", f"--model {model}", *rest,
                     *layout_flags(layout)])


__all__ = ["LayoutChoice", "choose_layout", "launch_command", "layout_flags"]
