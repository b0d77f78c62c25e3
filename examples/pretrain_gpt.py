"""Pretrain a GPT with tensor, pipeline and data parallelism.

    # 4 CPU processes: tp=2, pp=2 on the bundled corpus
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/pretrain_gpt.py --tp 2 --pp 2
    # one GPU node, 8 GPUs, bf16
    torchrun --nproc-per-node 8 examples/pretrain_gpt.py --model gpt2-124m --tp 2 --pp 2 \
        --dtype bf16 --data data/mycorpus --seq-len 1024 --global-batch-size 64
    # one plain process
    python examples/pretrain_gpt.py --steps 20

dp is what is left: world // (tp * pp). Microbatches per step:
global_batch_size / (micro_batch_size * dp).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel.state import check_layout
from megalite.pipeline import (SCHEDULE_NAMES, build_schedule, layers_per_stage,
                               load_schedule, plot_timeline, rank_stages, write_chrome_trace)
from megalite.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megalite.training.data import ShardedSampler, TokenDataset, default_corpus_path, get_batch
from megalite.training.metrics import MetricsLogger, peak_flops, peak_memory_gb
from megalite.training.optim import build_optimizer, build_scheduler
from megalite.training.precision import DynamicLossScaler
from megalite.training.step import check_placement, train_step


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    layout = p.add_argument_group("layout")
    layout.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel size")
    layout.add_argument("--pp", type=POSITIVE, default=1, help="pipeline-parallel size")
    layout.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b",
                        help="pipeline schedule (docs/pipeline.md)")
    layout.add_argument("--virtual-stages", type=POSITIVE, default=None,
                        help="stages per pipeline rank (interleaved-1f1b, interleaved-zb: "
                             "default 2; zbv: 2)")
    layout.add_argument("--schedule-file", default=None,
                        help="run this schedule table (CSV or JSON, one row per pipeline rank) "
                             "instead of --schedule")
    layout.add_argument("--sequence-parallel", action="store_true")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny", help="GPTConfig preset")
    model.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto")
    model.add_argument("--dropout", type=float, default=0.0)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="token file prefix (python -m megalite.training.preprocess); "
                           "default: the bundled corpus")
    data.add_argument("--seq-len", type=POSITIVE, default=128)
    data.add_argument("--micro-batch-size", type=POSITIVE, default=2)
    data.add_argument("--global-batch-size", type=POSITIVE, default=16)
    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=POSITIVE, default=100, help="train until this optimizer step")
    opt.add_argument("--lr", type=float, default=3e-3)
    opt.add_argument("--min-lr-ratio", type=float, default=0.1)
    opt.add_argument("--warmup", type=NON_NEGATIVE, default=None, help="default: 5%% of --steps")
    opt.add_argument("--decay", choices=["cosine", "linear", "constant"], default="cosine")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    opt.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    opt.add_argument("--tf32", action="store_true",
                     help="fp32 matmuls on TF32 tensor cores (GPU; fp32 MFU assumes it)")
    opt.add_argument("--seed", type=int, default=1234)
    out = p.add_argument_group("output")
    out.add_argument("--metrics-out", default=None, help="JSONL file, one object per step")
    out.add_argument("--log-interval", type=POSITIVE, default=10)
    out.add_argument("--tensorboard", default=None, help="TensorBoard log directory")
    out.add_argument("--save", default=None, help="checkpoint directory")
    out.add_argument("--save-every", type=NON_NEGATIVE, default=0, help="0: only at the end")
    out.add_argument("--load", default=None, help="resume from this checkpoint directory")
    out.add_argument("--trace", default=None,
                     help="directory for a Chrome trace + PNG timeline of the last step")
    out.add_argument("--verbose-p2p", action="store_true", help="log every pipeline send/recv")
    return p.parse_args(argv)


def check_batch_sizes(args, dp: int) -> int:
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x dp = {args.micro_batch_size} x {dp}")
    return args.global_batch_size // per_step


def pipeline_table(args, world_size: int) -> dict[int, list[str]]:
    """The schedule every pipeline rank runs, from the flags alone (before any process
    group): built by name, or read from --schedule-file and checked against the run and
    the model's layers."""
    m = check_batch_sizes(args, check_layout(args.tp, args.pp, None, world_size))
    if args.schedule_file:
        if args.virtual_stages is not None:
            raise ValueError("--virtual-stages comes from the --schedule-file's table; drop it")
        table = load_schedule(args.schedule_file, num_ranks=args.pp, num_microbatches=m)
    else:
        table = build_schedule(args.schedule, args.pp, m, virtual=args.virtual_stages)
    owner = check_placement(table, args.pp)
    cfg = GPTConfig.preset(args.model)
    layers_per_stage(cfg.n_layers, len(owner), cfg.layers_per_stage)  # >= 1 layer per stage
    return table


