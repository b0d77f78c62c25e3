"""Point-to-point transfers between pipeline ranks.

Each direction between two neighbouring pipeline ranks has its own process group
(``ParallelState.p2p_groups``), so it is a one-way queue: messages arrive in the order they
were sent, and a send that waits for its receive (as NCCL's do) holds up only later sends
the same way, never traffic in the other direction or the compute stream.

Sends are posted as soon as the tensor is produced (``isend``) and never waited on by the
compute loop. Receives are posted in the order the *peer sends*, which every rank knows from
the whole schedule (``incoming``): a rank that needs a later message first posts the
receives for the earlier ones too and keeps them until their action runs. Any order of
consumption is then exact, and a schedule that the validator's replay finishes cannot hang
here. A sent tensor's storage is released once its send completes (``release`` callback),
so the stage keeps the autograd graph but not the activation.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StageP2P:
    def __init__(self, ps, incoming: dict[int, list], verbose: bool = False,
                 spans: list | None = None, clock=time.perf_counter):
        """incoming[src]: the messages pipeline rank ``src`` sends this rank, in its order."""
        self.ps, self.verbose, self.spans, self.clock = ps, verbose, spans, clock
        self.rank = ps.rank
        self._incoming = incoming
        self._posted = {src: 0 for src in incoming}   # how many of incoming[src] are posted
        self._pending: dict = {}                      # message -> (buffer, work)
        self._in_flight: list[tuple] = []             # (work, tensor, release)

    def _group(self, src: int, dst: int):
        # Non-neighbouring pairs (possible in a hand-written table) share the pp group.
        return self.ps.p2p_groups.get((src, dst), self.ps.pp_group)

    def _log(self, what: str, peer: int, label: str, tensor: torch.Tensor) -> None:
        if self.verbose:
            print(f"[rank {self.rank}] {what} {label} {'->' if what == 'send' else '<-'} "
                  f"rank {peer} shape={tuple(tensor.shape)} dtype={tensor.dtype}", flush=True)

    def send(self, tensor: torch.Tensor, dst: int, label: str, release=None) -> None:
        """Send ``tensor`` to pipeline rank ``dst`` now; ``release()`` runs once it is sent."""
        start = self.clock()
        tensor = tensor.contiguous()
        peer = self.ps.pp_ranks[dst]
        self._log("send", peer, label, tensor)
        work = dist.isend(tensor, peer, group=self._group(self.ps.pp_rank, dst))
        self._in_flight.append((work, tensor, release))
        self._span("send", start, label)

    def recv(self, message, src: int, shape, dtype, device, label: str) -> torch.Tensor:
        """The tensor ``message`` from pipeline rank ``src``: posts the receives of ``src``'s
        messages up to this one (in ``src``'s order), then waits for this one."""
        start = self.clock()
        peer = self.ps.pp_ranks[src]
        if message not in self._pending:
            order = self._incoming.get(src, [])
            if message not in order[self._posted.get(src, 0):]:
                raise RuntimeError(f"rank {self.rank}: {label} is not among the messages rank "
                                   f"{peer} will send; validate the schedule")
            upto = order.index(message, self._posted[src]) + 1
            group = self._group(src, self.ps.pp_rank)
            for msg in order[self._posted[src]:upto]:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                self._pending[msg] = (buffer, dist.irecv(buffer, peer, group=group))
            self._posted[src] = upto
        buffer, work = self._pending.pop(message)
        try:
            work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.rank}: waiting for {label} from rank {peer} "
                               f"(shape {tuple(shape)}) failed: {e}") from e
        self._log("recv", peer, label, buffer)
        self._span("recv", start, label)
        self.reap()
        return buffer

    def _span(self, kind: str, start: float, label: str = "") -> None:
        if self.spans is not None:
            self.spans.append((self.ps.pp_rank, f"{kind} {label}".strip(), kind, start,
                               self.clock()))

    def reap(self) -> None:
        """Release the storage of sends that have completed."""
        still = []
        for work, tensor, release in self._in_flight:
            if work.is_completed():
                work.wait()
                if release is not None:
                    release()
            else:
                still.append((work, tensor, release))
        self._in_flight = still

    def wait_all(self) -> None:
        for work, _, release in self._in_flight:
            work.wait()
            if release is not None:
                release()
        self._in_flight = []
        if self._pending:  # a validated schedule consumes every message it receives
            raise RuntimeError(f"rank {self.rank}: received but never used {list(self._pending)}")
