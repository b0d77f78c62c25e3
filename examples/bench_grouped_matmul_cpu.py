"""Expert matmuls on the CPU: per-expert loops, megalite's grouped_matmul and torch._grouped_mm.

On the CPU ``kernels.grouped_matmul`` runs its torch reference (the per-expert loop with
``unbind``), so this measures the CPU fallback and the baselines, not the Triton kernel
(GPU figures: ``python -m megalite.kernels.bench grouped_matmul`` on a CUDA machine).
It shows why the loop must not index ``w[e]``: that backward writes one full-size
[E, K, N] zero gradient per expert.

    OMP_NUM_THREADS=1 python examples/bench_grouped_matmul_cpu.py
"""
import argparse
import statistics
import time

import torch

from megalite import kernels


def median_ms(fn, reps=5):
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def routed_sizes(rows, experts, skew, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(skew * torch.randn(experts, generator=g), 0)
    sizes = (p * rows).floor().long()
    sizes[p.argmax()] += rows - sizes.sum()
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="routed rows (tokens x top-k)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--skew", type=float, default=0.5, help="router imbalance (0 = balanced)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    names = ["loop `w[e]`", "loop `unbind`", "`grouped_matmul` (torch path)"]
    if hasattr(torch, "_grouped_mm"):
        names.append("`torch._grouped_mm`")
    print(f"torch {torch.__version__}, fp32, {torch.get_num_threads()} thread(s); "
          "ms, best of 3 medians of 5")
    print("| T, E, K x N | mode | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for e in args.experts:
        sizes = routed_sizes(args.rows, e, args.skew)
        host, offsets = sizes.tolist(), sizes.cumsum(0).to(torch.int32)
        x = torch.randn(args.rows, args.k, requires_grad=True)
        w = (torch.randn(e, args.k, args.n) / args.k ** 0.5).requires_grad_()
        fns = [lambda: torch.cat([xe @ w[i] for i, xe in enumerate(x.split(host))]),
               lambda: torch.cat([xe @ we for xe, we in zip(x.split(host), w.unbind(0))]),
               lambda: kernels.grouped_matmul(x, w, sizes, backend="torch"),
               lambda: torch._grouped_mm(x, w, offs=offsets)][:len(names)]
        dy = torch.randn(args.rows, args.n)
        for mode in ("fwd", "fwd+bwd"):
            cells = []
            for f in fns:
                run = f if mode == "fwd" else (lambda f=f: torch.autograd.grad(f(), [x, w], dy))
                try:
                    cells.append(f"{min(median_ms(run) for _ in range(3)):.1f}")
                except RuntimeError as exc:  # e.g. a build without a CPU grouped_mm
                    cells.append(f"error: {str(exc)[:40]}")
            print(f"| {args.rows}, {e}, {args.k} x {args.n} | {mode} | " + " | ".join(cells)
                  + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
