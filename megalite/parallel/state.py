"""One explicit parallel state: the (tp, cp, dp, pp) process groups of this rank, and the
expert-parallel groups folded over them.

Rank layout (DESIGN.md, Megatron's order tp-cp-dp-pp)::

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

TP is innermost (a TP group is consecutive ranks, i.e. one node), PP outermost. Dense
gradients reduce over the "data x context" group (``dp_cp``: the ranks of one stage with the
same tp rank). Expert parallelism folds over the ``tp * cp * dp`` ranks of one pipeline
stage (Megatron-Core's MoE parallel folding): in stage-local order they are re-split as
``ep x expert_dp`` with ep innermost, so an ep group is ``ep`` consecutive ranks and an
expert_dp group strides by ``ep``; expert gradients reduce over expert_dp.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_STATE: "ParallelState | None" = None
_WE_STARTED_DIST = False


@dataclass
class ParallelState:
    """Sizes, ranks and groups of one process. Groups are ``None`` in a single process."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    cp_group: object = None
    dp_cp_group: object = None      # data x context: what dense gradients reduce over
    ep_group: object = None
    expert_dp_group: object = None  # what expert gradients reduce over
    # Ranks (global) of this rank's groups, in group-rank order.
    tp_ranks: list = field(default_factory=lambda: [0])
    pp_ranks: list = field(default_factory=lambda: [0])
    dp_ranks: list = field(default_factory=lambda: [0])
    cp_ranks: list = field(default_factory=lambda: [0])
    dp_cp_ranks: list = field(default_factory=lambda: [0])
    ep_ranks: list = field(default_factory=lambda: [0])
    expert_dp_ranks: list = field(default_factory=lambda: [0])
    # First and last pipeline stage of this rank's pipeline: they share tied embeddings.
    embedding_group: object = None
    # One group per direction between neighbouring pipeline ranks (a ring):
    # p2p_groups[(src pp rank, dst pp rank)], for the pairs this rank is in.
    p2p_groups: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def rank(self) -> int:
        return global_rank(self.tp_rank, self.dp_rank, self.pp_rank, self.tp, self.dp,
                           self.cp_rank, self.cp)

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def stage_rank(self) -> int:
        """This rank's index among the tp * cp * dp ranks of its pipeline stage."""
        return (self.dp_rank * self.cp + self.cp_rank) * self.tp + self.tp_rank

    @property
    def expert_dp(self) -> int:
        return self.tp * self.cp * self.dp // self.ep

    @property
    def ep_rank(self) -> int:
        return self.stage_rank % self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.stage_rank // self.ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k + '_rank')}/{getattr(self, k)}"
                        for k in ("cp", "ep") if getattr(self, k) > 1)
        return (f"ParallelState(rank={self.rank}, tp={self.tp_rank}/{self.tp}, "
                f"pp={self.pp_rank}/{self.pp}, dp={self.dp_rank}/{self.dp}{extra}, "
                f"device={self.device})")


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int,
                cp_rank: int = 0, cp: int = 1) -> int:
    return pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank


