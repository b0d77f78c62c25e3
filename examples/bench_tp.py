"""Tensor-parallel transformer block: megalite vs PyTorch's DTensor `parallelize_module`.

Times one llama-style block's forward + backward at tp=2 for megalite (with and without
sequence parallelism) and for PyTorch's ColwiseParallel/RowwiseParallel plan on the same
shapes, alternating in one run, and counts the collective payload each sends per step
against the Megatron minimum (2 all-reduces of b*s*h forward and 2 backward per block).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/bench_tp.py
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/bench_tp.py --batch 8 --seq 512
"""
import argparse
import os
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)
from torch.utils._python_dispatch import TorchDispatchMode

from megalite import parallel
from megalite.models import GPT, GPTConfig


class TorchBlock(nn.Module):
    """The same block written for PyTorch TP: separate q/k/v/o and gate/up/down linears."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, s, -1, self.hd).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


COLLECTIVES = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
               "reduce_scatter_tensor": "reduce_scatter"}


def ring_bytes_sent(payloads: dict, n: int) -> float:
    """Bytes one rank sends with ring algorithms: 2(n-1)/n of an all-reduce's payload,
    (n-1)/n of an all-gather's or reduce-scatter's."""
    return sum(v * (2 if k == "all_reduce" else 1) * (n - 1) / n for k, v in payloads.items())


class CountFunctionalCollectives(TorchDispatchMode):
    """Payload bytes of the collectives DTensor issues (same convention as count_comm)."""

    def __init__(self, world):
        super().__init__()
        self.world, self.bytes = world, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in COLLECTIVES:
            t = args[0]
            factor = self.world if name.startswith("all_gather") else 1
            self.bytes[COLLECTIVES[name]] += t.numel() * t.element_size() * factor
        return func(*args, **(kwargs or {}))


def time_step(fn, x, dy):
    dist.barrier()
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(dy)
    dist.barrier()
    return time.perf_counter() - t0


def plot(path, med_times, sent, minimum, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(med_times)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
    ax1.barh(names, [1e3 * med_times[n] for n in names], color="#4C72B0")
    ax1.set_xlabel("ms per step (median)")
    ax2.barh(names, [sent[n] / 2**20 for n in names], color="#DD8452")
    ax2.axvline(minimum / 2**20, color="k", ls="--", label="Megatron minimum")
    ax2.set_xlabel("MiB sent per rank per step")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--plot", default=None, help="write a PNG of time and bytes per provider")
    args = p.parse_args()
    ps = parallel.initialize(tp=int(os.environ.get("WORLD_SIZE", 1)))
    tp, b, s, d = ps.tp, args.batch, args.seq, args.d_model
    cfg = GPTConfig(vocab_size=256, n_layers=1, n_heads=args.heads, d_model=d, max_seq_len=s,
                    kernels="torch")
    torch.manual_seed(0)
    ours = GPT(cfg).layers["0"]
    ours_sp = GPT(cfg.replace(sequence_parallel=True)).layers["0"]
    theirs = TorchBlock(d, args.heads, cfg.d_ff)
    plan = {name: ColwiseParallel() for name in ("q", "k", "v", "gate", "up")}
    plan.update(o=RowwiseParallel(), down=RowwiseParallel())
    parallelize_module(theirs, init_device_mesh("cpu", (tp,)), plan)

    rope = GPT(cfg).rope_cos, GPT(cfg).rope_sin
    x = torch.randn(b, s, d, requires_grad=True)
    dy = torch.randn(b, s, d)
    x_sp = x.detach().chunk(tp, 1)[ps.tp_rank].clone().requires_grad_()
    dy_sp = dy.chunk(tp, 1)[ps.tp_rank]
    runs = {
        "megalite": (lambda t: ours(t, rope), x, dy),
        "megalite+sp": (lambda t: ours_sp(t, rope), x_sp, dy_sp),
        "torch DTensor": (theirs, x, dy),
    }
    bytes_per_step = {}
    for name, (fn, inp, grad) in runs.items():
        time_step(fn, inp, grad)  # warm-up
        if name.startswith("megalite"):
            with parallel.count_comm() as stats:
                fn(inp).backward(grad)
            bytes_per_step[name] = dict(stats.bytes)
        else:
            counter = CountFunctionalCollectives(tp)
            with counter:
                fn(inp).backward(grad)
            bytes_per_step[name] = dict(counter.bytes)
    times = {name: [] for name in runs}
    for _ in range(args.iters):  # alternate so drift affects all alike
        for name, (fn, inp, grad) in runs.items():
            times[name].append(time_step(fn, inp, grad))
    if ps.rank == 0:
        minimum = ring_bytes_sent({"all_reduce": 4 * b * s * d * 4}, tp)
        print(f"block fwd+bwd, tp={tp}, b={b} s={s} d={d} heads={args.heads} ff={cfg.d_ff}, "
              f"fp32, {args.iters} alternating iterations, median ms; "
              f"torch {torch.__version__}")
        print(f"Megatron minimum per block: 4 all-reduces of b*s*h -> "
              f"{minimum / 2**20:.2f} MiB sent per rank (ring)")
        base = statistics.median(times["torch DTensor"])
        print(f"{'provider':<15} {'ms':>9} {'vs DTensor':>11} {'sent MiB':>9}  payload MiB by collective")
        for name in runs:
            med = statistics.median(times[name])
            sent = ring_bytes_sent(bytes_per_step[name], tp)
            detail = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in bytes_per_step[name].items()
                               if v >= 2**10)
            print(f"{name:<15} {1e3 * med:>9.1f} {med / base:>10.2f}x {sent / 2**20:>9.2f}"
                  f"  {detail}")
        if args.plot:
            plot(args.plot, {n: statistics.median(t) for n, t in times.items()},
                 {n: ring_bytes_sent(b, tp) for n, b in bytes_per_step.items()}, minimum,
                 f"TP block fwd+bwd, tp={tp}, b={b} s={s} d={d}")
    parallel.destroy()


if __name__ == "__main__":
    main()
