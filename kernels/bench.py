"""Microbenchmarks: ``python -m megalite.kernels.bench [op ...] [--out DIR] [--quick]``.

Times forward, backward and forward+backward of each op for each provider (megalite's Triton
kernel, eager PyTorch, torch.compile, and SDPA's flash backend for attention) over a sweep of
sizes (kernels/_bench_cases.py), then:
  * prints a table: ms, GB/s or TFLOP/s, % of the copy bandwidth measured in this run
    (memory-bound ops) and % of the card's spec peak, speed-up over eager PyTorch;
  * writes DIR/bench.json (one row per measurement, with device name and versions),
    DIR/table.md and one plot per op, DIR/<op>.png.
Cross-entropy rows also record the peak memory of a forward+backward.

On CUDA the timings come from triton.testing.do_bench: the L2 cache is flushed before every
repetition, 300 ms of repetitions after 50 ms of warm-up, and the median is reported with the
20th-80th percentile spread (``spread`` = (p80 - p20) / median, in %): a row whose spread is
large was disturbed and should be rerun. Without CUDA the script says so, times only the
torch references on the CPU at tiny sizes (for a smoke check; the fused output head too,
since its chunked path is the CPU path), and exits 0. Peak memory of fwd+bwd is recorded
for the loss ops, on the CPU too (megalite.kernels.memory).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from ._bench_cases import OPS, cases
from .memory import peak_bytes

MODES = ("fwd", "bwd", "fwd+bwd")

# Spec sheet peaks: HBM bandwidth (GB/s) and dense bf16 tensor throughput (TFLOP/s).
SPECS = [("H200", 4800, 989), ("H100 PCIe", 2000, 756), ("H100", 3350, 989),
         ("A100-SXM4-80GB", 2039, 312), ("A100-PCIE-80GB", 1935, 312), ("A100", 1555, 312),
         ("L40S", 864, 362), ("A10G", 600, 70), ("L4", 300, 121)]


def spec_for(name):
    for key, gbps, tflops in SPECS:
        if key.lower() in name.lower():
            return {"GB/s": gbps, "TFLOP/s": tflops}
    return {"GB/s": None, "TFLOP/s": None}


def versions():
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    v["cuda"] = torch.version.cuda
    return v


# ----------------------------------------------------------------------------- timing
def timer(device):
    if device == "cuda":
        from triton.testing import do_bench

        def run(fn, grads_to_none):
            p20, p50, p80 = do_bench(fn, warmup=50, rep=300, grad_to_none=grads_to_none,
                                     quantiles=[0.2, 0.5, 0.8])
            return p50, (p80 - p20) / p50
        return run

    def run_cpu(fn, grads_to_none):
        fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(samples, n=5)
        return statistics.median(samples), (q[3] - q[0]) / statistics.median(samples)
    return run_cpu


def copy_bandwidth(device):
    """GB/s of a large device-to-device copy (read + write), measured now."""
    if device != "cuda":
        return None
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer(device)(lambda: dst.copy_(src), None)
    del src, dst
    return 2 * n * 2 / ms / 1e6


def measure(case, name, fn, mode, run, device):
    inputs = case.make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    if mode == "fwd":
        ms, spread = run(lambda: fn(*inputs), leaves)
    elif mode == "bwd":
        y = fn(*inputs)
        dy = torch.randn_like(y)
        ms, spread = run(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), leaves)
    else:
        y = fn(*inputs)
        dy = torch.randn_like(y)
        del y
        ms, spread = run(lambda: torch.autograd.grad(fn(*inputs), leaves, dy), leaves)
    peak = None
    if case.measure_memory and mode == "fwd+bwd":
        peak = peak_bytes(lambda: torch.autograd.grad(fn(*inputs), leaves, dy),
                          device) / 2**20
    return ms, spread, peak


# ----------------------------------------------------------------------------- sweep
def sweep(ops, device, quick, out_rows, budget_s, copy_gbps, spec, dev_name, vers,
          total_budget_s=None):
    run = timer(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.time()
    for op in ops:
        if total_budget_s and time.time() - start > total_budget_s:
            print(f"  [skip] {op}: past the --budget-s {total_budget_s:.0f}s of the sweep")
            continue
        for case in cases(op, device, dtype, quick):
            providers = case.providers if device == "cuda" else \
                {k: case.providers[k] for k in case.cpu_providers}
            for name, fn in providers.items():
                if name == "compile" and time.time() - start > budget_s:
                    print(f"  [skip] {op} {case.shape} compile: past the {budget_s:.0f}s budget")
                    continue
                for mode in MODES:
                    row = {"op": op, "provider": name, "mode": mode, "shape": case.shape,
                           "dtype": str(dtype).replace("torch.", ""), "unit": case.unit,
                           "device": dev_name, **vers}
                    try:
                        ms, spread, peak = measure(case, name, fn, mode, run, device)
                    except Exception as exc:  # one failing provider must not stop the sweep
                        row.update(ms=None, error=f"{type(exc).__name__}: {exc}"[:300])
                        out_rows.append(row)
                        print(f"  [error] {op} {case.shape} {name} {mode}: {row['error']}")
                        break
                    value = case.work[mode] / ms / (1e6 if case.unit == "GB/s" else 1e9)
                    row.update(ms=round(ms, 4), value=round(value, 2),
                               spread_pct=round(100 * spread, 1))
                    if case.unit == "GB/s" and copy_gbps:
                        row["pct_copy_bw"] = round(100 * value / copy_gbps, 1)
                    if spec[case.unit]:
                        row["pct_spec_peak"] = round(100 * value / spec[case.unit], 1)
                    if peak is not None:
                        row["peak_mem_mb"] = round(peak, 1)
                    out_rows.append(row)
                if device == "cuda":
                    torch.cuda.empty_cache()


def add_speedups(rows):
    eager = {(r["op"], r["shape"], r["mode"]): r["ms"] for r in rows
             if r["provider"] == "torch" and r.get("ms")}
    for r in rows:
        base = eager.get((r["op"], r["shape"], r["mode"]))
        if base and r.get("ms"):
            r["speedup_vs_eager"] = round(base / r["ms"], 2)


def table(rows):
    head = ["op", "shape", "mode", "provider", "ms", "spread %", "value", "unit", "%copy",
            "%spec", "x eager", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["shape"], r["mode"], r["provider"], r.get("ms"),
                 r.get("spread_pct"), r.get("value"),
                 r["unit"], r.get("pct_copy_bw", ""), r.get("pct_spec_peak", ""),
                 r.get("speedup_vs_eager", ""), r.get("peak_mem_mb", "")]
        if r.get("error"):
            cells[4] = "error"
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op and r.get("value") is not None]
        if not op_rows:
            continue
        fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4), squeeze=False)
        shapes = list(dict.fromkeys(r["shape"] for r in op_rows))
        for ax, mode in zip(axes[0], MODES):
            for prov in dict.fromkeys(r["provider"] for r in op_rows):
                pts = {r["shape"]: r["value"] for r in op_rows
                       if r["provider"] == prov and r["mode"] == mode}
                xs = [i for i, s in enumerate(shapes) if s in pts]
                ax.plot(xs, [pts[shapes[i]] for i in xs], marker="o", label=prov)
            ax.set_title(f"{op} {mode}")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(op_rows[0]["unit"])
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle(f"{op} on {op_rows[0]['device']} ({op_rows[0]['dtype']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{op}.png"), dpi=110)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m megalite.kernels.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("ops", nargs="*", help=f"ops to run (default: all of {', '.join(OPS)})")
    p.add_argument("--out", help="directory for bench.json, table.md and <op>.png")
    p.add_argument("--quick", action="store_true", help="one size per op")
    p.add_argument("--compile-budget-s", type=float, default=240.0,
                   help="skip torch.compile providers once the sweep has run this long")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new op after the sweep has run this long (the table and "
                        "files are still written)")
    args = p.parse_args(argv)
    ops = args.ops or list(OPS)
    for op in ops:
        if op not in OPS:
            p.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")

    if torch.cuda.is_available():
        device, dev_name = "cuda", torch.cuda.get_device_name()
    else:
        device, dev_name = "cpu", platform.processor() or platform.machine()
        print("No CUDA device: the Triton kernels are not timed (the interpreter is a "
              "correctness tool, not a benchmark).\nTiming the torch references on the CPU "
              "at tiny sizes instead, as a smoke check.")
    vers = versions()
    spec = spec_for(dev_name) if device == "cuda" else {"GB/s": None, "TFLOP/s": None}
    copy_gbps = copy_bandwidth(device)
    if copy_gbps:
        print(f"{dev_name}: measured copy bandwidth {copy_gbps:.0f} GB/s; spec "
              f"{spec['GB/s']} GB/s, {spec['TFLOP/s']} TFLOP/s bf16")
    rows = []
    t0 = time.time()
    sweep(ops, device, args.quick or device == "cpu", rows, args.compile_budget_s, copy_gbps,
          spec, dev_name, vers, args.budget_s)
    add_speedups(rows)
    md = table(rows)
    print(md)
    print(f"({len(rows)} rows in {time.time() - t0:.0f}s on {dev_name})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"device": dev_name, "copy_gbps": copy_gbps, "spec": spec, **vers}
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(f"Device: {dev_name}; copy bandwidth {copy_gbps} GB/s; {vers}\n\n{md}\n")
        plot(rows, args.out)
        print(f"wrote {args.out}/bench.json, table.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
