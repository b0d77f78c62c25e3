"""One-device training speed and memory of a llama preset: megalite beside Hugging Face.

    # one GPU (what `make gpu-check` runs): llama-1b, seq 2048, bf16, micro-batch 4, batch 16
    python examples/bench_llama.py --model llama-1b
    # a CPU smoke check of the same code path (tiny preset, fp32)
    OMP_NUM_THREADS=1 python examples/bench_llama.py --model tiny --seq-len 64 --steps 2

Runs, in one process and one after another on the same random tokens: megalite's GPT with
``--kernels auto`` (Triton on CUDA), megalite with ``--kernels torch`` (the references), and
Hugging Face's ``LlamaForCausalLM`` (SDPA attention) with the same step: autocast, micro-
batches with gradient accumulation, clipping, fused AdamW. Prints per run the loss of each
step, tokens/s and MFU over the steps after ``--warmup``, and the peak memory (GPU allocator;
on the CPU the process's peak RSS, which only grows). ``--json FILE`` writes the figures.
Runs whose requirements are missing (transformers for "hf") are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.models.hf import hf_config_from_gpt
from megalite.training.metrics import peak_flops, peak_memory_gb
from megalite.training.optim import build_optimizer
from megalite.training.step import train_step

RUNS = ("megalite", "megalite-torch", "hf")


def megalite_step(cfg, kernels, args, device):
    torch.manual_seed(args.seed)
    model = GPT(cfg.replace(kernels=kernels))
    optimizer = build_optimizer(model, args.lr)

    def step(tokens, targets):
        return train_step(model, optimizer, tokens, targets,
                          micro_batch_size=args.micro_batch_size, dtype=args.dtype).loss
    return step, (model, optimizer)


def hf_step(cfg, args, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = hf_config_from_gpt(cfg)
    config = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device)
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=True)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)

    def step(tokens, targets):
        optimizer.zero_grad(set_to_none=True)
        m = tokens.shape[0] // args.micro_batch_size
        total = torch.zeros((), device=device)
        for tok, tgt in zip(tokens.chunk(m), targets.chunk(m)):
            with torch.autocast(device.type, autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = model(input_ids=tok).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten()) / m
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total
    return step, (model, optimizer)


def run_one(name, cfg, args, device, tokens, targets):
    if name == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return {"run": name, "skipped": "transformers is not installed"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build = time.perf_counter()
    step, keep = (hf_step(cfg, args, device) if name == "hf" else
                  megalite_step(cfg, "torch" if name == "megalite-torch" else "auto", args,
                                device))
    build = time.perf_counter() - build
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = float(step(tokens[i], targets[i]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss, 4))
    timed = times[args.warmup:]
    tokens_per_step = args.global_batch_size * args.seq_len
    tps = tokens_per_step * len(timed) / sum(timed)
    peak = peak_flops(device, args.dtype)
    row = {"run": name, "tokens_per_sec": round(tps), "step_s": round(sum(timed) / len(timed), 4),
           "peak_mem_gb": round(peak_memory_gb(device), 2), "losses": losses,
           "build_s": round(build, 1)}
    if peak:
        row["mfu"] = round(cfg.flops_per_token(args.seq_len) * tps / peak, 4)
    del step, keep
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated of {RUNS}")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if any(r not in RUNS for r in runs):
        p.error(f"--runs: choose from {RUNS}")
    if args.global_batch_size % args.micro_batch_size:
        p.error("--global-batch-size must be a multiple of --micro-batch-size")
    ps = parallel.initialize()
    device = ps.device
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = GPTConfig.preset(args.model)
    if args.seq_len > cfg.max_seq_len:
        p.error(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg.vocab_size, (args.warmup + args.steps, args.global_batch_size,
                                             args.seq_len + 1), generator=g).to(device)
    tokens, targets = data[..., :-1], data[..., 1:]
    print(f"{args.model} ({cfg.num_params() / 1e6:.0f}M params), seq {args.seq_len}, "
          f"micro-batch {args.micro_batch_size}, batch {args.global_batch_size}, {args.dtype}, "
          f"on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for name in runs:
        row = run_one(name, cfg, args, device, tokens, targets)
        rows.append(row)
        if "skipped" in row:
            print(f"{name:<15} skipped: {row['skipped']}", flush=True)
            continue
        mfu = f"{100 * row['mfu']:.1f}% MFU" if "mfu" in row else "MFU n/a (no GPU peak)"
        print(f"{name:<15} {row['tokens_per_sec']:>9,} tokens/s  {mfu}  peak "
              f"{row['peak_mem_gb']:.1f} GB  losses {row['losses']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
