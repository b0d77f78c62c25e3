"""Distributed optimizer and overlapped gradient reduction: bytes per parameter and step time.

Part 1, memory: for dp = 1, 2, 4 (tp = 1, pp = world / dp) it builds the model with AdamW,
plain and through the distributed optimizer, takes one step, and counts the bytes of the
tensors each rank's optimizer holds (its moments) and of its gradients, per parameter of the
rank's stage; the formula is 4 + 4 + 8 (plain) and 4 + 4 + 8/dp (distributed).
Part 2, speed: at dp = world (tp = pp = 1) the median step time of plain / distributed
optimizer, each with the gradient reduction after the backward or overlapped with it.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/bench_dist_opt.py --steps 15
"""
import argparse
import json
import statistics
import time

import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import comm
from megalite.training.optim import build_optimizer
from megalite.training.step import attach_grad_buffer, train_step


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2, help="per dp rank")
    p.add_argument("--bucket-mb", type=float, default=1.0,
                   help="gradient bucket size (library default 25; smaller shows the overlap "
                        "on a small model)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warmup)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def batch(cfg, ps, args):
    g = torch.Generator().manual_seed(0)
    per_rank = args.micro_batch_size * args.microbatches
    data = torch.randint(0, cfg.vocab_size, (per_rank * ps.dp, args.seq_len + 1), generator=g)
    mine = data[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
    return mine[:, :-1], mine[:, 1:]


def build(cfg, ps, distributed, bucket_bytes):
    torch.manual_seed(0)
    model = GPT(cfg, state=ps)
    attach_grad_buffer(model, shard=distributed, bucket_bytes=bucket_bytes)
    return model, build_optimizer(model, lr=1e-3, distributed=distributed)


def memory_rows(cfg, args, world):
    rows = []
    for dp in (1, 2, 4):
        if world % dp:
            continue
        ps = parallel.initialize(tp=1, pp=world // dp, dp=dp)
        for distributed in (False, True):
            model, opt = build(cfg, ps, distributed, int(args.bucket_mb * 2**20))
            tokens, targets = batch(cfg, ps, args)
            train_step(model, opt, tokens, targets, micro_batch_size=args.micro_batch_size)
            n = sum(p.numel() for p in model.parameters())
            state = sum(v.numel() * v.element_size() for st in opt.state.values()
                        for v in st.values() if torch.is_tensor(v) and v.dim())
            grads = model.main_grads.nbytes()
            worst = torch.tensor([state / n, grads / n])
            comm.all_reduce(worst, torch.distributed.group.WORLD,
                            op=torch.distributed.ReduceOp.MAX)
            rows.append({"dp": dp, "pp": world // dp, "distributed": distributed,
                         "params_per_rank": n, "weight": 4.0, "grad": worst[1].item(),
                         "optimizer_state": worst[0].item(),
                         "formula_state": 8.0 / dp if distributed else 8.0})
        parallel.destroy()
    return rows


def speed_rows(cfg, args, world):
    ps = parallel.initialize(tp=1, pp=1, dp=world)
    rows = []
    builds = {(d, o): build(cfg, ps, d, int(args.bucket_mb * 2**20))
              for d in (False, True) for o in (False, True)}
    tokens, targets = batch(cfg, ps, args)
    times = {k: [] for k in builds}
    for i in range(args.steps + 2):  # alternate the four, so load drifts hit all alike
        for (distributed, overlap), (model, opt) in builds.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, tokens, targets, micro_batch_size=args.micro_batch_size,
                       overlap_grad_reduce=overlap)
            if i >= 2:
                times[(distributed, overlap)].append(time.perf_counter() - t0)
    base = statistics.median(times[(False, False)])
    for (distributed, overlap), ts in times.items():
        ms = statistics.median(ts) * 1e3
        rows.append({"dp": world, "distributed": distributed, "overlap": overlap,
                     "ms_per_step": ms, "vs_plain_after": ms / (base * 1e3)})
    parallel.destroy()
    return rows


def main():
    args = parse_args()
    # One default group for the whole run: each layout below builds its groups inside it.
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    cfg = GPTConfig.preset(args.model, kernels="torch")
    mem, speed = memory_rows(cfg, args, world), speed_rows(cfg, args, world)
    if torch.distributed.get_rank() == 0:
        print(f"{args.model}, world {world}, bytes per parameter on the fullest rank:")
        print("| dp | optimizer | weight | grad | optimizer state | total | formula |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in mem:
            total = r["weight"] + r["grad"] + r["optimizer_state"]
            formula = f"4 + 4 + {r['formula_state']:g} = {8 + r['formula_state']:g}"
            print(f"| {r['dp']} | {'distributed' if r['distributed'] else 'plain'} | "
                  f"{r['weight']:.0f} | {r['grad']:.3f} | {r['optimizer_state']:.3f} | "
                  f"{total:.3f} | {formula} |")
        print(f"\nstep time at dp={world} (median of {args.steps}, {args.microbatches} "
              f"microbatches of {args.micro_batch_size} x {args.seq_len}, buckets "
              f"{args.bucket_mb:g} MiB):")
        print("| optimizer | gradient reduction | ms / step | vs plain, after backward |")
        print("|---|---|---:|---:|")
        for r in speed:
            print(f"| {'distributed' if r['distributed'] else 'plain'} | "
                  f"{'overlapped' if r['overlap'] else 'after backward'} | "
                  f"{r['ms_per_step']:.1f} | {r['vs_plain_after']:.2f}x |")
        if args.json:
            meta = {"torch": torch.__version__, "device": "cpu", "model": args.model}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "memory": mem, "speed": speed}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
