"""Activation recomputation: saved bytes per layer and step-time overhead, on this machine.

    OMP_NUM_THREADS=1 python examples/bench_recompute.py            # small llama-like, CPU
    python examples/bench_recompute.py --steps 10 --out recompute.jsonl

Per layer, for recompute none / selective / full: the bytes autograd saves between forward
and backward, measured with saved-tensor hooks (distinct storages; parameters left out) next
to ``saved_activation_bytes`` (our layer, exact at fp32) and Korthikanti et al.'s formula
(their 16-bit GPT layer; ours at 16 bits alongside). Then the median time of a training step
(forward, backward, AdamW) of the whole model in each mode, wall and CPU time, and the
CPU-time overhead over none.
A formula-only table for real model sizes follows (--formula-presets).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megalite.models import GPT, GPTConfig
from megalite.models.activation_memory import (count_saved_bytes, korthikanti_bytes,
                                               saved_activation_bytes)

MODES = ("none", "selective", "full")


def measure_layer(cfg, b, s):
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randn(b, s, cfg.d_model, requires_grad=True)
    rope = (model.rope_cos, model.rope_sin) if cfg.position == "rope" else None
    _, saved = count_saved_bytes(model.layers["0"], x, rope,
                                 exclude=[*model.parameters(), *model.buffers()])
    return saved


def step_times(cfgs, b, s, steps, warmup=2):
    """{mode: (median wall ms, median CPU ms)} of a training step. The modes take turns
    step by step, so a load that comes and goes hits them alike; CPU time (this process's
    threads) is the steadier figure on a shared machine."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, next(iter(cfgs.values())).vocab_size, (b, s + 1), generator=g)
    runs = {}
    for mode, cfg in cfgs.items():
        torch.manual_seed(0)
        model = GPT(cfg)
        runs[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), [], [])
    for i in range(warmup + steps):
        for model, opt, wall, cpu in runs.values():
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    return {mode: (statistics.median(w) * 1e3, statistics.median(c) * 1e3)
            for mode, (_, _, w, c) in runs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=7, help="timed steps per mode (median)")
    p.add_argument("--formula-presets", nargs="*", default=["llama-7b"],
                   help="presets for the formula-only table (seq = max_seq_len, b = 1)")
    p.add_argument("--out", default=None, help="write one JSON row per measurement")
    args = p.parse_args(argv)

    cfg = GPTConfig(vocab_size=256, n_layers=args.layers, n_heads=args.heads,
                    n_kv_heads=args.kv_heads, d_model=args.d_model, d_ff=args.d_ff,
                    max_seq_len=args.seq_len, kernels="torch")
    b, s = args.micro_batch_size, args.seq_len
    rows = []
    print(f"llama-like layer: d_model {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, "
          f"d_ff {cfg.d_ff}; micro-batch {b} x seq {s}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    times = step_times({m: cfg.replace(recompute=m) for m in MODES}, b, s, args.steps)
    print(f"{'recompute':<10} {'measured fp32':>14} {'predicted fp32':>15} "
          f"{'ours 16-bit':>12} {'Korthikanti':>12} {'step wall ms':>13} {'CPU ms':>8} "
          f"{'CPU overhead':>13}")
    for mode in MODES:
        measured = measure_layer(cfg.replace(recompute=mode), b, s)
        predicted = saved_activation_bytes(cfg, b, s, recompute=mode)
        ours16 = saved_activation_bytes(cfg, b, s, recompute=mode, act_bytes=2,
                                        device_type="cuda")
        paper = korthikanti_bytes(cfg, b, s, recompute=mode)
        wall, cpu = times[mode]
        overhead = cpu / times["none"][1] - 1
        rows.append(dict(mode=mode, measured_bytes=measured, predicted_bytes=predicted,
                         predicted_16bit=ours16, korthikanti_16bit=paper, step_wall_ms=wall,
                         step_cpu_ms=cpu, cpu_overhead=overhead, d_model=cfg.d_model, seq=s,
                         micro_batch=b))
        print(f"{mode:<10} {measured / 2**20:>11.2f} MB {predicted / 2**20:>12.2f} MB "
              f"{ours16 / 2**20:>9.2f} MB {paper / 2**20:>9.2f} MB {wall:>13.1f} {cpu:>8.1f} "
              f"{overhead:>+12.1%}")

    if args.formula_presets:
        print(f"\nformula only, per layer and TP rank, 16-bit, micro-batch 1, GPU kernels "
              f"(ours | Korthikanti), GB:")
        print(f"{'preset':<12} {'seq':>5} {'tp/sp':>6} " +
              " ".join(f"{m:>17}" for m in MODES))
        for name in args.formula_presets:
            pcfg = GPTConfig.preset(name)
            for tp, sp in ((1, False), (8, True)):
                cells = []
                for mode in MODES:
                    ours = saved_activation_bytes(pcfg, 1, pcfg.max_seq_len, tp, sp, mode, 2,
                                                  "cuda", kernels="triton")
                    paper = korthikanti_bytes(pcfg, 1, pcfg.max_seq_len, tp, sp, mode)
                    cells.append(f"{ours / 1e9:>7.3f} | {paper / 1e9:<7.3f}")
                    rows.append(dict(preset=name, seq=pcfg.max_seq_len, tp=tp, sp=sp,
                                     mode=mode, predicted_16bit=ours, korthikanti_16bit=paper))
                print(f"{name:<12} {pcfg.max_seq_len:>5} {f'{tp}/{int(sp)}':>6} " +
                      " ".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
