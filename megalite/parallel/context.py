"""Context parallelism: one sequence split over the ranks of a cp group, attention exact.

Sharding (load-balanced, as Megatron-Core does it). A sequence of S tokens is cut into
2*cp chunks of c = S/(2*cp) tokens and cp rank i holds chunks i and 2*cp-1-i, in that
order. With causal attention a chunk's work grows with its position, so pairing an early
chunk with a late one gives every rank the same work; contiguous S/cp pieces would leave
the last rank cp times the first one's. Everything outside attention is per token, so
the model runs on the local 2c tokens as on any sequence: only the position ids (RoPE or
learned positions, :func:`positions`) and attention need to know where the tokens sit.

Ring attention (``comm="ring"``). Each rank keeps its queries; the K/V shards travel
around the ring (rank r sends to r+1 and receives from r-1) with asynchronous
point-to-point transfers posted *before* the current block is computed, so the transfer
overlaps the compute. Step i holds the K/V of rank (r - i) mod cp. Each (query chunk, key
chunk) pair is either empty (the keys are in the queries' future), full (all in the past,
no mask), or masked at an offset (the diagonal, or a sliding window's edge); the blocks'
partial outputs are merged exactly through their log-sum-exps (lse):
``lse = logaddexp(lse_a, lse_b)``, ``o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)``.
The backward recomputes each block's probabilities from the final lse, adds its dQ
locally and passes dK/dV (fp32) around the ring with the K/V, so after cp steps each
rank's gradient arrives home. Grouped-query attention moves only the kv heads that exist.

All-to-all (``comm="all-to-all"``, DeepSpeed-Ulysses): q, k and v are re-sharded from
(all heads, S/cp tokens) to (heads/cp, all S tokens) by one all-to-all each, attention
runs on whole sequences, and one all-to-all brings the output back. It needs the local
query and kv heads divisible by cp. It moves 4 activations per layer (vs the ring's
(cp-1) K/V shards) and is independent of the attention algorithm.

The blocks are :mod:`megalite.kernels.attention_block`'s ``attention_block`` (and its backward):
the Triton kernel on CUDA, which takes the causal offset; on the CPU torch's fused flash
attention where it can express the block, else the torch reference.

Full recompute (``--recompute full``) re-runs a layer's forward ring in backward;
selective recompute keeps the ring's saved tensors (GPT's Attention) and repeats no
communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.kernels.attention import attention
from megalite.kernels.attention_block import attention_block, attention_block_backward
from megalite.parallel import comm

CP_COMMS = ("ring", "all-to-all")
_TAG_KV, _TAG_DKV = 11, 12


def _count(op: str, nbytes: int) -> None:
    """Record bytes this rank sends under ``comm.count_comm()`` (ops "cp_ring_p2p",
    "cp_all_to_all": the bytes that leave this rank, not a collective's payload)."""
    for stats in comm._ACTIVE_STATS:
        stats.bytes[op] += nbytes
        stats.calls[op] += 1


# ------------------------------------------------------------------ checks and sharding
def check_context_parallel(seq_len: int | None, cp: int, comm: str = "ring",
                           n_heads: int | None = None, n_kv_heads: int | None = None,
                           tp: int = 1) -> None:
    """Raise a one-line ValueError naming the fix when ``seq_len`` (None: not checked) or
    the heads (None: not checked) do not split over ``cp``."""
    if comm not in CP_COMMS:
        raise ValueError(f"--cp-comm {comm!r}: choose one of {', '.join(CP_COMMS)}")
    if cp < 1:
        raise ValueError(f"--cp must be >= 1, got {cp}")
    if cp == 1:
        return
    if seq_len is not None and seq_len % (2 * cp):
        raise ValueError(f"--cp {cp} cuts each sequence into 2*cp = {2 * cp} chunks: --seq-len "
                         f"{seq_len} must be divisible by {2 * cp}")
    if comm == "all-to-all" and n_heads is not None:
        heads, kv = n_heads // tp, (n_kv_heads or n_heads) // tp
        if heads % cp or kv % cp:
            raise ValueError(f"--cp-comm all-to-all splits the heads over cp: the {heads} query "
                             f"and {kv} kv heads per tp rank must be divisible by --cp {cp}; "
                             f"use --cp-comm ring")


def check_context_model(model, cp: int) -> None:
    """Raise ValueError unless ``model`` can run on this rank's chunks of each sequence.

    Under cp > 1 a rank holds 2 of the 2*cp chunks: a model that does not know it (its
    attention does not run the ring over the cp group, its positions are not the chunks')
    would attend only within its own chunks and train wrong without an error. A model
    declares it knows with ``supports_context_parallel = True`` (megalite's GPT does)."""
    if cp > 1 and not getattr(model, "supports_context_parallel", False):
        raise ValueError(f"{type(model).__name__} does not declare supports_context_parallel "
                         f"= True: with cp={cp} each rank would attend only to its own chunks "
                         f"of the sequence; use cp=1, or give the model context-parallel "
                         f"attention and positions (megalite.parallel.context) and set the "
                         f"attribute")


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2*cp) cp rank ``rank`` holds, in its local order."""
    return rank, 2 * cp - 1 - rank


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's part of ``x`` along ``dim``: chunks ``chunk_ids(cp, rank)``."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    a, b = chunk_ids(cp, rank)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every cp rank's shard (in cp-rank order)."""
    cp = len(shards)
    chunks = [None] * (2 * cp)
    for r, s in enumerate(shards):
        a, b = chunk_ids(cp, r)
        chunks[a], chunks[b] = s.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def positions(local_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Position ids [local_len] of the tokens cp rank ``rank`` holds (its two chunks)."""
    c = local_len // 2
    a, b = chunk_ids(cp, rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device),
                      torch.arange(b * c, (b + 1) * c, device=device)])


def context_attention(q, k, v, group, *, window: int | None = None, scale: float | None = None,
                      comm: str = "ring", backend: str = "auto") -> torch.Tensor:
    """Causal attention of this cp rank's queries over the whole sequence held by ``group``.

    q [b, h, s, d], k/v [b, h_kv, s, d] hold this rank's two chunks (``shard_sequence``);
    returns this rank's output rows [b, h, s, d], differentiable in q, k and v."""
    if comm == "all-to-all":
        return _ulysses(q, k, v, group, window, scale, backend)
    if comm != "ring":
        raise ValueError(f"comm={comm!r}: choose one of {CP_COMMS}")
    return _RingAttention.apply(q, k, v, group, window, scale, backend)


# ------------------------------------------------------------------ ring attention
def _ring_peers(group):
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    return (cp, r, dist.get_global_rank(group, (r + 1) % cp),
            dist.get_global_rank(group, (r - 1) % cp))


class _Transfer:
    """Send ``buf`` to the next rank and receive the previous rank's, asynchronously."""

    def __init__(self, buf, group, nxt, prv, tag, step: int):
        self.send, self.recv = buf.contiguous(), torch.empty_like(buf)
        self.nxt, self.prv, self.tag, self.step = nxt, prv, tag, step
        ops = [dist.P2POp(dist.isend, self.send, nxt, group, tag),
               dist.P2POp(dist.irecv, self.recv, prv, group, tag)]
        self.reqs = dist.batch_isend_irecv(ops)
        _count("cp_ring_p2p", self.send.numel() * self.send.element_size())

    def wait(self) -> torch.Tensor:
        try:
            for req in self.reqs:
                req.wait()
        except RuntimeError as e:  # a timeout or a dead peer: say where in the ring
            what = "K/V" if self.tag == _TAG_KV else "dK/dV"
            raise RuntimeError(
                f"rank {dist.get_rank() if dist.is_initialized() else 0}: context-parallel "
                f"ring step {self.step}: sending {what} {tuple(self.recv.shape)} to rank "
                f"{self.nxt} / receiving it from rank {self.prv} failed: {e}") from e
        self.send = None
        return self.recv


def _pairs(cp: int, rank: int, src: int, c: int, window):
    """The non-empty (query chunk, key chunk, offset, causal) blocks of rank ``rank``'s
    queries against rank ``src``'s keys; chunks are 0/1 in the local order."""
    out = []
    for qa, qchunk in enumerate(chunk_ids(cp, rank)):
        for ka, kchunk in enumerate(chunk_ids(cp, src)):
            offset = (qchunk - kchunk) * c  # query row i sits at key position i + offset
            if offset + c - 1 < 0:
                continue  # every key in the future
            if window is not None and offset - (c - 1) >= window:
                continue  # every key beyond the window
            # a full block sees all its keys: no mask, and the window passes over it
            full = offset >= c - 1 and (window is None or offset + c - 1 < window)
            out.append((qa, ka, offset, not full))
    return out


def _merge(acc, blk_out, blk_lse):
    """Fold a block's (out, lse) into the running (out fp32, lse) of the same rows."""
    if acc is None:
        return blk_out.float(), blk_lse
    out, lse = acc
    new = torch.logaddexp(lse, blk_lse)
    safe = new.masked_fill(new == float("-inf"), 0.0)  # rows no block has seen yet
    out = (out * torch.exp(lse - safe)[..., None]
           + blk_out.float() * torch.exp(blk_lse - safe)[..., None])
    return out, new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, window, scale, backend):
        cp, r, nxt, prv = _ring_peers(group)
        c = q.shape[2] // 2
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        kv = torch.stack([k, v])  # one message per step; only the kv heads that exist
        acc = [None, None]
        for i in range(cp):
            transfer = _Transfer(kv, group, nxt, prv, _TAG_KV, i) if i < cp - 1 else None
            src = (r - i) % cp
            for qa, ka, offset, causal in _pairs(cp, r, src, c, window):
                o, lse = attention_block(
                    q[:, :, qa * c:(qa + 1) * c], kv[0][:, :, ka * c:(ka + 1) * c],
                    kv[1][:, :, ka * c:(ka + 1) * c], causal=causal, scale=scale,
                    window=window if causal else None, offset=offset, backend=backend)
                acc[qa] = _merge(acc[qa], o, lse)
            if transfer is not None:
                kv = transfer.wait()
        # Laid out [b, s, h, d] in memory, so the caller's transpose + reshape to
        # [b, s, h*d] is a view: the output is stored once, for us and for the projection.
        b_, h, s, d = q.shape
        out = torch.empty(b_, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        out[:, :, :c], out[:, :, c:] = acc[0][0], acc[1][0]
        lse = torch.cat([acc[0][1], acc[1][1]], dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.window, ctx.scale, ctx.backend = group, window, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, window, scale = ctx.group, ctx.window, ctx.scale
        cp, r, nxt, prv = _ring_peers(group)
        c = q.shape[2] // 2
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O) over the whole row
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv_transfer = None
        for i in range(cp):
            kv_transfer = _Transfer(kv, group, nxt, prv, _TAG_KV, i) if i < cp - 1 else None
            src = (r - i) % cp
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for qa, ka, offset, causal in _pairs(cp, r, src, c, window):
                rows, cols = slice(qa * c, (qa + 1) * c), slice(ka * c, (ka + 1) * c)
                dq_b, dk_b, dv_b = attention_block_backward(
                    q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], dout[:, :, rows],
                    lse[:, :, rows], delta[:, :, rows], causal=causal, scale=scale,
                    window=window if causal else None, offset=offset, backend=ctx.backend,
                    out=out[:, :, rows])
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += dk_b
                dkv[1][:, :, cols] += dv_b
            if dkv_transfer is not None:  # the gradient of src's K/V so far, from rank r-1
                dkv += dkv_transfer.wait()
            dkv_transfer = _Transfer(dkv, group, nxt, prv, _TAG_DKV, i)  # overlaps next block
            if kv_transfer is not None:
                kv = kv_transfer.wait()
        dkv = dkv_transfer.wait()  # after cp hops: this rank's own K/V gradient
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None)


