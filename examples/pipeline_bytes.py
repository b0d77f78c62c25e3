"""Bytes the pipeline sends per microbatch, counted at torch.distributed.isend, for fp32,
bf16 parameters and bf16 autocast.

    torchrun --nproc-per-node 2 examples/pipeline_bytes.py [--model tiny]

pp = 2, one step of 8 microbatches of 2 x 128 tokens; rank 0 sends activations forward,
rank 1 their gradients back. Prints the bytes each rank sent per microbatch.
"""
import argparse

import torch
import torch.distributed as dist

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training import build_optimizer
from megalite.training.step import train_step

MODES = {"fp32": ("fp32", "fp32"), "bf16 params": ("bf16", "fp32"),
         "bf16 autocast": ("fp32", "bf16")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    args = p.parse_args()
    dist.init_process_group("gloo")
    sent = [0]
    real_isend = dist.isend

    def counting_isend(tensor, *a, **k):
        sent[0] += tensor.numel() * tensor.element_size()
        return real_isend(tensor, *a, **k)
    dist.isend = counting_isend
    rows = []
    for mode, (params_dtype, autocast) in MODES.items():
        ps = parallel.initialize(pp=2)
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(args.model, kernels="torch", params_dtype=params_dtype),
                    state=ps)
        opt = build_optimizer(model, lr=1e-3)
        data = torch.randint(0, model.cfg.vocab_size, (16, 129),
                             generator=torch.Generator().manual_seed(0))
        sent[0] = 0
        train_step(model, opt, data[:, :-1], data[:, 1:], micro_batch_size=2, dtype=autocast)
        per = torch.tensor([sent[0] / 8.0])
        everyone = [torch.zeros(1) for _ in range(2)]
        dist.all_gather(everyone, per)
        rows.append((mode, [t.item() for t in everyone]))
        parallel.destroy()
    if dist.get_rank() == 0:
        print(f"{args.model}, pp=2, microbatch 2 x 128: KiB sent per microbatch")
        print(f"{'mode':<14} {'rank 0 (activations)':>21} {'rank 1 (gradients)':>19}")
        for mode, (a, g) in rows:
            print(f"{mode:<14} {a / 1024:>21.1f} {g / 1024:>19.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
