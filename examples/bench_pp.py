"""Pipeline schedules: megalite's executor vs torch.distributed.pipelining, schedule by schedule.

For each microbatch count and each schedule, the same GPT (same seed, same stage split, same
microbatches) runs through megalite's executor and through torch's same-named schedule with
one `PipelineStage` per local stage, alternating in one run. It prints the step time of each,
ours against our own 1F1B and against torch, the peak memory held for backward per rank
(saved activations, measured with autograd's saved-tensor hooks), and checks that every run
of every schedule gives the same loss.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/bench_pp.py --microbatches 4 8 \
        --json bench-pp.json --timeline-dir bench-pp
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.pipeline import (build_schedule, gather_spans, plot_timeline, rank_stages,
                               schedule_info)
from megalite.training.step import forward_backward

# our name -> torch's class (None: no torch counterpart run)
TORCH = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe",
         "interleaved-1f1b": "ScheduleInterleaved1F1B",
         "zb-h1": "ScheduleInterleavedZeroBubble",  # ZB1P with one stage per rank
         "interleaved-zb": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble"}


class SavedActivationMeter:
    """Peak bytes autograd holds for backward, not counting parameters (dedup by storage)."""

    def __init__(self, models):
        self.params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
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
        # Hold a detached alias: a saved output that referenced its own grad_fn would form a
        # cycle that a retained graph (the split backward, ours and torch's) never frees.
        return Handle(t.detach())

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


def build_pair(name, cfg, ps, m, tokens, targets, mb):
    """(our step function, our models, torch's step function, torch's models) for one
    schedule, both from the same seed."""
    table = build_schedule(name, ps.pp, m)
    stages = rank_stages(table)[ps.pp_rank]
    num_stages = ps.pp * schedule_info(name)[1]
    torch.manual_seed(0)
    ours = GPT(cfg, stages=stages, num_stages=num_stages)

    def run_ours(trace=False):
        result = forward_backward(ours, tokens, targets, micro_batch_size=mb, schedule=table,
                                  trace=trace)
        ours.zero_grad(set_to_none=True)
        return result.loss.item(), result.spans

    cls = getattr(torch_schedules, TORCH[name], None)
    if cls is None:
        return run_ours, [ours], None, []
    theirs = []
    for s in stages:  # one module per stage: torch scales each stage's own gradients
        torch.manual_seed(0)
        theirs.append(GPT(cfg, stages=[s], num_stages=num_stages))
    pipe_stages = [PipelineStage(model, s, num_stages, ps.device, group=ps.pp_group)
                   for model, s in zip(theirs, stages)]
    single = cls.__name__ in ("Schedule1F1B", "ScheduleGPipe")
    schedule = cls(pipe_stages[0] if single else pipe_stages, m, loss_fn=theirs[-1].loss)
    has_first, has_last = 0 in stages, num_stages - 1 in stages

    def run_theirs():
        losses = []
        kwargs = {}
        if has_last:
            kwargs.update(target=targets, losses=losses)
        schedule.step(*((tokens,) if has_first else ()), **kwargs)
        for model in theirs:
            model.zero_grad(set_to_none=True)
        loss = torch.tensor([sum(l.item() for l in losses) / m if losses else 0.0],
                            device=ps.device)
        dist.all_reduce(loss, group=ps.pp_group)  # make it known on every rank, like ours
        return loss.item(), []

    return run_ours, [ours], run_theirs, theirs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    p.add_argument("--schedules", default="1f1b,interleaved-1f1b,zb-h1,zbv")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--json", default=None, help="write the rows here (rank 0)")
    p.add_argument("--timeline-dir", default=None, help="PNG timeline of one step of ours")
    p.add_argument("--png", default=None, help="bar chart of the step times (rank 0)")
    args = p.parse_args()
    ps = parallel.initialize(pp=int(os.environ.get("WORLD_SIZE", 1)))
    cfg = GPTConfig(vocab_size=256, n_layers=args.layers, n_heads=8, d_model=args.d_model,
                    max_seq_len=args.seq, kernels="torch")
    names = args.schedules.split(",")
    rows = []
    for m in args.microbatches:
        mb = args.micro_batch
        g = torch.Generator().manual_seed(1)
        data = torch.randint(0, 256, (m * mb, args.seq + 1), generator=g).to(ps.device)
        tokens, targets = data[:, :-1], data[:, 1:]
        runs = {}
        for name in names:
            ours_fn, ours_models, theirs_fn, theirs_models = build_pair(
                name, cfg, ps, m, tokens, targets, mb)
            runs[(name, "megalite")] = (ours_fn, ours_models)
            if theirs_fn is not None:
                runs[(name, "torch")] = (theirs_fn, theirs_models)
        peaks, losses, times = {}, {}, {k: [] for k in runs}
        for key, (fn, models) in runs.items():  # warm-up, loss and activation memory
            with SavedActivationMeter(models) as meter:
                losses[key] = fn()[0]
            peaks[key] = meter.peak
        for _ in range(args.iters):
            for key, (fn, _) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                times[key].append(time.perf_counter() - t0)
        if args.timeline_dir:
            for name in names:
                dist.barrier()
                spans = gather_spans(runs[(name, "megalite")][0](trace=True)[1], ps)
                if spans is not None:
                    os.makedirs(args.timeline_dir, exist_ok=True)
                    plot_timeline(spans, os.path.join(args.timeline_dir, f"{name}_m{m}.png"),
                                  f"{name}, pp={ps.pp}, m={m}: measured step (seconds)")
        all_peaks = [None] * ps.world_size
        dist.all_gather_object(all_peaks, peaks)
        if ps.rank != 0:
            continue
        print(f"\npp={ps.pp}, {cfg.n_layers} layers d={cfg.d_model} seq={args.seq}, {m} "
              f"microbatches of {mb}, fp32, {args.iters} alternating iterations; "
              f"torch {torch.__version__}")
        print(f"{'schedule':<18} {'provider':<9} {'ms/step':>8} {'/our 1f1b':>9} {'/torch':>7}"
              f"   peak saved activations per rank (MiB)   loss")
        base = statistics.median(times[("1f1b", "megalite")]) if "1f1b" in names else None
        for (name, who), ts in times.items():
            med = statistics.median(ts)
            torch_med = statistics.median(times[(name, "torch")]) if (name, "torch") in times \
                else None
            mem = [pk[(name, who)] / 2**20 for pk in all_peaks]
            vs_base = f"{med / base:9.2f}" if base and who == "megalite" else " " * 9
            vs_torch = f"{med / torch_med:7.2f}" if torch_med and who == "megalite" else " " * 7
            print(f"{name:<18} {who:<9} {1e3 * med:8.1f} {vs_base} {vs_torch}   "
                  f"{' / '.join(f'{x:.1f}' for x in mem):<38} {losses[(name, who)]:.6f}")
            rows.append({"microbatches": m, "schedule": name, "provider": who,
                         "ms": 1e3 * med, "ms_all": [1e3 * t for t in ts],
                         "vs_our_1f1b": med / base if base else None,
                         "vs_torch": med / torch_med if torch_med else None,
                         "peak_saved_mib": mem, "loss": losses[(name, who)],
                         "torch": torch.__version__, "pp": ps.pp, "layers": cfg.n_layers,
                         "d_model": cfg.d_model, "seq": args.seq, "micro_batch": mb})
        ref = next(iter(losses.values()))
        bad = {k: v for k, v in losses.items() if abs(v - ref) > 1e-5}
        assert not bad, f"losses differ from {ref}: {bad}"
        print("losses match across every schedule and provider")
    if ps.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if ps.rank == 0 and args.png:
        plot_rows(rows, args.png, f"pp={ps.pp}, {cfg.n_layers} layers d={cfg.d_model}, "
                                  f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    parallel.destroy()


def plot_rows(rows, path, title):
    """Grouped bars: step time per schedule, megalite next to torch, one panel per m."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms = sorted({r["microbatches"] for r in rows})
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        mine = [r for r in rows if r["microbatches"] == m]
        names = list(dict.fromkeys(r["schedule"] for r in mine))
        for k, who in enumerate(("megalite", "torch")):
            vals = [next((r["ms"] for r in mine if r["schedule"] == n and r["provider"] == who),
                         0) for n in names]
            ax.bar([x + 0.4 * k for x in range(len(names))], vals, width=0.4, label=who,
                   color=("#4C72B0", "#DD8452")[k])
        ax.set_xticks([x + 0.2 for x in range(len(names))])
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_ylabel("ms / step")
        ax.set_title(f"m = {m}")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
