"""Context parallelism on this machine: memory, load balance, traffic and step time.

    OMP_NUM_THREADS=1 python examples/bench_context_parallel.py            # CPU, gloo
    python examples/bench_context_parallel.py --seq 4096 --out cp.jsonl

It spawns its own gloo worlds (1, 2 and 4 processes) and prints four tables:

1. **Memory**: bytes one llama-style layer saves for backward on each rank at --seq tokens
   for cp = 1, 2, 4 (saved-tensor hooks, parameters and position tables left out), next
   to ``models.activation_memory.saved_activation_bytes`` at seq/cp tokens: ~1/cp.
2. **Balance**: the attention compute (forward + backward of every block a rank runs over
   the ring, timed one rank after the other in one process, CPU time) with the
   load-balanced chunks (rank i holds chunks i and 2cp-1-i) and with naive contiguous
   pieces (rank i holds [i*s/cp, (i+1)*s/cp)), and the slowest/fastest ratio.
3. **Traffic**: bytes each rank sends in one forward + backward of the model for the ring
   and all-to-all, counted at the send (``comm.count_comm``), against the formulas:
   ring per layer ``2(cp-1) K/V shards + cp fp32 dK/dV shards``; all-to-all per layer
   ``(cp-1)/cp x (q + k + v + o)`` forward and the same backward.
4. **Step time**: forward + backward + gradient all-reduce of the same model and global
   sequence, one process vs cp = 2 (wall and CPU time, median of --steps).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite import parallel
from megalite.kernels.attention import attention_block, attention_block_backward
from megalite.models import GPT, GPTConfig
from megalite.models.activation_memory import count_saved_bytes, saved_activation_bytes
from megalite.parallel import comm
from megalite.parallel.context import _pairs, shard_sequence


def config(args, n_layers=1, **kw):
    return GPTConfig(vocab_size=512, n_layers=n_layers, n_heads=args.heads,
                     n_kv_heads=args.kv_heads, d_model=args.d_model, max_seq_len=args.seq,
                     kernels="torch", **kw)


# ------------------------------------------------------------------ worlds
def _entry(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), MEGALITE_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, args)))
    finally:
        parallel.destroy()
        dist.destroy_process_group()


def spawn(world, fn, args):
    """Run ``fn(rank, world, args)`` in ``world`` fresh processes; results in rank order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_entry, args=(world, port, fn, args, queue), nprocs=world,
                       start_method="spawn")
    out = dict(queue.get() for _ in range(world))
    return [out[r] for r in range(world)]


# ------------------------------------------------------------------ 1. memory
def _memory(rank, world, args):
    ps = parallel.initialize(cp=world)
    cfg = config(args)
    torch.manual_seed(0)
    model = GPT(cfg, ps)
    s = args.seq // world
    x = torch.randn(1, s, cfg.d_model, requires_grad=True)
    pos = model.positions(s)
    rope = (model.rope_cos[pos], model.rope_sin[pos])  # per stage, shared by its layers
    _, saved = count_saved_bytes(model.layers["0"], x, rope,
                                 exclude=[*model.parameters(), *model.buffers(), *rope])
    return saved


