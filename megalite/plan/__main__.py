"""python -m megalite.plan --model llama-70b --gpus 64 --gpu-memory 80GB --seq-len 4096 \
    --global-batch-size 512 --gpu h100 --top 10

--cp N, --cp-comm, --ep N, --fsdp / --no-fsdp fix that dimension; left out, it is searched.
--dtype bf16 plans 16-bit parameters with fp32 main weights; --autocast fp32 parameters
under autocast (the trainer's flags of the same names)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from megalite.models import GPTConfig
from megalite.plan.auto import launch_command
from megalite.plan.gpus import GPUS, get_gpu
from megalite.plan.memory import parse_bytes
from megalite.plan.params import model_parameters
from megalite.plan.search import format_table, search


def load_config(name: str) -> GPTConfig:
    """A preset name, or a JSON file of GPTConfig fields."""
    if name.endswith(".json"):
        with open(name) as fh:
            return GPTConfig(**json.load(fh))
    return GPTConfig.preset(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megalite.plan",
                                 description="Rank the (tp, cp, pp, dp, ep, micro-batch, "
                                             "recompute, distributed optimizer / FSDP) "
                                             "layouts that fit.")
    ap.add_argument("--model", required=True, help="GPTConfig preset or a config .json")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ap.add_argument("--gpu-memory", default=None,
                    help="usable bytes per GPU, e.g. 80GB or 75GiB (default: the GPU's)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--global-batch-size", type=int, required=True, help="sequences per step")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True,
                    help="fused output head + cross-entropy, as GPTConfig.fused_loss (default; "
                         "the logits are never stored); --no-fused-loss: the unfused head")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="bf16/fp16: 16-bit parameters with fp32 main weights (default bf16)")
    ap.add_argument("--autocast", action="store_true",
                    help="fp32 parameters under torch.autocast to --dtype (the older mode)")
    ap.add_argument("--cp", type=int, default=None,
                    help="context-parallel size (default: searched)")
    ap.add_argument("--cp-comm", default=None, choices=["ring", "all-to-all"],
                    help="context-parallel attention (default: both searched)")
    ap.add_argument("--ep", type=int, default=None,
                    help="expert-parallel size, MoE models (default: searched)")
    ap.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                    help="--fsdp: only FSDP layouts; --no-fsdp: none (default: searched)")
    ap.add_argument("--rejected", type=int, default=8,
                    help="how many rejected layouts to list with their reason")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.model)
    except (OSError, ValueError, TypeError) as e:
        ap.error(f"--model {args.model}: {e}")
    if args.gpus < 1:
        ap.error("--gpus must be >= 1")
    for name in ("cp", "ep"):
        value = getattr(args, name)
        if value is not None and (value < 1 or args.gpus % value):
            ap.error(f"--{name} {value} must be >= 1 and divide --gpus {args.gpus}")
    if args.autocast and args.dtype == "fp32":
        ap.error("--autocast needs --dtype bf16 or fp16")
    if args.ep not in (None, 1) and not cfg.moe_num_experts:
        ap.error(f"--ep {args.ep}: {args.model} is dense (moe_num_experts = 0); drop --ep")
    gpu = get_gpu(args.gpu)
    budget = parse_bytes(args.gpu_memory) if args.gpu_memory else gpu.memory
    started = time.perf_counter()
    fits, rejected = search(cfg, args.gpus, gpu, args.seq_len, args.global_batch_size,
                            memory_budget=budget, top=args.top, fused_loss=args.fused_loss,
                            dtype=args.dtype, autocast=args.autocast, cp=args.cp,
                            cp_comm=args.cp_comm, ep=args.ep, fsdp=args.fsdp)
    elapsed = time.perf_counter() - started
    size = f"{model_parameters(cfg) / 1e9:.2f}B params" + (
        f", {model_parameters(cfg, active=True) / 1e9:.2f}B active"
        if cfg.moe_num_experts else "")
    print(f"{args.model} ({size}) on {args.gpus} x {gpu.name}, "
          f"{budget / 2**30:.1f} GiB each; seq {args.seq_len}, global batch "
          f"{args.global_batch_size}; {len(fits)} of {len(fits) + len(rejected)} layouts fit "
          f"({elapsed:.1f} s)\n")
    if fits:
        print(format_table(fits, args.top))
        best = fits[0]
        print(f"\nbest: {best.layout.describe()}\n{best.memory.table()}")
        # --gpu-memory is given explicitly so that --layout auto (which on CPU has no GPU
        # memory to read) ranks against the same budget
        if args.model.endswith(".json"):  # the trainer's --model takes preset names only
            print("\nthe trainer builds presets (--model) or Hugging Face directories "
                  "(--init-from-hf): run one of those with the layout above")
        else:
            try:
                command = launch_command(args.model, best.layout, gpu.gpus_per_node,
                                         seq_len=args.seq_len,
                                         global_batch_size=args.global_batch_size,
                                         dtype=args.dtype,
                                         gpu_memory=args.gpu_memory or f"{budget:.0f}B")
                print(f"\nrun it (or give --layout auto instead of the layout flags):\n"
                      f"{command}")
            except ValueError as e:
                print(f"\nno launch line: {e}")
    else:
        print("no layout fits: more GPUs, a smaller model or a shorter sequence")
    if rejected:
        kinds = Counter(c.rejected.split(":")[0] for c in rejected)
        print(f"\nrejected: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        # the closest misses first: the least memory among those that do not fit
        misses = sorted((c for c in rejected if c.memory is not None),
                        key=lambda c: c.memory.total)
        invalid = [c for c in rejected if c.memory is None]
        for c in (misses[: args.rejected] + invalid[: max(0, args.rejected // 2)]):
            print(f"  {c.layout.describe()}: {c.rejected}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
