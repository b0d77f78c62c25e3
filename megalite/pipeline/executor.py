"""One executor runs any valid schedule on this rank's pipeline stages.

``run_schedule`` first validates the whole schedule (every rank does, identically, so a bad
one fails everywhere before any transfer), then walks this rank's list in order:

``F``  takes the microbatch input (first stage), the activation of the previous stage
       handed over on this rank, or a received one; runs the stage; hands its output to the
       next stage (same rank: no communication) or queues it for sending; on the last stage
       computes the loss, scaled by 1/m.
``B``  takes the output's gradient (from the loss, the next stage on this rank, or a
       receive), back-propagates through the stage, and hands the input's gradient back.
``I``  the same for the input gradient only (:func:`backward.backward_input`), keeping
       what ``W`` needs; ``W`` then accumulates the weight gradients.

``forward_only=True`` runs a schedule of F actions only (:func:`schedules.forward_schedule`
of a training schedule) under ``torch.no_grad``, holding nothing for a backward: evaluation
through the same transfers, at any layout.

``final_backward(stage)``, when given, is a context manager entered around each stage's
last gradient-producing action (its last ``B`` or ``W`` in this rank's list): whatever the
table's order, the stage's parameter gradients are final when it exits. Data parallelism
uses it to start reducing gradients while the rest of backward runs.

Transfers are in :mod:`p2p`. Nothing here synchronizes with the host per action: losses
stay on the device until the end, and waits are on receives only.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import torch

from megalite.parallel import comm
from megalite.pipeline.actions import Schedule, stage_to_rank
from megalite.pipeline.backward import backward, backward_input
from megalite.pipeline.p2p import StageP2P
from megalite.pipeline.validate import consumes, produces, validate_schedule


@dataclass
class PipelineResult:
    loss: torch.Tensor          # mean loss over the microbatches, on every pipeline rank
    peak_live: int              # most stage-microbatches held at once (F until B or W)
    spans: list = field(default_factory=list)   # (rank, name, kind, start, end) if traced


def _free_storage(t: torch.Tensor) -> None:
    """Drop an activation's memory but keep its autograd node (Megatron's trick): the
    backward pass needs only the node, and the gradient arrives from the next stage."""
    t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def _incoming(parsed, owner, me: int, num_stages: int) -> dict[int, list]:
    """For each peer, the messages it sends this rank, in the order it sends them."""
    incoming: dict[int, list] = {}
    for src, actions in parsed.items():
        if src == me:
            continue
        for a in actions:
            msg = produces(a, num_stages)
            if msg is not None and owner[msg[1] + (1 if msg[0] == "act" else -1)] == me:
                incoming.setdefault(src, []).append(msg)
    return incoming


@functools.lru_cache(maxsize=16)
def _plan(table: tuple, m: int, me: int, forward_only: bool = False):
    """Validate a schedule and derive this rank's view of it: (parsed lists, {stage: rank},
    incoming messages per peer). Cached, since a training loop runs the same table every
    step (an invalid one raises and is not cached)."""
    schedule = dict(table)
    parsed = validate_schedule(schedule, None, m, forward_only=forward_only)
    owner = stage_to_rank(parsed)
    return parsed, owner, _incoming(parsed, owner, me, len(owner))


Stages = Union[torch.nn.Module, Callable, Mapping[int, Callable]]


def run_schedule(schedule: Union[Schedule, Sequence[str]], stages: Stages, ps, *,
                 num_microbatches: int, activation_shape: Sequence[int],
                 activation_dtype: torch.dtype = torch.float32,
                 inputs: Sequence[torch.Tensor] | None = None,
                 targets: Sequence | None = None,
                 loss_fn: Callable | None = None,
                 verbose: bool = False, trace: bool = False,
                 free_outputs: bool = True,
                 final_backward: Callable | None = None,
                 forward_only: bool = False) -> PipelineResult:
    """Run this rank's part of ``schedule`` ({pipeline rank: ["0F0", "0F1", "0B0", ...]}).

    ``stages`` maps each stage this rank owns to a callable (a module, or one stage's view
    of a multi-stage model); a single module means the rank owns one stage. A plain list of
    actions is accepted when pp = 1. ``inputs[i]`` is microbatch i's input (first stage
    only), ``targets[i]`` its target (last stage only); ``loss_fn(output, target)`` returns a
    scalar. ``activation_shape`` is the shape every stage hands on (and receives as
    gradient): outputs are checked against it, so a mismatch is an error, not a hang.
    Accumulates parameter gradients; returns the mean loss, known on every pipeline rank.
    ``free_outputs`` releases each sent activation's memory (the stage's last op must not
    save its own output for backward, true of residual blocks). ``final_backward`` and
    ``forward_only``: see the module docstring.
    """
    m, shape, me = num_microbatches, tuple(activation_shape), ps.pp_rank
    if not isinstance(schedule, Mapping):
        if ps.pp != 1:
            raise ValueError("pass the whole schedule {pipeline rank: actions} when pp > 1: "
                             "every rank needs the others' order to match transfers")
        schedule = {0: list(schedule)}
    if sorted(schedule) != list(range(ps.pp)):
        raise ValueError(f"the schedule has ranks {sorted(schedule)} but the pipeline has "
                         f"{ps.pp}; build it for pp={ps.pp}")
    table = tuple((r, tuple(str(a) for a in schedule[r])) for r in sorted(schedule))
    parsed, owner, incoming = _plan(table, m, me, forward_only)
    num_stages = len(owner)
    mine = sorted(s for s, r in owner.items() if r == me)
    if not isinstance(stages, Mapping):
        if len(mine) != 1:
            raise ValueError(f"rank {ps.rank} owns stages {mine} in this schedule: pass "
                             f"stages as {{stage: module}}")
        stages = {mine[0]: stages}
    if sorted(stages) != mine:
        raise ValueError(f"rank {ps.rank} owns stages {mine} in this schedule but was given "
                         f"modules for {sorted(stages)}; build the model for this schedule's "
                         f"placement")
    first, last = 0 in stages, num_stages - 1 in stages
    if first and (inputs is None or len(inputs) < m):
        raise ValueError(f"the first stage needs {m} microbatch inputs")
    if last and (targets is None or loss_fn is None or len(targets) < m):
        raise ValueError(f"the last stage needs {m} targets and a loss_fn")

    spans: list = []
    clock = time.time  # comparable across processes (and, roughly, nodes) for traces
    p2p = StageP2P(ps, incoming, verbose=verbose,
                   spans=spans if trace else None, clock=clock)
    device = ps.device
    held: dict[tuple[int, int], tuple] = {}  # (stage, mb) -> (input, output) until backward
    local: dict[tuple, torch.Tensor] = {}    # messages between stages of this rank
    weight_grads: dict[tuple[int, int], object] = {}
    losses = []
    live = peak = 0

    def take(msg, label):
        """The tensor a message carries: handed over on this rank, or received."""
        _, stage, _ = msg
        if owner[stage] == me:
            return local.pop(msg)
        return p2p.recv(msg, owner[stage], shape, activation_dtype, device, label)

    def give(msg, tensor, label, release=None):
        kind, stage, _ = msg
        dst = owner[stage + 1 if kind == "act" else stage - 1]
        if dst == me:
            local[msg] = tensor
        else:
            p2p.send(tensor, dst, label, release)

    actions = parsed[me]
    last_grad_action = {a.stage: i for i, a in enumerate(actions) if a.kind in "BW"}

    def grads_final(i, stage):
        if final_backward is not None and last_grad_action[stage] == i:
            return final_backward(stage)
        return contextlib.nullcontext()

    for i, a in enumerate(actions):
        s, mb, label = a.stage, a.microbatch, str(a)
        need = consumes(a, num_stages)
        received = None if need is None else take(need, label)
        start = clock()
        if a.kind == "F":
            x = inputs[mb] if s == 0 else received if forward_only else \
                received.requires_grad_()
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                y = stages[s](x)
                if s == num_stages - 1:
                    y = loss_fn(y, targets[mb]) / m
            if s == num_stages - 1:
                losses.append(y.detach())
            else:
                if tuple(y.shape) != shape or y.dtype != activation_dtype:
                    raise ValueError(
                        f"stage {s} produced {tuple(y.shape)} {y.dtype} for microbatch {mb}, "
                        f"but the pipeline expects {shape} {activation_dtype}: pass the "
                        f"activation shape [micro_batch, seq(/tp with sequence parallel), d_model]")
                remote = owner[s + 1] != me
                give(produces(a, num_stages), y if remote else y.detach(), label,
                     release=(lambda y=y: _free_storage(y)) if free_outputs and remote else None)
            if not forward_only:
                held[(s, mb)] = (x, y)
                live += 1
                peak = max(peak, live)
        elif a.kind in "BI":
            x, y = held.pop((s, mb)) if a.kind == "B" else held[(s, mb)]
            if a.kind == "B":
                with grads_final(i, s):
                    backward(y, received)
                x_grad = x.grad if s > 0 else None
                live -= 1
            else:
                grads, weight_grads[(s, mb)] = backward_input(
                    y, received, [x] if s > 0 else [])
                x_grad = grads[0] if s > 0 else None
                held[(s, mb)] = (None, None)  # W keeps what it needs itself
            if s > 0:
                give(produces(a, num_stages), x_grad, label)
        else:  # "W"
            with grads_final(i, s):
                weight_grads.pop((s, mb)).run()
            held.pop((s, mb))
            live -= 1
        if trace:
            spans.append((me, label, a.kind, start, clock()))
        p2p.reap()
    p2p.wait_all()
    if held or local:
        raise RuntimeError(f"rank {ps.rank}: work left over after the schedule "
                           f"({sorted(held)}, {sorted(local)}); validate the schedule")

    loss = torch.stack(losses).sum() if losses else torch.zeros((), device=device)
    if ps.pp > 1:  # the last stage's rank -> every pipeline rank
        loss = comm.all_reduce(loss.float().reshape(1).clone(), ps.pp_group)[0]
    return PipelineResult(loss=loss.float(), peak_live=peak, spans=spans)
