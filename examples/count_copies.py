"""Count the data copies (``copy_``, ``cat``) one training step of a small GPT makes, by
where they come from, with the CPU profiler (the CPU runs the same ops as the GPU's eager
path, so the counts show which copies a layout choice can avoid).

    OMP_NUM_THREADS=1 python examples/count_copies.py --dtype bf16             # bf16 weights
    OMP_NUM_THREADS=1 python examples/count_copies.py --dtype bf16 --autocast  # fp32 + autocast

Copies of 0-dim tensors (Python scalars wrapped by an op) are not counted: they move no
data. One step = 8 microbatches of 2 x 128 tokens of ``--model`` (default tiny).

"weight-sized" copies are those shaped like a parameter: the weight casts of autocast and
their gradients' casts back, or (16-bit parameters) the fp32 accumulation of a 16-bit
gradient, which the CPU runs as a cast then an add but CUDA as one mixed-dtype add kernel.
The rest are activation-sized: on the CPU most are the torch reference kernels' fp32
upcasts (the norm, RoPE and softmax references compute in fp32), which the Triton kernels
do in registers on the GPU.
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
    p.add_argument("--autocast", action="store_true",
                   help="fp32 weights under torch.autocast (the trainer's --autocast)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    parallel.initialize()
    torch.manual_seed(0)
    params_dtype = "fp32" if args.autocast else args.dtype
    model = GPT(GPTConfig.preset(args.model, params_dtype=params_dtype))
    optimizer = build_optimizer(model, 1e-3)
    data = torch.randint(0, model.cfg.vocab_size, (16, 129),
                         generator=torch.Generator().manual_seed(0))

    def step():
        train_step(model, optimizer, data[:, :-1], data[:, 1:], micro_batch_size=2,
                   dtype=args.dtype if args.autocast else "fp32")
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 with_stack=True) as prof:
        step()
    counts = collections.Counter()
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    weight_sized = collections.Counter()
    for e in prof.events():
        outer = e.cpu_parent is not None and e.cpu_parent.name in COPIES
        scalar = e.name == "aten::copy_" and not (e.input_shapes and e.input_shapes[0])
        if e.name in COPIES and not outer and not scalar:
            counts[(e.name.removeprefix("aten::"), source(e))] += 1
            if e.name == "aten::copy_" and tuple(e.input_shapes[0]) in param_shapes:
                in_add = e.cpu_parent is not None and e.cpu_parent.cpu_parent is not None \
                    and e.cpu_parent.cpu_parent.name == "aten::to" and \
                    e.cpu_parent.cpu_parent.cpu_parent is not None and \
                    e.cpu_parent.cpu_parent.cpu_parent.name == "aten::add_"
                weight_sized["fp32 accumulation (one add on GPU)" if in_add else "cast"] += 1
    total = sum(counts.values())
    mode = f"{args.dtype} autocast" if args.autocast else f"{args.dtype} parameters"
    print(f"{args.model} {mode}, one step of 8 microbatches: {total} copies "
          f"(copy_ {sum(v for (k, _), v in counts.items() if k == 'copy_')}, "
          f"cat {sum(v for (k, _), v in counts.items() if k == 'cat')})")
    print(f"weight-sized copies: {sum(weight_sized.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(weight_sized.items())) or 'none'})")
    for (name, where), n in counts.most_common(args.top):
        print(f"{n:6d}  {name:<6} {where}")


if __name__ == "__main__":
    main()
