"""Count the data copies (``copy_``, ``cat``) one training step of a small GPT makes, by
where they come from, with the CPU profiler (the CPU runs the same ops as the GPU's eager
path, so the counts show which copies a layout choice can avoid).

    OMP_NUM_THREADS=1 python examples/count_copies.py --dtype bf16

Copies of 0-dim tensors (Python scalars wrapped by an op) are not counted: they move no
data. One step = 8 microbatches of 2 x 128 tokens of ``--model`` (default tiny).
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training.optim import build_optimizer
from megalite.training.step import train_step

COPIES = ("aten::copy_", "aten::cat")


def source(event) -> str:
    """The innermost megalite/torch Python frames and autograd node above an op."""
    frames, node = [], event.cpu_parent
    while node is not None and len(frames) < 2:
        name = node.name
        if ".py(" in name and ("megalite" in name or "kernels/" in name or "torch/" in name) \
                or name.startswith("autograd::engine"):
            frames.append(name.split("/")[-1] if ".py(" in name else
                          name.removeprefix("autograd::engine::evaluate_function: "))
        node = node.cpu_parent
    return " < ".join(frames)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    parallel.initialize()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.model))
    optimizer = build_optimizer(model, 1e-3)
    data = torch.randint(0, model.cfg.vocab_size, (16, 129),
                         generator=torch.Generator().manual_seed(0))

    def step():
        train_step(model, optimizer, data[:, :-1], data[:, 1:], micro_batch_size=2,
                   dtype=args.dtype)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 with_stack=True) as prof:
        step()
    counts = collections.Counter()
    for e in prof.events():
        outer = e.cpu_parent is not None and e.cpu_parent.name in COPIES
        scalar = e.name == "aten::copy_" and not (e.input_shapes and e.input_shapes[0])
        if e.name in COPIES and not outer and not scalar:
            counts[(e.name.removeprefix("aten::"), source(e))] += 1
    total = sum(counts.values())
    print(f"{args.model} {args.dtype}, one step of 8 microbatches: {total} copies "
          f"(copy_ {sum(v for (k, _), v in counts.items() if k == 'copy_')}, "
          f"cat {sum(v for (k, _), v in counts.items() if k == 'cat')})")
    for (name, where), n in counts.most_common(args.top):
        print(f"{n:6d}  {name:<6} {where}")


if __name__ == "__main__":
    main()