def group_ranks(tp: int, pp: int, dp: int, cp: int = 1, ep: int = 1) -> dict[str, list[list[int]]]:
    """All groups of a layout, as lists of global ranks: tp, cp, dp, dp_cp (data x context),
    pp, and the expert groups ep and expert_dp folded over each stage's tp*cp*dp ranks.

    >>> group_ranks(2, 2, 2)["dp"]
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    >>> group_ranks(2, 1, 2, ep=2)["expert_dp"]
    [[0, 2], [1, 3]]
    """
    g = lambda t, c, d, p: global_rank(t, d, p, tp, dp, c, cp)  # noqa: E731
    T, C, D, P = range(tp), range(cp), range(dp), range(pp)
    stage = tp * cp * dp
    return {
        "tp": [[g(t, c, d, p) for t in T] for p in P for d in D for c in C],
        "cp": [[g(t, c, d, p) for c in C] for p in P for d in D for t in T],
        "dp": [[g(t, c, d, p) for d in D] for p in P for c in C for t in T],
        "dp_cp": [[g(t, c, d, p) for d in D for c in C] for p in P for t in T],
        "pp": [[g(t, c, d, p) for p in P] for d in D for c in C for t in T],
        "ep": [[p * stage + j * ep + e for e in range(ep)]
               for p in P for j in range(stage // ep)],
        "expert_dp": [[p * stage + j * ep + e for j in range(stage // ep)]
                      for p in P for e in range(ep)],
    }


def check_layout(tp: int, pp: int, dp: int | None, world_size: int, cp: int = 1,
                 ep: int = 1) -> int:
    """Validate sizes before any collective; returns dp."""
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    model_ranks = tp * cp * pp
    sizes = f"tp*cp*pp = {tp}*{cp}*{pp}" if cp > 1 else f"tp*pp = {tp}*{pp}"
    if world_size % model_ranks != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by {sizes} = {model_ranks}; "
            f"launch a multiple of {model_ranks} processes (e.g. torchrun --nproc-per-node "
            f"{model_ranks} your_script.py) or change --tp/--pp" + ("/--cp" if cp > 1 else ""))
    if dp is None:
        dp = world_size // model_ranks
    elif not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp must be an integer >= 1 or None, got {dp!r}")
    elif model_ranks * dp != world_size:
        raise ValueError(
            f"{sizes}*dp = {model_ranks * dp} does not equal the world size "
            f"{world_size}; pass dp=None to use world // ({sizes.split(' =')[0]}) = "
            f"{world_size // model_ranks}")
    stage = tp * cp * dp
    if stage % ep != 0:
        raise ValueError(
            f"ep = {ep} does not divide the tp*cp*dp = {stage} ranks of a pipeline stage it "
            f"folds over; choose --ep among {[e for e in range(1, stage + 1) if stage % e == 0]}")
    return dp


def cuda_selected() -> bool:
    """Whether this process runs on CUDA: when a GPU is there, unless MEGALITE_DEVICE=cpu
    forces the CPU (gloo)."""
    return torch.cuda.is_available() and os.environ.get("MEGALITE_DEVICE", "") != "cpu"


def _start_process_group(timeout: datetime.timedelta) -> None:
    """Start the default group from torchrun's environment: NCCL on CUDA, gloo on CPU."""
    global _WE_STARTED_DIST
    use_cuda = cuda_selected()
    if use_cuda:
        _use_local_rank_gpu()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    _WE_STARTED_DIST = True


def _use_local_rank_gpu() -> None:
    """torchrun: one GPU per local rank (unless each process sees only its own GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if 0 <= local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)


def _default_device() -> torch.device:
    # Backends may read "cpu:gloo,cuda:nccl" when the user started the group themselves.
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        _use_local_rank_gpu()
        return torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized() and cuda_selected():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ring_directions(pp: int) -> list[tuple[int, int]]:
    """(src, dst) pipeline-rank pairs that get their own transfer group: both directions
    between ranks r and r+1 mod pp."""
    pairs = []
    for r in range(pp if pp > 2 else pp - 1):
        nxt = (r + 1) % pp
        pairs += [(r, nxt), (nxt, r)]
    return pairs


def initialize(tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1, ep: int = 1,
               timeout_s: float = 600.0) -> ParallelState:
    """Create the process groups of a (tp, cp, dp, pp) layout, with expert parallelism ``ep``
    folded over each stage, and make them current.

    Uses the default process group when one exists (torchrun scripts, tests); else starts one
    from torchrun's environment variables (``WORLD_SIZE`` > 1); else runs as a single process
    without torch.distributed, where every collective is the identity. Bad sizes raise a
    ``ValueError`` before any collective. Set ``MEGALITE_DEVICE=cpu`` to force gloo on a
    machine with GPUs.
    """
    global _STATE
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        check_layout(tp, pp, dp, int(os.environ["WORLD_SIZE"]), cp, ep)
        _start_process_group(timeout)
    if not dist.is_initialized():
        dp = check_layout(tp, pp, dp, 1, cp, ep)
        _STATE = ParallelState(device=_default_device())
        return _STATE

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_layout(tp, pp, dp, world, cp, ep)
    pp_rank, rest = divmod(rank, dp * cp * tp)
    dp_rank, rest = divmod(rest, cp * tp)
    cp_rank, tp_rank = divmod(rest, tp)
    state = ParallelState(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, tp_rank=tp_rank, pp_rank=pp_rank,
                          dp_rank=dp_rank, cp_rank=cp_rank, device=_default_device())
    # Every rank must create every group, in the same order (new_group is collective). A
    # rank set that two kinds share (dp and dp_cp when cp = 1) is one group.
    made: dict[tuple, object] = {}
    layout_groups = group_ranks(tp, pp, dp, cp, ep)
    for kind, all_groups in layout_groups.items():
        for ranks in all_groups:
            if tuple(ranks) not in made:
                made[tuple(ranks)] = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                setattr(state, f"{kind}_group", made[tuple(ranks)])
                setattr(state, f"{kind}_ranks", ranks)
    for ranks in layout_groups["pp"]:
        emb_ranks = sorted({ranks[0], ranks[-1]})
        group = dist.new_group(emb_ranks, timeout=timeout)
        if rank in emb_ranks:
            state.embedding_group = group
    # Pipeline transfers: each direction between two neighbouring stages (and the wrap from
    # the last pipeline rank to the first, for interleaved placement) is its own group, a
    # one-way queue. NCCL runs a group's transfers in order and a send waits for its
    # receive, so with one shared group a send could hold up a receive the other way.
    for ranks in layout_groups["pp"]:
        for src, dst in ring_directions(len(ranks)):
            group = dist.new_group(sorted({ranks[src], ranks[dst]}), timeout=timeout)
            if rank in (ranks[src], ranks[dst]):
                state.p2p_groups[(src, dst)] = group
    _STATE = state
    return state


def get_state() -> ParallelState:
    """The current ParallelState; a single-process one if ``initialize`` was never called."""
    global _STATE
    if _STATE is None:
        _STATE = ParallelState(device=_default_device())
    return _STATE


def destroy() -> None:
    """Forget the current state; tear down torch.distributed if ``initialize`` started it."""
    global _STATE, _WE_STARTED_DIST
    _STATE = None
    if _WE_STARTED_DIST and dist.is_initialized():
        dist.destroy_process_group()
    _WE_STARTED_DIST = False
