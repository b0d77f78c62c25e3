"""Point-to-point transfers between neighbouring pipeline stages.

Sends never block the compute loop: an output is queued, and the queue is posted together
with the next receive in one ``batch_isend_irecv`` (Megatron's send-forward-recv-backward
pairing, which NCCL needs so that a send and the matching receive of the peer run in the
same group), or on its own when the next action receives nothing. Only receives are waited
on; a sent tensor's storage is released once its send completes (``release`` callback), so
the stage keeps the autograd graph but not the activation.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StageP2P:
    def __init__(self, ps, verbose: bool = False, spans: list | None = None,
                 clock=time.perf_counter):
        self.ps, self.verbose, self.spans, self.clock = ps, verbose, spans, clock
        self.rank = ps.rank
        self.prev = ps.pp_ranks[ps.pp_rank - 1] if ps.pp_rank > 0 else None
        self.next = ps.pp_ranks[ps.pp_rank + 1] if ps.pp_rank < ps.pp - 1 else None
        self._queued: list[tuple] = []      # (tensor, peer, label, release)
        self._in_flight: list[tuple] = []   # (work, tensor, release)

    def _log(self, what: str, peer: int, label: str, tensor: torch.Tensor) -> None:
        if self.verbose:
            print(f"[rank {self.rank}] {what} {label} {'->' if what == 'send' else '<-'} "
                  f"rank {peer} shape={tuple(tensor.shape)} dtype={tensor.dtype}", flush=True)

    def send(self, tensor: torch.Tensor, peer: int, label: str, release=None) -> None:
        """Queue ``tensor`` for ``peer``; ``release()`` runs once the send has completed."""
        self._queued.append((tensor.contiguous(), peer, label, release))

    def _post(self, recv: tuple | None = None):
        ops, sent = [], []
        for tensor, peer, label, release in self._queued:
            self._log("send", peer, label, tensor)
            ops.append(dist.P2POp(dist.isend, tensor, peer, self.ps.pp_group))
            sent.append((tensor, release))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv[0], recv[1], self.ps.pp_group))
        self._queued = []
        if not ops:
            return None
        works = dist.batch_isend_irecv(ops)
        for work, (tensor, release) in zip(works, sent):
            self._in_flight.append((work, tensor, release))
        return works[-1] if recv is not None else None

    def flush(self) -> None:
        """Post queued sends now (the next action receives nothing)."""
        start = self.clock()
        if self._queued:
            self._post()
            self._span("send", start)
        self._reap()

    def recv(self, shape, dtype, device, peer: int, label: str) -> torch.Tensor:
        """Post queued sends with this receive in one batch, and wait for the receive."""
        buffer = torch.empty(shape, dtype=dtype, device=device)
        start = self.clock()
        work = self._post((buffer, peer))
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
