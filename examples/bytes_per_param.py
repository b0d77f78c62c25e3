"""Bytes per parameter of a rank's training state, measured on its real tensors, beside
Megatron-Core's table (its distributed-optimizer docs) and megalite's formula.

    torchrun --nproc-per-node 4 examples/bytes_per_param.py [--model tiny]

For dp = 1, 2, 4 (pp = the rest of the world), each mode in MODES builds the model and the
optimizer, takes one training step (so AdamW's moments exist) and counts, on every rank,
the parameters, the fp32 main-gradient buffers (bucket padding included), the fp32 main
weights of 16-bit parameters and the optimizer state (megalite.training.state_bytes); the
table shows the worst rank. Norm weights stay fp32 in the bf16 mode, so a small model sits
a little under Megatron's 18 / 6 + 12/dp. A new mode (FSDP) is one more MODES entry: a
function (ps, cfg, dp) -> (model, optimizer).
"""
import argparse
import os
import warnings

import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import comm
from megalite.training import build_optimizer
from megalite.training.state_bytes import (expected_bytes_per_param, measure,
                                           megatron_bytes_per_param)
from megalite.training.step import train_step


def _gpt(ps, cfg, dtype, distributed):
    torch.manual_seed(0)
    model = GPT(cfg.replace(params_dtype=dtype), state=ps)
    return model, build_optimizer(model, lr=1e-3, distributed=distributed)


# name -> (params dtype for Megatron's table, distributed?, builder)
MODES = {
    "fp32 plain": ("fp32", False, lambda ps, cfg: _gpt(ps, cfg, "fp32", False)),
    "fp32 distributed": ("fp32", True, lambda ps, cfg: _gpt(ps, cfg, "fp32", True)),
    "bf16 plain": ("bf16", False, lambda ps, cfg: _gpt(ps, cfg, "bf16", False)),
    "bf16 distributed": ("bf16", True, lambda ps, cfg: _gpt(ps, cfg, "bf16", True)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--modes", nargs="*", default=list(MODES))
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # ours: parallel.destroy() between layouts then keeps it
        torch.distributed.init_process_group("gloo")
    cfg = GPTConfig.preset(args.model, kernels="torch")
    rows = []
    for dp in (1, 2, 4):
        if world % dp:
            continue
        for name in args.modes:
            dtype, distributed, build = MODES[name]
            ps = parallel.initialize(tp=1, pp=world // dp, dp=dp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "dp=1 shards nothing"
                model, opt = build(ps, cfg)
            data = torch.randint(0, cfg.vocab_size, (2 * dp, 33),
                                 generator=torch.Generator().manual_seed(0))
            mine = data[2 * ps.dp_rank:2 * ps.dp_rank + 2]
            train_step(model, opt, mine[:, :-1], mine[:, 1:], micro_batch_size=1)
            row = measure(model, opt)
            keys = ("weights", "grads", "main_weights", "optimizer_state", "total")
            worst = torch.tensor([row[k] / row["params"] for k in keys])
            comm.all_reduce(worst, torch.distributed.group.WORLD
                            if torch.distributed.is_initialized() else None,
                            op=torch.distributed.ReduceOp.MAX)
            rows.append((name, dp, *worst.tolist(),
                         expected_bytes_per_param(model, distributed, dp),
                         megatron_bytes_per_param(dtype, distributed, dp)))
            parallel.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.model}, world {world} (pp = world / dp), bytes per parameter on the "
              f"worst rank")
        print(f"{'mode':<18} {'dp':>2} {'weight':>7} {'grad':>6} {'main':>6} {'optim':>6} "
              f"{'total':>7} {'formula':>8} {'Megatron':>9}")
        for name, dp, w, g, m, o, t, f, mg in rows:
            print(f"{name:<18} {dp:>2} {w:>7.3f} {g:>6.3f} {m:>6.3f} {o:>6.3f} {t:>7.3f} "
                  f"{f:>8.3f} {mg:>9.3f}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
