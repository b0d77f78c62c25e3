"""1F1B pipeline step: megalite's executor vs torch.distributed.pipelining.Schedule1F1B.

Both run copies of the same GPT stages (same seed, same stage split, same microbatches),
alternating in one run; it prints step times, their ratio, the peak memory held for
backward per stage (saved activations, measured with autograd's saved-tensor hooks; on GPU
also the allocator's peak), and checks the two runs' losses match.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/bench_pp.py
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training.step import forward_backward


class SavedActivationMeter:
    """Peak bytes autograd holds for backward, not counting parameters (dedup by storage)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live, self.peak, self.refs = 0, 0, {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return t
        meter = self
        if ptr not in self.refs:
            self.refs[ptr] = [0, t.untyped_storage().nbytes()]
            self.live += self.refs[ptr][1]
            self.peak = max(self.peak, self.live)
        self.refs[ptr][0] += 1

        class Handle:
            def __init__(self, tensor):
                self.tensor = tensor

            def __del__(self):
                entry = meter.refs[ptr]
                entry[0] -= 1
                if entry[0] == 0:
                    meter.live -= entry[1]
                    del meter.refs[ptr]
        return Handle(t)

    @staticmethod
    def _unpack(x):
        return x.tensor if hasattr(x, "tensor") else x

    def __enter__(self):
        self.peak = self.live
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--iters", type=int, default=6)
    args = p.parse_args()
    ps = parallel.initialize(pp=int(os.environ.get("WORLD_SIZE", 1)))
    cfg = GPTConfig(vocab_size=256, n_layers=args.layers, n_heads=8, d_model=args.d_model,
                    max_seq_len=args.seq, kernels="torch")
    torch.manual_seed(0)
    ours = GPT(cfg)
    torch.manual_seed(0)
    theirs = GPT(cfg)
    m, mb = args.microbatches, args.micro_batch
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (m * mb, args.seq + 1), generator=g)
    tokens, targets = data[:, :-1], data[:, 1:]

    stage = PipelineStage(theirs, ps.pp_rank, ps.pp, ps.device, group=ps.pp_group)
    schedule = Schedule1F1B(stage, m, loss_fn=theirs.loss)

    def run_ours():
        result = forward_backward(ours, tokens, targets, micro_batch_size=mb, schedule="1f1b")
        ours.zero_grad(set_to_none=True)
        return result.loss.item()

    def run_theirs():
        losses = []
        if ps.pp_rank == 0:
            schedule.step(tokens)
        elif ps.pp_rank == ps.pp - 1:
            schedule.step(target=targets, losses=losses)
        else:
            schedule.step()
        theirs.zero_grad(set_to_none=True)
        loss = torch.tensor([sum(l.item() for l in losses) / m if losses else 0.0])
        dist.all_reduce(loss, group=ps.pp_group)  # make it known on every rank, like ours
        return loss.item()

    runs = {"megalite": (run_ours, ours), "torch Schedule1F1B": (run_theirs, theirs)}
    times = {k: [] for k in runs}
    peaks, losses = {}, {}
    for name, (fn, model) in runs.items():  # warm-up, loss and activation memory
        with SavedActivationMeter(model) as meter:
            losses[name] = fn()
        peaks[name] = meter.peak
    for _ in range(args.iters):
        for name, (fn, _) in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    all_peaks = [None] * ps.world_size
    dist.all_gather_object(all_peaks, peaks)
    if ps.rank == 0:
        print(f"1F1B step, pp={ps.pp}, {cfg.n_layers} layers d={cfg.d_model} seq={args.seq}, "
              f"{m} microbatches of {mb}, fp32, {args.iters} alternating iterations; "
              f"torch {torch.__version__}")
        base = statistics.median(times["torch Schedule1F1B"])
        for name in runs:
            med = statistics.median(times[name])
            mem = " / ".join(f"{p[name] / 2**20:.1f}" for p in all_peaks)
            print(f"{name:<20} {1e3 * med:8.1f} ms  {med / base:5.2f}x   loss {losses[name]:.6f}"
                  f"   peak saved activations per stage (MiB): {mem}")
        assert abs(losses["megalite"] - losses["torch Schedule1F1B"]) < 1e-5, losses
        print("losses match")
    parallel.destroy()


if __name__ == "__main__":
    main()