def main(argv=None):
    args = parse_args(argv)
    table = pipeline_table(args, int(os.environ.get("WORLD_SIZE", "1")))
    ps = parallel.initialize(tp=args.tp, pp=args.pp)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    num_microbatches = check_batch_sizes(args, ps.dp)
    stages = rank_stages(table)
    cfg = GPTConfig.preset(args.model, sequence_parallel=args.sequence_parallel,
                           kernels=args.kernels, dropout=args.dropout)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {args.model} preset's "
                         f"max_seq_len {cfg.max_seq_len}")
    parallel.model_parallel_seed(args.seed)
    model = GPT(cfg, stages=stages[ps.pp_rank], num_stages=sum(map(len, stages.values())))
    dataset = TokenDataset(args.data or default_corpus_path(), args.seq_len)
    if dataset.vocab_size > cfg.vocab_size:
        raise ValueError(f"the data's tokenizer has {dataset.vocab_size} tokens but the model "
                         f"only {cfg.vocab_size}: pick a matching --model or --data")
    sampler = ShardedSampler(len(dataset), args.global_batch_size, ps.dp_rank, ps.dp, args.seed)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = build_scheduler(optimizer, warmup, args.steps, args.decay, args.min_lr_ratio)
    scaler = DynamicLossScaler() if args.dtype == "fp16" else None

    start_step = 0
    resume_from = latest_checkpoint(args.load) if args.load else None
    if args.load and resume_from is None:
        raise ValueError(f"--load {args.load}: no checkpoint found there")
    if resume_from:
        start_step = load_checkpoint(resume_from, model, optimizer, scheduler, sampler, scaler)

    tokens_per_step = args.global_batch_size * args.seq_len
    flops_per_token = cfg.flops_per_token(args.seq_len)
    peak = peak_flops(ps.device, args.dtype)
    logger = MetricsLogger(ps.rank, args.steps, args.metrics_out, args.log_interval,
                           args.tensorboard, resumed_at=start_step if resume_from else None)
    schedule_name = args.schedule_file or args.schedule
    if model.num_stages > ps.pp:
        schedule_name += f" ({model.num_stages // ps.pp} stages per rank)"
    if ps.rank == 0:
        print(f"megalite: {args.model} ({cfg.num_params() / 1e6:.2f}M params) on {ps.world_size} "
              f"{ps.device.type} processes: tp={ps.tp} pp={ps.pp} dp={ps.dp}, "
              f"{num_microbatches} microbatches of {args.micro_batch_size} x {args.seq_len}, "
              f"{schedule_name}, {args.dtype}; steps {start_step + 1}..{args.steps}"
              + (f" (resumed from {resume_from})" if resume_from else ""), flush=True)

    # Saved with every checkpoint: generate.py finds the tokenizer here.
    extra = {"args": vars(args), "tokenizer": dataset.meta.get("tokenizer")}
    result = None
    for step in range(start_step + 1, args.steps + 1):
        tokens, targets = get_batch(dataset, sampler.next_batch_indices())
        tokens, targets = tokens.to(ps.device), targets.to(ps.device)
        if ps.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        result = train_step(model, optimizer, tokens, targets,
                            micro_batch_size=args.micro_batch_size, schedule=table,
                            max_grad_norm=args.clip_grad, grad_scaler=scaler, dtype=args.dtype,
                            verbose=args.verbose_p2p,
                            trace=bool(args.trace) and step == args.steps)
        scheduler.step()
        if ps.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
               "tokens_per_sec": tokens_per_step / dt, "step_time_s": dt}
        if peak:
            row["mfu"] = flops_per_token * tokens_per_step / dt / (peak * ps.world_size)
        row["peak_mem_gb"] = peak_memory_gb(ps.device)
        if result.skipped:
            row["skipped"] = True
        logger.log(row)
        if args.save and args.save_every and step % args.save_every == 0 and step < args.steps:
            save_checkpoint(args.save, step, model, optimizer, scheduler, sampler, scaler,
                            extra=extra)
    if args.save and result is not None:
        save_checkpoint(args.save, args.steps, model, optimizer, scheduler, sampler, scaler,
                        extra=extra)
    if args.trace and result is not None:
        write_timeline(args.trace, result.spans, ps, schedule_name)
    if ps.rank == 0:
        print(logger.summary() + (f"; checkpoint in {args.save}" if args.save else ""),
              flush=True)
    logger.close()
    parallel.destroy()


def write_timeline(directory: str, spans: list, ps, schedule: str) -> None:
    """Gather every pipeline rank's spans of the last step; rank 0 writes trace and PNG."""
    os.makedirs(directory, exist_ok=True)
    gathered = [spans]
    if ps.pp > 1:
        gathered = [None] * ps.pp
        dist.all_gather_object(gathered, spans, group=ps.pp_group)
    if ps.rank == 0:
        all_spans = [s for rank_spans in gathered for s in rank_spans]
        t0 = min(s[3] for s in all_spans)
        all_spans = [(r, n, k, a - t0, b - t0) for r, n, k, a, b in all_spans]
        write_chrome_trace(all_spans, os.path.join(directory, "timeline.json"), unit_us=1e6)
        plot_timeline(all_spans, os.path.join(directory, "timeline.png"),
                      f"{schedule}, pp={ps.pp}: measured step (seconds)")
        print(f"timeline written to {directory}/timeline.json and timeline.png", flush=True)


if __name__ == "__main__":
    main()
