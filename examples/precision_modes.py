"""The precision modes side by side on the CPU: loss curve, step time, training-state bytes
and pipeline bytes per microbatch.

    OMP_NUM_THREADS=1 python examples/precision_modes.py --steps 100 [--csv curves.csv]

One process trains ``--model`` (default tiny) on the shipped corpus from the same seed and
the same batches in each mode:

* ``fp32``: fp32 weights and math (the reference curve);
* ``bf16 params``: bf16 weights, activations and transfers, fp32 main weights and
  gradients (``--dtype bf16``);
* ``bf16 autocast``: fp32 weights under torch.autocast (``--dtype bf16 --autocast``);
* ``fp16 params``: fp16 weights with the dynamic loss scaler (``--dtype fp16``).

It prints, per mode, the departure from the fp32 loss (max and mean |loss - fp32 loss| over
the steps, and over the last 10), the median step time, the training state in bytes per
parameter (real tensors, megalite.training.state_bytes) and the bytes one pipeline
transfer (activation or its gradient) of a microbatch moves: the activation shape times
the dtype the pipeline moves (megalite.training.precision.activation_dtype).
"""
import argparse
import statistics
import time

import torch

from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.training import DynamicLossScaler, build_optimizer, build_scheduler
from megalite.training.data import TokenDataset, default_corpus_path, get_batch
from megalite.training.precision import activation_dtype
from megalite.training.state_bytes import measure
from megalite.training.step import train_step

MODES = {  # name -> (params_dtype, autocast dtype)
    "fp32": ("fp32", "fp32"),
    "bf16 params": ("bf16", "fp32"),
    "bf16 autocast": ("fp32", "bf16"),
    "fp16 params": ("fp16", "fp32"),
}


def run(cfg, mode, args, batches):
    params_dtype, autocast = MODES[mode]
    torch.manual_seed(args.seed)
    model = GPT(cfg.replace(params_dtype=params_dtype), state=ParallelState())
    opt = build_optimizer(model, lr=args.lr)
    sched = build_scheduler(opt, warmup_steps=10, total_steps=args.steps)
    scaler = DynamicLossScaler() if "fp16" in (params_dtype, autocast) else None
    losses, times = [], []
    for tokens, targets in batches:
        t0 = time.perf_counter()
        r = train_step(model, opt, tokens, targets,
                       micro_batch_size=args.micro_batch_size, dtype=autocast,
                       grad_scaler=scaler)
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    state = measure(model, opt)
    shape = model.activation_shape(args.micro_batch_size, args.seq_len)
    moved = torch.Size(shape).numel() * torch.empty((), dtype=activation_dtype(model)).element_size()
    return losses, statistics.median(times[1:]), state["total"] / state["params"], moved


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--modes", nargs="*", default=["fp32", "bf16 params", "bf16 autocast"],
                   choices=list(MODES), help="fp16 params is slow on the CPU (fp16 matmuls)")
    p.add_argument("--csv", default=None, help="write step,mode,loss rows here")
    args = p.parse_args()
    cfg = GPTConfig.preset(args.model, kernels="torch")
    data = TokenDataset(default_corpus_path(), args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    batches = [get_batch(data, torch.randint(0, len(data), (args.global_batch_size,),
                                             generator=g).tolist())
               for _ in range(args.steps)]
    results = {m: run(cfg, m, args, batches) for m in ["fp32"] + [m for m in args.modes
                                                                  if m != "fp32"]}
    ref = results["fp32"][0]
    print(f"{args.model}, {args.steps} steps of {args.global_batch_size} x {args.seq_len} "
          f"tokens (microbatches of {args.micro_batch_size}), one CPU process, "
          f"torch {torch.__version__}")
    print(f"{'mode':<14} {'first':>6} {'last':>6} {'max dep':>8} {'mean dep':>9} "
          f"{'last10':>7} {'step ms':>8} {'B/param':>8} {'pipe KiB/mb':>11}")
    for mode, (losses, step_s, bpp, moved) in results.items():
        dep = [abs(a - b) for a, b in zip(losses, ref)]
        print(f"{mode:<14} {losses[0]:>6.3f} {losses[-1]:>6.3f} {max(dep):>8.4f} "
              f"{statistics.mean(dep):>9.4f} {statistics.mean(dep[-10:]):>7.4f} "
              f"{1e3 * step_s:>8.1f} {bpp:>8.2f} {moved / 1024:>11.1f}")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("step,mode,loss\n")
            for mode, (losses, *_) in results.items():
                f.writelines(f"{i + 1},{mode},{v:.6f}\n" for i, v in enumerate(losses))


if __name__ == "__main__":
    main()
