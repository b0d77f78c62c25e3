"""Peak memory of importing a Hugging Face checkpoint with ``from_hf``: each rank should hold
about its own shard, not the whole checkpoint.

    # 1. write a random Qwen3-shaped checkpoint (210M parameters, 802 MiB in fp32) with save_hf
    OMP_NUM_THREADS=1 python examples/bench_hf_import.py make /tmp/hf-import
    # 2. import it at tp=2 and print each rank's peak resident memory
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/bench_hf_import.py load \
        /tmp/hf-import --tp 2

Each rank reports its resident memory before ``from_hf`` (after imports and process
groups), its peak during ``from_hf`` (``ru_maxrss``), and the bytes of its shard; rank 0
prints them beside the checkpoint's size.
"""
import argparse
import os
import resource

import torch
import torch.distributed as dist

from megalite import parallel
from megalite.models import GPT, GPTConfig, from_hf, save_hf

# Qwen3-like: q/k norms, 16 heads of 64, 4 kv heads; 12 layers, a 32k vocabulary.
CONFIG = dict(vocab_size=32000, n_layers=12, n_heads=16, n_kv_heads=4, d_model=1024,
              d_ff=3072, head_dim=64, qk_norm=True, max_seq_len=4096, rope_theta=1e6,
              norm_eps=1e-6)
MB = 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def make(directory: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    save_hf(model, directory)
    size = os.path.getsize(os.path.join(directory, "model.safetensors"))
    print(f"wrote {directory}: {model.cfg.num_params() / 1e6:.0f}M parameters, "
          f"model.safetensors {size / MB:.0f} MiB")


def load(directory: str, tp: int, pp: int) -> None:
    ps = parallel.initialize(tp=tp, pp=pp)
    before = current_rss()
    model = from_hf(directory)
    peak = peak_rss()
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    row = torch.tensor([before, peak, current_rss(), shard], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(ps.world_size)] if ps.world_size > 1 else [row]
    if ps.world_size > 1:
        dist.all_gather(rows, row)
    if ps.rank == 0:
        size = os.path.getsize(os.path.join(directory, "model.safetensors"))
        print(f"checkpoint {size / MB:.0f} MiB, tp={tp} pp={pp}")
        print("rank | RSS before (MiB) | peak RSS (MiB) | peak - before | RSS after | shard")
        for r, (b, p, a, s) in enumerate(t.tolist() for t in rows):
            print(f"{r:4d} | {b / MB:16.0f} | {p / MB:14.0f} | {(p - b) / MB:13.0f} | "
                  f"{a / MB:9.0f} | {s / MB:5.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["make", "load"])
    ap.add_argument("directory")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()
    if args.command == "make":
        make(args.directory)
    else:
        load(args.directory, args.tp, args.pp)


if __name__ == "__main__":
    main()