def memory_table(args, rows):
    print(f"\n1. saved activation bytes of one layer per rank, seq {args.seq}, "
          f"d_model {args.d_model}, {args.heads} heads ({args.kv_heads} kv), fp32")
    print(f"{'cp':>3} {'measured MiB':>13} {'predicted MiB':>14} {'meas/pred':>10} "
          f"{'vs cp=1':>8}")
    base = None
    for cp in (1, 2, 4):
        measured = max(spawn(cp, _memory, args)) if cp > 1 else _memory_single(args)
        predicted = saved_activation_bytes(config(args), 1, args.seq // cp)
        base = base or measured
        print(f"{cp:>3} {measured / 2**20:>13.2f} {predicted / 2**20:>14.2f} "
              f"{measured / predicted:>10.3f} {measured / base:>8.3f}")
        rows.append(dict(bench="memory", cp=cp, seq=args.seq, measured_bytes=measured,
                         predicted_bytes=predicted))


def _memory_single(args):
    parallel.destroy()
    cfg = config(args)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randn(1, args.seq, cfg.d_model, requires_grad=True)
    _, saved = count_saved_bytes(model.layers["0"], x, (model.rope_cos, model.rope_sin),
                                 exclude=[*model.parameters(), *model.buffers()])
    return saved


# ------------------------------------------------------------------ 2. balance
def _blocks(cp, rank, src, c, balanced):
    """(q rows, k rows, offset, causal) blocks rank ``rank`` computes against ``src``."""
    if balanced:
        return [((qa * c, (qa + 1) * c), (ka * c, (ka + 1) * c), off, causal)
                for qa, ka, off, causal in _pairs(cp, rank, src, c, None)]
    piece = 2 * c
    if src > rank:
        return []
    return [((0, piece), (0, piece), (rank - src) * piece, src == rank)]


def balance_table(args, rows):
    print(f"\n2. attention compute per rank (fwd + bwd of its ring blocks, CPU ms), seq "
          f"{args.seq}, {args.heads} heads, head dim {args.d_model // args.heads}")
    hd, torch_gen = args.d_model // args.heads, torch.Generator().manual_seed(0)
    for cp in (2, 4):
        c = args.seq // (2 * cp)
        q = torch.randn(1, args.heads, 2 * c, hd, generator=torch_gen)
        k = torch.randn(1, args.kv_heads, 2 * c, hd, generator=torch_gen)
        do = torch.randn_like(q)
        for balanced in (True, False):
            times = []
            for rank in range(cp):
                t0 = time.process_time()
                for i in range(cp):
                    for (q0, q1), (k0, k1), off, causal in _blocks(cp, rank, (rank - i) % cp,
                                                                   c, balanced):
                        qq, kk = q[:, :, q0:q1], k[:, :, k0:k1]
                        o, lse = attention_block(qq, kk, kk, causal=causal, offset=off)
                        delta = (do[:, :, q0:q1] * o).sum(-1)
                        attention_block_backward(qq, kk, kk, do[:, :, q0:q1], lse, delta,
                                                 causal=causal, offset=off, out=o)
                times.append((time.process_time() - t0) * 1e3)
            name = "balanced" if balanced else "contiguous"
            print(f"cp={cp} {name:>10}: " + " ".join(f"{t:8.1f}" for t in times)
                  + f"   slowest/fastest {max(times) / max(min(times), 1e-9):6.2f}")
            rows.append(dict(bench="balance", cp=cp, seq=args.seq, sharding=name,
                             rank_ms=times))


# ------------------------------------------------------------------ 3. traffic, 4. step
def _train_once(model, tokens, targets, ps):
    loss = model.loss(model(tokens, head_input=True), targets)
    loss.backward()
    for p in model.parameters():  # what the gradient path does: average over dp x cp
        comm.all_reduce(p.grad, ps.dp_cp_group).div_(ps.dp_cp)
        p.grad = None


def _traffic_and_time(rank, world, args, comm_kind="ring", steps=0):
    ps = parallel.initialize(cp=world)
    cfg = config(args, n_layers=args.layers, cp_comm=comm_kind)
    torch.manual_seed(0)
    model = GPT(cfg, ps)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), generator=g)
    tokens, targets = (shard_sequence(t, ps.cp, ps.cp_rank) for t in (data[:, :-1], data[:, 1:]))
    with comm.count_comm() as stats:
        _train_once(model, tokens, targets, ps)
    walls, cpus = [], []
    for _ in range(steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        _train_once(model, tokens, targets, ps)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return dict(stats.bytes), walls, cpus


def traffic_table(args, rows):
    print(f"\n3. bytes sent per rank for one forward + backward, {args.layers} layers, seq "
          f"{args.seq}, fp32")
    hd, s, e = args.d_model // args.heads, args.seq, 4
    for cp in (2, 4):
        for kind, op in (("ring", "cp_ring_p2p"), ("all-to-all", "cp_all_to_all")):
            if kind == "all-to-all" and (args.heads % cp or args.kv_heads % cp):
                continue
            sent = spawn(cp, _traffic_world, (args, kind))
            measured = max(r[0].get(op, 0) for r in sent)
            shard = args.kv_heads * (s // cp) * hd  # one K (or V) shard, elements
            if kind == "ring":
                theory = args.layers * (2 * (cp - 1) * 2 * shard * e + cp * 2 * shard * 4)
            else:
                acts = (2 * args.heads + 2 * args.kv_heads) * (s // cp) * hd
                theory = args.layers * 2 * acts * e * (cp - 1) // cp
            print(f"cp={cp} {kind:>10}: measured {measured / 2**20:9.3f} MiB, formula "
                  f"{theory / 2**20:9.3f} MiB")
            rows.append(dict(bench="traffic", cp=cp, comm=kind, seq=s, measured_bytes=measured,
                             formula_bytes=theory))


def _traffic_world(rank, world, args_kind):
    return _traffic_and_time(rank, world, *args_kind)


def step_table(args, rows):
    print(f"\n4. step time (fwd + bwd + grad all-reduce), {args.layers} layers, seq "
          f"{args.seq}, median of {args.steps}")
    single = spawn(1, _step_world, args)[0]
    cp2 = spawn(2, _step_world, args)
    for name, (walls, cpus) in (("1 process", single), ("cp=2", cp2[0])):
        print(f"{name:>10}: wall {statistics.median(walls) * 1e3:8.1f} ms, CPU "
              f"{statistics.median(cpus) * 1e3:8.1f} ms per rank")
    ratio = statistics.median(cp2[0][0]) / statistics.median(single[0])
    print(f"cp=2 / 1 process wall: {ratio:.2f}")
    rows.append(dict(bench="step", seq=args.seq, single_ms=statistics.median(single[0]) * 1e3,
                     cp2_ms=statistics.median(cp2[0][0]) * 1e3))


def _step_world(rank, world, args):
    _, walls, cpus = _traffic_and_time(rank, world, args, "ring", args.steps)
    return walls, cpus


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default="memory,balance,traffic,step")
    p.add_argument("--out", default=None, help="JSON lines, one row per figure")
    args = p.parse_args()
    rows = []
    tables = dict(memory=memory_table, balance=balance_table, traffic=traffic_table,
                  step=step_table)
    for name in args.only.split(","):
        tables[name](args, rows)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
