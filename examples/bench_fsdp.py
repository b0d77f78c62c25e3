"""FSDP beside plain data parallelism: bytes per parameter a rank holds, and step time.

Part 1, memory: for dp = 1, 2, 4 (tp = 1, pp = world / dp) and fp32 / bf16 it builds the
model with AdamW, plain (gradient buffer, whole optimizer state) and with FSDP
(``megalite.parallel.fsdp.fully_shard_model``: torch's fully_shard per block), takes one
step and counts the bytes of this rank's real tensors: parameters, gradients and AdamW
moments (local shards for FSDP), per parameter of the rank's stage (the largest over ranks).
Between steps FSDP holds 16/dp bytes per parameter in both dtypes (bf16 changes only the
gathered copies); plain holds 16. Beside them, what FSDP held on top at the end of the
step's schedule (``model.fsdp_gathered_bytes``): the gathered root group (embeddings, head)
and the unsharded gradients still waiting for the reduction.
Part 2, speed: at dp = world (tp = pp = 1) the median step time of plain, FSDP and FSDP
reducing gradients once a step (``reduce_every_microbatch=False``), in fp32 and bf16, the
six alternating in one run so load drifts hit all alike.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/bench_fsdp.py --steps 10
"""
import argparse
import json
import resource
import statistics
import time

import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import comm, fsdp
from megalite.training.optim import build_optimizer
from megalite.training.step import train_step


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2, help="per dp rank")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warmup)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def batch(cfg, ps, args):
    g = torch.Generator().manual_seed(0)
    per_rank = args.micro_batch_size * args.microbatches
    data = torch.randint(0, cfg.vocab_size, (per_rank * ps.dp, args.seq_len + 1), generator=g)
    mine = data[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
    return mine[:, :-1], mine[:, 1:]


MODES = {False: "plain", True: "FSDP", "once": "FSDP, reduce once a step"}


def build(cfg, ps, sharded, dtype):
    torch.manual_seed(0)
    model = GPT(cfg, state=ps)
    if sharded:
        fsdp.fully_shard_model(model, ps, param_dtype=torch.bfloat16 if dtype == "bf16"
                               else None, reduce_every_microbatch=sharded != "once")
    return model, build_optimizer(model, lr=1e-3)


def held_bytes(model, opt):
    """{params, grads, optimizer}: bytes of this rank's tensors (a gradient buffer counts
    whole: the .grad tensors are views into it)."""
    held = fsdp.local_bytes(model, opt)
    buffer = getattr(model, "grad_buffer", None)
    if buffer is not None:
        held["grads"] = buffer.data.numel() * buffer.data.element_size()
    return held


def memory_rows(cfg, args, world):
    rows = []
    for dp in (1, 2, 4):
        if world % dp:
            continue
        ps = parallel.initialize(tp=1, pp=world // dp, dp=dp)
        for dtype in ("fp32", "bf16"):
            for sharded in (False, True):
                model, opt = build(cfg, ps, sharded, dtype)
                tokens, targets = batch(cfg, ps, args)
                train_step(model, opt, tokens, targets,
                           micro_batch_size=args.micro_batch_size, dtype=dtype)
                n = sum(p.numel() for p in model.parameters())
                held = held_bytes(model, opt)
                worst = torch.tensor([held["params"] / n, held["grads"] / n,
                                      held["optimizer"] / n])
                comm.all_reduce(worst, torch.distributed.group.WORLD,
                                op=torch.distributed.ReduceOp.MAX)
                # at the end of the schedule, before the reduction: gathered parameters and
                # unsharded gradients (the root group's, and every block's when they wait)
                extra = getattr(model, "fsdp_gathered_bytes", None) or {}
                transient = torch.tensor([extra.get("gathered_params", 0) / n,
                                          extra.get("unsharded_grads", 0) / n])
                comm.all_reduce(transient, torch.distributed.group.WORLD,
                                op=torch.distributed.ReduceOp.MAX)
                rows.append({"dp": dp, "pp": world // dp, "dtype": dtype, "fsdp": sharded,
                             "params_per_rank": n, "weight": worst[0].item(),
                             "grad": worst[1].item(), "optimizer_state": worst[2].item(),
                             "formula": 16.0 / dp if sharded else 16.0,
                             "gathered_params": transient[0].item(),
                             "unsharded_grads": transient[1].item()})
        parallel.destroy()
    return rows


def speed_rows(cfg, args, world):
    ps = parallel.initialize(tp=1, pp=1, dp=world)
    builds = {(s, d): build(cfg, ps, s, d) for d in ("fp32", "bf16") for s in MODES}
    tokens, targets = batch(cfg, ps, args)
    times = {k: [] for k in builds}
    for i in range(args.steps + 2):
        for (sharded, dtype), (model, opt) in builds.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, tokens, targets, micro_batch_size=args.micro_batch_size,
                       dtype=dtype)
            if i >= 2:
                times[(sharded, dtype)].append(time.perf_counter() - t0)
    rows = []
    for (sharded, dtype), ts in times.items():
        base = statistics.median(times[(False, dtype)])
        rows.append({"dp": world, "fsdp": sharded, "dtype": dtype,
                     "ms_per_step": statistics.median(ts) * 1e3,
                     "vs_plain": statistics.median(ts) / base})
    parallel.destroy()
    return rows


def main():
    args = parse_args()
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    cfg = GPTConfig.preset(args.model, kernels="torch")
    mem, speed = memory_rows(cfg, args, world), speed_rows(cfg, args, world)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10])
    comm.all_reduce(rss, torch.distributed.group.WORLD, op=torch.distributed.ReduceOp.MAX)
    if torch.distributed.get_rank() == 0:
        print(f"{args.model}, world {world}, bytes per parameter on the fullest rank "
              f"(between steps):")
        print("| dp | dtype | data parallelism | weight | grad | AdamW state | total | "
              "formula | + gathered params at step end | + unsharded grads at step end |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in mem:
            total = r["weight"] + r["grad"] + r["optimizer_state"]
            print(f"| {r['dp']} | {r['dtype']} | {'FSDP' if r['fsdp'] else 'plain'} | "
                  f"{r['weight']:.3f} | {r['grad']:.3f} | {r['optimizer_state']:.3f} | "
                  f"{total:.3f} | {r['formula']:g} | {r['gathered_params']:.3f} | "
                  f"{r['unsharded_grads']:.3f} |")
        print(f"\nstep time at dp={world} (median of {args.steps}, {args.microbatches} "
              f"microbatches of {args.micro_batch_size} x {args.seq_len}); peak RSS of a "
              f"process over the whole run {rss.item():.0f} MiB:")
        print("| dtype | data parallelism | ms / step | vs plain |")
        print("|---|---|---:|---:|")
        for r in speed:
            print(f"| {r['dtype']} | {MODES[r['fsdp']]} | "
                  f"{r['ms_per_step']:.1f} | {r['vs_plain']:.2f}x |")
        if args.json:
            meta = {"torch": torch.__version__, "device": "cpu", "model": args.model}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "memory": mem, "speed": speed}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
