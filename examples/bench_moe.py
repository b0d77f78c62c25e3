"""One MoE layer's forward + backward at ep = 1, 2, 4 on CPU processes, and the bytes its
all-to-alls move against theory.

Each of ``ep`` gloo processes routes its own ``--tokens`` tokens (data parallel, experts
split over the ep group) through one MoE layer of the ``--model`` preset's shapes. The
layer's time is the median over ``--reps`` forward + backward passes (rank 0's clock, after
a barrier). Bytes are counted by ``parallel.count_comm`` on rank 0: the all-to-all payload
is the rows a rank sends plus the rows it receives (itself included), so with balanced
routing each of the 4 token all-to-alls of a forward + backward (dispatch, combine, and
their gradients) moves ``2 * tokens * top_k * d_model * 4`` bytes; of the rows sent,
``(ep - 1) / ep`` leave the process.

    OMP_NUM_THREADS=1 python examples/bench_moe.py --eps 1 2 4
"""
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), MEGALITE_DEVICE="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megalite import parallel
    from megalite.models import GPT, GPTConfig
    ps = parallel.initialize(ep=world)
    cfg = GPTConfig.preset(args.model, n_layers=1, kernels="torch")
    torch.manual_seed(0)
    layer = GPT(cfg, ps).layers["0"].mlp
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.tokens, cfg.d_model, generator=g, requires_grad=True)

    def step():
        layer(x).sum().backward()

    step()
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    with parallel.count_comm() as stats:
        step()
    if rank == 0:
        row_bytes = cfg.d_model * 4
        theory = 4 * 2 * args.tokens * cfg.moe_top_k * row_bytes
        out.put(dict(ep=world, tokens_per_rank=args.tokens, d_model=cfg.d_model,
                     experts=cfg.moe_num_experts, top_k=cfg.moe_top_k,
                     ms=1e3 * statistics.median(times),
                     all_to_all_bytes=stats.bytes.get("all_to_all", 0),
                     all_to_all_calls=stats.calls.get("all_to_all", 0),
                     theory_bytes=theory if world > 1 else 0,
                     off_rank_bytes_theory=(theory // 2) * (world - 1) // world))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="append the rows to this JSONL file")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for ep in args.eps:
        out = ctx.Queue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=_worker, args=(r, ep, port, args, out)) for r in range(ep)]
        for proc in procs:
            proc.start()
        rows.append(out.get(timeout=600))
        for proc in procs:
            proc.join()
    base = rows[0]["ms"]
    print(f"{'ep':>3} {'tok/rank':>8} {'fwd+bwd ms':>10} {'vs ep1':>7} {'a2a calls':>9} "
          f"{'a2a MB':>8} {'theory MB':>9} {'off-rank MB':>11}")
    for r in rows:
        print(f"{r['ep']:>3} {r['tokens_per_rank']:>8} {r['ms']:>10.1f} {r['ms'] / base:>7.2f} "
              f"{r['all_to_all_calls']:>9} {r['all_to_all_bytes'] / 1e6:>8.3f} "
              f"{r['theory_bytes'] / 1e6:>9.3f} {r['off_rank_bytes_theory'] / 1e6:>11.3f}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "torch": torch.__version__}) + "\n")
    return rows


if __name__ == "__main__":
    main()