# ------------------------------------------------------------------ all-to-all (Ulysses)
def _seq_to_heads(x, group):
    """[b, h, s_local, d] (this rank's two chunks) -> [b, h/cp, S, d] in sequence order."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.reshape(b, cp, h // cp, s, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    _count("cp_all_to_all", send.numel() * send.element_size() * (cp - 1) // cp)
    return unshard_sequence(list(recv.unbind(0)), dim=2)


def _heads_to_seq(y, group):
    """Inverse of :func:`_seq_to_heads`: [b, h/cp, S, d] -> [b, h, s_local, d]."""
    cp = dist.get_world_size(group)
    send = torch.stack([shard_sequence(y, cp, j, dim=2) for j in range(cp)]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    _count("cp_all_to_all", send.numel() * send.element_size() * (cp - 1) // cp)
    _, b, hc, s, d = recv.shape
    return recv.transpose(0, 1).reshape(b, cp * hc, s, d)


class _Reshard(torch.autograd.Function):
    """sequence <-> heads re-sharding; each direction's backward is the other."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _seq_to_heads(x, group) if to_heads else _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        return (_heads_to_seq(g, ctx.group) if ctx.to_heads else _seq_to_heads(g, ctx.group),
                None, None)


def _ulysses(q, k, v, group, window, scale, backend):
    cp = dist.get_world_size(group)
    if q.shape[1] % cp or k.shape[1] % cp:
        raise ValueError(f"all-to-all context parallelism: {q.shape[1]} query and {k.shape[1]} "
                         f"kv heads per rank must be divisible by cp={cp}; use comm='ring'")
    q, k, v = (_Reshard.apply(t, group, True) for t in (q, k, v))
    out = attention(q, k, v, causal=True, scale=scale, window=window, backend=backend)
    return _Reshard.apply(out, group, False)
