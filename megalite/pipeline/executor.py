"""One executor runs any valid action list on this rank's pipeline stage.

``run_schedule`` walks the rank's list in order. ``F`` receives the previous stage's
activation (or takes the microbatch input on the first stage), runs the stage, and queues
the output for the next stage (or computes the loss, scaled by 1/m, on the last). ``B``
receives the output's gradient (or starts from the loss), back-propagates through the stage,
and queues the input's gradient for the previous stage. Transfers are in :mod:`p2p`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.autograd.variable import Variable

from megalite.parallel import comm
from megalite.pipeline.p2p import StageP2P
from megalite.pipeline.schedules import parse_action


@dataclass
class PipelineResult:
    loss: torch.Tensor          # mean loss over the microbatches, on every pipeline rank
    peak_live: int              # most microbatches forwarded but not yet backwarded
    spans: list = field(default_factory=list)   # (rank, name, kind, start, end) if traced


def _free_storage(t: torch.Tensor) -> None:
    """Drop an activation's memory but keep its autograd node (Megatron's trick): the
    backward pass needs only the node, and the gradient arrives from the next stage."""
    t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def _backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None:
        output.backward()
    else:  # the engine call skips the shape check against the freed output
        Variable._execution_engine.run_backward((output,), (grad,), False, False, (), True, True)


def _needs_recv(action, ps) -> bool:
    return (action.kind == "F" and ps.pp_rank > 0) or \
        (action.kind == "B" and ps.pp_rank < ps.pp - 1)


def run_schedule(actions: Sequence[str], stage: torch.nn.Module, ps, *,
                 num_microbatches: int, activation_shape: Sequence[int],
                 activation_dtype: torch.dtype = torch.float32,
                 inputs: Sequence[torch.Tensor] | None = None,
                 targets: Sequence | None = None,
                 loss_fn: Callable | None = None,
                 verbose: bool = False, trace: bool = False,
                 free_outputs: bool = True) -> PipelineResult:
    """Run this rank's compute actions (``["0F0", "0F1", "0B0", ...]``) on ``stage``.

    ``inputs[i]`` is microbatch i's input (first stage only), ``targets[i]`` its target
    (last stage only); ``loss_fn(output, target)`` returns a scalar. ``activation_shape``
    is the shape every stage sends forward (and receives as gradient): the executor checks
    outputs against it before sending, so a mismatch is an error, not a hang. Accumulates
    parameter gradients; returns the mean loss, known on every pipeline rank.
    ``free_outputs`` releases each sent activation's memory (the stage's last op must not
    save its own output for backward, true of residual blocks).
    """
    m, shape = num_microbatches, tuple(activation_shape)
    first, last = ps.pp_rank == 0, ps.pp_rank == ps.pp - 1
    if first and (inputs is None or len(inputs) < m):
        raise ValueError(f"the first stage needs {m} microbatch inputs")
    if last and (targets is None or loss_fn is None or len(targets) < m):
        raise ValueError(f"the last stage needs {m} targets and a loss_fn")
    parsed = [parse_action(a) for a in actions]
    for a in parsed:
        if a.stage != ps.pp_rank or a.kind == "W" or a.microbatch >= m:
            raise ValueError(f"rank {ps.rank} (stage {ps.pp_rank}) cannot run {a}: this executor "
                             f"runs one stage per rank, F and full B, microbatches < {m}")
    done = set()
    for a in parsed:
        if (a.kind, a.microbatch) in done or (a.kind == "B" and ("F", a.microbatch) not in done):
            raise ValueError(f"rank {ps.rank}: {a} repeats or comes before its forward; check "
                             f"the whole schedule with pipeline.validate_schedule")
        done.add((a.kind, a.microbatch))
    if len(done) != 2 * m:
        raise ValueError(f"rank {ps.rank}: the actions must run F and B of each of the {m} "
                         f"microbatches exactly once; got {[str(a) for a in parsed]}")

    spans: list = []
    clock = time.time  # comparable across processes (and, roughly, nodes) for traces
    p2p = StageP2P(ps, verbose=verbose, spans=spans if trace else None, clock=clock)
    device = ps.device
    stage_inputs, stage_outputs, losses = {}, {}, []
    live = peak = 0
    for i, action in enumerate(parsed):
        mb = action.microbatch
        if action.kind == "F":
            if first:
                x = inputs[mb]
            else:
                x = p2p.recv(shape, activation_dtype, device, p2p.prev, f"F{mb}")
                x.requires_grad_()
            start = clock()
            y = stage(x)
            if last:
                y = loss_fn(y, targets[mb]) / m
                losses.append(y.detach())
            else:
                if tuple(y.shape) != shape or y.dtype != activation_dtype:
                    raise ValueError(
                        f"stage {ps.pp_rank} produced {tuple(y.shape)} {y.dtype} for microbatch "
                        f"{mb}, but the pipeline expects {shape} {activation_dtype}: pass the "
                        f"activation shape [micro_batch, seq(/tp with sequence parallel), d_model]")
                p2p.send(y, p2p.next, f"F{mb}",
                         release=(lambda y=y: _free_storage(y)) if free_outputs else None)
            stage_inputs[mb], stage_outputs[mb] = x, y
            live += 1
            peak = max(peak, live)
        else:  # "B"
            x, y = stage_inputs.pop(mb), stage_outputs.pop(mb)
            grad = None if last else p2p.recv(shape, activation_dtype, device, p2p.next,
                                               f"B{mb}")
            start = clock()
            _backward(y, grad)
            if not first:
                p2p.send(x.grad, p2p.prev, f"B{mb}")
            live -= 1
        if trace:
            spans.append((ps.pp_rank, str(action), action.kind, start, clock()))
        if i + 1 == len(parsed) or not _needs_recv(parsed[i + 1], ps):
            p2p.flush()
    p2p.wait_all()
    if stage_outputs:
        raise ValueError(f"rank {ps.rank}: microbatches {sorted(stage_outputs)} were forwarded "
                         f"but never backwarded; validate the schedule")

    loss = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
    loss = comm.all_reduce(loss.float().reshape(1).clone(), ps.pp_group)[0]  # last stage -> all
    return PipelineResult(loss=loss, peak_live=peak, spans=spans)
