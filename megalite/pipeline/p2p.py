"""Point-to-point transfers between pipeline ranks.

Sends never block the compute loop: an output is queued, and the queue is posted together
with the next receive in one ``batch_isend_irecv`` (Megatron's send-forward-recv-backward
pairing, which NCCL needs so that a send and the matching receive of the peer run in the
same group), or on its own when the next action receives nothing.

Receives are posted in the order the *peer sends*, which every rank knows from the whole
schedule (``incoming``): messages between two ranks are matched in posting order (NCCL has
no tags), so a rank that needs a later message first posts the receives for the earlier
ones too and keeps them until their action runs. Any order of consumption is then exact,
and a schedule that the validator's replay finishes cannot hang here. A sent tensor's
storage is released once its send completes (``release`` callback), so the stage keeps the
autograd graph but not the activation.
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
        self._queued: list[tuple] = []      # (tensor, peer, label, release)
        self._in_flight: list[tuple] = []   # (work, tensor, release)

    def _log(self, what: str, peer: int, label: str, tensor: torch.Tensor) -> None:
        if self.verbose:
            print(f"[rank {self.rank}] {what} {label} {'->' if what == 'send' else '<-'} "
                  f"rank {peer} shape={tuple(tensor.shape)} dtype={tensor.dtype}", flush=True)

    def send(self, tensor: torch.Tensor, dst: int, label: str, release=None) -> None:
        """Queue ``tensor`` for pipeline rank ``dst``; ``release()`` runs once it is sent."""
        self._queued.append((tensor.contiguous(), self.ps.pp_ranks[dst], label, release))

    def _post(self, recvs: list[tuple]) -> list:
        ops, sent = [], []
        for tensor, peer, label, release in self._queued:
            self._log("send", peer, label, tensor)
            ops.append(dist.P2POp(dist.isend, tensor, peer, self.ps.pp_group))
            sent.append((tensor, release))
        for buffer, peer in recvs:
            ops.append(dist.P2POp(dist.irecv, buffer, peer, self.ps.pp_group))
        self._queued = []
        if not ops:
            return []
        works = dist.batch_isend_irecv(ops)
        for work, (tensor, release) in zip(works, sent):
            self._in_flight.append((work, tensor, release))
        return works[len(sent):]

    def flush(self) -> None:
        """Post queued sends now (the next action receives nothing)."""
        start = self.clock()
        if self._queued:
            self._post([])
            self._span("send", start)
        self._reap()

    def recv(self, message, src: int, shape, dtype, device, label: str) -> torch.Tensor:
        """The tensor ``message`` from pipeline rank ``src``: posts queued sends and the
        receives of ``src``'s messages up to this one in one batch, then waits for it."""
        start = self.clock()
        if message not in self._pending:
            order = self._incoming.get(src, [])
            if message not in order[self._posted.get(src, 0):]:
                raise RuntimeError(f"rank {self.rank}: {label} is not among the messages rank "
                                   f"{self.ps.pp_ranks[src]} will send; validate the schedule")
            upto = order.index(message, self._posted[src]) + 1
            todo = order[self._posted[src]:upto]
            self._posted[src] = upto
            peer = self.ps.pp_ranks[src]
            buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in todo]
            works = self._post([(b, peer) for b in buffers])
            self._pending.update(zip(todo, zip(buffers, works)))
        buffer, work = self._pending.pop(message)
        peer = self.ps.pp_ranks[src]
        try:
            work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.rank}: waiting for {label} from rank {peer} "
                               f"(shape {tuple(shape)}) failed: {e}") from e
        self._log("recv", peer, label, buffer)
        self._span("recv", start, label)
        self._reap()
        return buffer

    def _span(self, kind: str, start: float, label: str = "") -> None:
        if self.spans is not None:
            self.spans.append((self.ps.pp_rank, f"{kind} {label}".strip(), kind, start,
                               self.clock()))

    def _reap(self) -> None:
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
        self.flush()
        for work, _, release in self._in_flight:
            work.wait()
            if release is not None:
                release()
        self._in_flight = []
        if self._pending:  # a validated schedule consumes every message it receives
            raise RuntimeError(f"rank {self.rank}: received but never used {list(self._pending)}")
