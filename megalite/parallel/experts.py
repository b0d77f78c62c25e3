"""Expert parallelism: token copies travel to the ranks holding their experts and back.

The experts of an MoE layer are split over the ep group in contiguous blocks: ep rank j
holds experts ``[j*E/ep, (j+1)*E/ep)``, each expert whole (expert tensor parallelism is 1).
ep folds over the tp x cp x dp ranks of one pipeline stage (Megatron-Core's "MoE parallel
folding", DESIGN.md): the ranks that run attention with tp/cp/dp run the experts with ep x
expert-dp. Every rank routes its own tokens (its sequence shard under tensor parallelism).

:func:`dispatch` takes this rank's token copies sorted by global expert (the router's
top-k choices, one row per (token, choice)) and the number per expert. It

1. exchanges the per-expert counts with an all-to-all of ``[ep, E/ep]`` integers (the only
   host synchronization: the row all-to-all needs its split sizes on the host),
2. sends each block of rows to the rank holding those experts (:func:`comm.all_to_all`,
   autograd-aware, variable sizes),
3. regroups what arrived (source-major: from rank 0 experts a, b, ..., from rank 1 ...) into
   expert-major order, so each local expert's rows are contiguous for a grouped matmul.

:func:`combine` undoes 3 and 2. A rank whose experts receive no tokens still takes part in
both all-to-alls with zero rows, so nobody waits on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megalite.parallel import comm


@dataclass
class DispatchPlan:
    """What :func:`combine` needs to send expert outputs back where they came from."""
    input_splits: list[int]      # rows this rank sent to each ep rank
    output_splits: list[int]     # rows this rank received from each ep rank
    order: torch.Tensor | None   # received row -> expert-major position (None: ep = 1)


def dispatch(x_sorted: torch.Tensor, counts: torch.Tensor, group
             ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
    """Send rows sorted by global expert (``counts[e]`` rows for expert e) to the ep ranks
    holding the experts. Returns (rows for this rank's experts grouped by local expert,
    rows per local expert [E/ep] (a CPU tensor), the plan for :func:`combine`)."""
    ep = comm.group_size(group)
    num_experts = counts.numel()
    if ep == 1:
        return x_sorted, counts.cpu(), DispatchPlan([x_sorted.shape[0]], [x_sorted.shape[0]],
                                                    None)
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts cannot be split over ep={ep} ranks; make "
                         f"the number of experts a multiple of ep")
    local = num_experts // ep
    send = counts.view(ep, local)
    # recv[i, e]: rows rank i sends to this rank's local expert e.
    recv = comm.all_to_all_single(send.contiguous(), group, [1] * ep, [1] * ep).cpu()
    send = send.cpu()
    input_splits = send.sum(1).tolist()
    output_splits = recv.sum(1).tolist()
    x_recv = comm.all_to_all(x_sorted, group, output_splits, input_splits)
    # Arrived source-major; sort by (local expert, source), stably keeping each source's order.
    segment = torch.arange(ep * local).view(ep, local)
    expert_major_key = (segment % local) * ep + segment // local
    key = torch.repeat_interleave(expert_major_key.reshape(-1), recv.reshape(-1))
    order = torch.argsort(key, stable=True).to(x_sorted.device)
    return x_recv[order], recv.sum(0), DispatchPlan(input_splits, output_splits, order)


def combine(y_grouped: torch.Tensor, plan: DispatchPlan, group) -> torch.Tensor:
    """The expert outputs back on the ranks (and in the order) :func:`dispatch` took the
    rows from."""
    if plan.order is None:
        return y_grouped
    return comm.all_to_all(_unpermute(y_grouped, plan.order), group, plan.input_splits,
                           plan.output_splits)


def _unpermute(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y[inverse]


def split_experts(num_experts: int, ep: int, ep_rank: int) -> range:
    """The global indices of the experts ep rank ``ep_rank`` holds."""
    if num_experts % ep:
        raise ValueError(f"moe_num_experts={num_experts} is not divisible by ep={ep}; choose "
                         f"an ep that divides the number of experts")
    local = num_experts // ep
    return range(ep_rank * local, (ep_rank + 1) * local)
