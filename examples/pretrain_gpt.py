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

With --save DIR a run that is stopped (SIGTERM, --max-time, a crash) continues where its
newest intact checkpoint left off when the same command is run again. Exit codes: 0 done
(or a planned stop), 1 a rank failed, 2 bad command line, 3 too many non-finite steps,
4 a stuck step, 128+N stopped by signal N after saving (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from megalite import parallel
from megalite.kernels import HAS_TRITON, interpreting
from megalite.models import GPT, GPTConfig
from megalite.parallel.comm import agree
from megalite.parallel import check_layout
from megalite import plan
from megalite.pipeline import (SCHEDULE_NAMES, build_schedule, gather_spans, layers_per_stage,
                               load_schedule, plot_timeline, rank_stages, write_chrome_trace)
from megalite.training import inject
from megalite.training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from megalite.training.checkpoint_dir import (find_resume_checkpoint, list_checkpoints,
                                              remove_checkpoints)
from megalite.training.data import (ShardedSampler, TokenDataset, default_corpus_path,
                                    get_batch, read_metadata)
from megalite.training.errors import UsageError, run_cli, write_launcher_error_file
from megalite.training.fault import StepWatchdog, Stopper, StopSignals
from megalite.training.metrics import MetricsLogger, peak_flops, peak_memory_gb
from megalite.training.optim import build_optimizer, build_scheduler
from megalite.training.precision import DynamicLossScaler
from megalite.training import profiling
from megalite.training import check_placement, train_step


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _float_at_least(low: float, strict: bool = False):
    def parse(text: str) -> float:
        value = float(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} "
                                             f"{low:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block on every rank; say the mistake in one line, once."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n")[0],
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
    model.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                       help="activation recomputation (docs/memory.md): full keeps only each "
                            "layer's input; selective recomputes norms, attention core and "
                            "the MLP activation")
    model.add_argument("--recompute-layers", type=POSITIVE, default=None, metavar="N",
                       help="with --recompute full: only the first N layers of each stage "
                            "(default: all)")
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
    opt.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                     help="default: 5%% of --steps, at least 10 steps, at most half the run")
    opt.add_argument("--decay", choices=["cosine", "linear", "constant"], default="cosine")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    opt.add_argument("--distributed-optimizer", action="store_true",
                     help="shard the AdamW state over the dp group (ZeRO-1, docs/memory.md)")
    opt.add_argument("--no-overlap-grad-reduce", action="store_true",
                     help="reduce gradients over dp after the whole backward instead of "
                          "bucket by bucket during the last microbatch's")
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
    out.add_argument("--keep-last", type=NON_NEGATIVE, default=0,
                     help="keep only the newest K checkpoints in --save (0: all)")
    out.add_argument("--load", default=None,
                     help="start from this checkpoint (directory or one step_XXXXXXXX in it) "
                          "when --save holds none")
    out.add_argument("--no-resume", action="store_true",
                     help="do not resume from --save's checkpoints; start from --load or "
                          "scratch and delete --save's checkpoints newer than that start")
    out.add_argument("--trace", default=None,
                     help="directory for a Chrome trace + PNG timeline of the last step")
    out.add_argument("--profile", default=None, metavar="DIR",
                     help="profile the last step (after the others as warm-up): a torch "
                          "profiler Chrome trace per rank in DIR and a table of time by "
                          "category (matmul, attention, copies, ...) at the end")
    out.add_argument("--verbose-p2p", action="store_true", help="log every pipeline send/recv")
    out.add_argument("--debug", action="store_true",
                     help="print full tracebacks (also MEGALITE_DEBUG=1)")
    mem = p.add_argument_group("memory planning (docs/planner.md)")
    mem.add_argument("--check-memory", action="store_true",
                     help="stop before anything is allocated when the planner predicts the "
                          "layout does not fit --gpu-memory")
    mem.add_argument("--gpu-memory", default=None, metavar="SIZE",
                     help="memory per GPU for --check-memory and the printed prediction, e.g. "
                          "80GB or 75GiB (default on GPU: the device's)")
    run = p.add_argument_group("stopping and faults (docs/reliability.md)")
    run.add_argument("--max-time", type=_float_at_least(0, strict=True), default=None,
                     metavar="MINUTES", help="stop (with a checkpoint) before this wall time")
    run.add_argument("--exit-after", type=POSITIVE, default=None, metavar="STEPS",
                     help="stop (with a checkpoint) after this many steps of this launch")
    run.add_argument("--max-skipped-steps", type=POSITIVE, default=5, metavar="K",
                     help="stop after K steps in a row with a non-finite loss or grad norm")
    run.add_argument("--comm-timeout", type=_float_at_least(0, strict=True), default=600.0,
                     metavar="SECONDS", help="timeout of every collective")
    run.add_argument("--step-timeout", type=_float_at_least(0), default=None, metavar="SECONDS",
                     help="end all ranks when a step takes longer (0: off; default: "
                          "--comm-timeout for the first steps, then max(60, 10 x median))")
    return p.parse_args(argv)


def check_batch_sizes(args, dp: int) -> int:
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise UsageError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x dp = {args.micro_batch_size} x {dp}")
    return args.global_batch_size // per_step


def pipeline_table(args, num_microbatches: int) -> dict[int, list[str]]:
    """The schedule every pipeline rank runs: built by name, or read from --schedule-file
    and checked against the run (ranks, microbatches, a GPT's placement)."""
    if args.schedule_file:
        if args.virtual_stages is not None:
            raise UsageError("--virtual-stages comes from the --schedule-file's table; drop it")
        table = load_schedule(args.schedule_file, num_ranks=args.pp,
                              num_microbatches=num_microbatches)
    else:
        table = build_schedule(args.schedule, args.pp, num_microbatches,
                               virtual=args.virtual_stages)
    check_placement(table, args.pp)
    return table


def check_args(args, world_size: int):
    """Every check the flags alone decide, run before any process group, model or data is
    built: a mistake raises UsageError naming the flag and the fix. Returns (dp,
    microbatches per step, GPTConfig, the pipeline schedule)."""
    try:
        dp = check_layout(args.tp, args.pp, None, world_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    num_microbatches = check_batch_sizes(args, dp)
    try:
        table = pipeline_table(args, num_microbatches)
    except ValueError as e:
        flag = "--schedule-file" if args.schedule_file else "--schedule/--virtual-stages"
        raise UsageError(f"{flag}: {e}") from None
    num_stages = sum(map(len, rank_stages(table).values()))
    if args.recompute_layers is not None and args.recompute != "full":
        raise UsageError(f"--recompute-layers {args.recompute_layers} applies to full "
                         f"recompute: add --recompute full (it is {args.recompute}), or drop "
                         f"--recompute-layers")
    try:
        cfg = GPTConfig.preset(args.model, sequence_parallel=args.sequence_parallel,
                               kernels=args.kernels, dropout=args.dropout)
        counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    if args.recompute_layers is not None and args.recompute_layers > min(counts):
        raise UsageError(f"--recompute-layers {args.recompute_layers} exceeds the layers of a "
                         f"stage: {args.model}'s {cfg.n_layers} layers over {num_stages} "
                         f"stages are {counts} per stage; use --recompute-layers <= "
                         f"{min(counts)}, or drop it to recompute every layer")
    cfg = cfg.replace(recompute=args.recompute, recompute_layers=args.recompute_layers)
    if cfg.n_heads % args.tp or cfg.n_kv_heads % args.tp:
        raise UsageError(f"--tp {args.tp} must divide the {args.model} preset's n_heads "
                         f"{cfg.n_heads} and n_kv_heads {cfg.n_kv_heads}; lower --tp")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the {args.model} preset's "
                         f"max_seq_len {cfg.max_seq_len}")
    if args.sequence_parallel and args.seq_len % args.tp:
        raise UsageError(f"--sequence-parallel splits the sequence over tp ranks: --seq-len "
                         f"{args.seq_len} must be divisible by --tp {args.tp}")
    if args.kernels == "triton":
        on_gpu = torch.cuda.is_available() and os.environ.get("MEGALITE_DEVICE") != "cpu"
        if not HAS_TRITON:
            raise UsageError("--kernels triton needs the triton package: pip install "
                             "'megalite[triton]', or use --kernels auto")
        if not (on_gpu or interpreting()):
            raise UsageError("--kernels triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run "
                             "the kernels in Triton's (slow) CPU interpreter; or use "
                             "--kernels auto")
    try:
        meta = read_metadata(args.data or default_corpus_path())
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {args.data}: {e}") from None
    if int(meta["vocab_size"]) > cfg.vocab_size:
        raise UsageError(f"the data's tokenizer has {meta['vocab_size']} tokens but the "
                         f"{args.model} model only {cfg.vocab_size}: pick a matching --model "
                         f"or --data")
    samples = max(0, int(meta["num_tokens"]) - 1) // args.seq_len
    if samples < args.global_batch_size:
        raise UsageError(f"--data has {samples} samples of --seq-len {args.seq_len}, fewer "
                         f"than one --global-batch-size {args.global_batch_size}")
    for flag, value in (("--save-every", args.save_every), ("--keep-last", args.keep_last),
                        ("--no-resume", args.no_resume)):
        if value and not args.save:
            raise UsageError(f"{flag} needs --save DIR")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise UsageError(f"--save {args.save} is a file, not a directory")
    if args.load and not os.path.exists(args.load):
        raise UsageError(f"--load {args.load} does not exist; pass the --save directory of "
                         f"an earlier run (or one step_XXXXXXXX directory in it)")
    if args.load and not (os.path.isfile(os.path.join(args.load, "meta.json"))
                          or list_checkpoints(args.load)):
        raise UsageError(f"--load {args.load} holds no complete checkpoint (no meta.json in "
                         f"it or in a step_XXXXXXXX directory below it)")
    check_memory(args, dp, cfg, world_size)
    return dp, num_microbatches, cfg, table


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGALITE_DEVICE") != "cpu"


def planned_layout(args, dp: int, cfg) -> plan.Layout | None:
    """The planner's view of this run (None for a --schedule-file table, which it does not
    model). The fused loss has no flag: it is ``cfg.fused_loss`` (on by default)."""
    if args.schedule_file:
        return None
    triton = _on_gpu() and args.kernels != "torch"
    return plan.Layout(
        tp=args.tp, pp=args.pp, dp=dp, micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len, global_batch_size=args.global_batch_size,
        schedule=args.schedule, virtual_stages=args.virtual_stages,
        sequence_parallel=args.sequence_parallel and args.tp > 1, dtype=args.dtype,
        recompute=args.recompute, recompute_layers=args.recompute_layers,
        distributed_optimizer=args.distributed_optimizer,
        overlap_grad_reduce=not args.no_overlap_grad_reduce,
        kernels="triton" if triton else "torch", fused_loss=cfg.fused_loss)


def memory_budget(args) -> float | None:
    """--gpu-memory, else the GPU's memory (queried without allocating), else None."""
    if args.gpu_memory:
        try:
            return plan.parse_bytes(args.gpu_memory)
        except ValueError:
            raise UsageError(f"--gpu-memory {args.gpu_memory}: give a size such as 80GB or "
                             f"75GiB") from None
    if _on_gpu():
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))
                                                ).total_memory
    return None


def check_memory(args, dp: int, cfg, world_size: int) -> None:
    """--check-memory: the planner's verdict on the flags, before any process group."""
    if not args.check_memory:
        return
    budget = memory_budget(args)
    if budget is None:
        raise UsageError("--check-memory on CPU needs --gpu-memory SIZE (the GPU memory to "
                         "check against)")
    layout = planned_layout(args, dp, cfg)
    if layout is None:
        raise UsageError("--check-memory models the named schedules; drop --schedule-file "
                         "or --check-memory")
    try:
        reason = plan.fit_reason(plan.memory(cfg, layout), budget)
    except ValueError as e:
        raise UsageError(f"--check-memory: {e}") from None
    if reason:
        raise UsageError(f"--check-memory: {layout.describe()} {reason}; python -m "
                         f"megalite.plan --model {args.model} --gpus {world_size} "
                         f"--gpu-memory {budget / 2**30:.1f}GiB --seq-len {args.seq_len} "
                         f"--global-batch-size {args.global_batch_size} lists layouts that fit")


def planner_prediction(args, dp: int, cfg, device) -> tuple[str, dict] | None:
    """(a line to print, {'peak_gib', 'step_s'}) of the planner's prediction for this run."""
    layout = planned_layout(args, dp, cfg)
    if layout is None:
        return None
    mem = plan.memory(cfg, layout)
    worst = mem.worst
    parts = ", ".join(f"{k} {v / 2**30:.3g}" for k, v in worst.parts().items() if v)
    line = (f"planner: peak {worst.total / 2**30:.3g} GiB on pipeline rank {worst.pp_rank} "
            f"({parts}; activations of {sum(worst.live_microbatches.values())} live "
            f"stage-microbatches)")
    predicted = {"rank0_gib": mem.ranks[0].total / 2**30, "step_s": None}
    gpu = plan.gpu_for_device(torch.cuda.get_device_name(device)) \
        if device.type == "cuda" else None
    if gpu is not None:
        t = plan.step_time(cfg, layout, gpu)
        predicted["step_s"] = t.step
        line += f"; step {t.step:.3f} s, MFU {t.mfu:.1%} on {gpu.name}"
    elif device.type != "cuda":
        line += " (GPU accounting: on CPU the measured peak is the process RSS)"
    budget = memory_budget(args)
    if budget is not None and worst.total > budget:
        line += f"; over --gpu-memory {budget / 2**30:.1f} GiB"
    return line, predicted


def default_warmup(steps: int) -> int:
    """5% of the run, but at least 10 steps (a 1-step warmup at full lr can blow a large
    model up on its first updates), and never more than half of a short run."""
    return min(max(10, steps // 20), max(1, steps // 2))


def choose_start(args, ps, say) -> str | None:
    """The checkpoint to start from (collective): --save's newest intact one unless
    --no-resume, else --load's; with --no-resume, --save's newer checkpoints are deleted."""
    if args.save and not args.no_resume:
        found = find_resume_checkpoint(args.save, set_aside=True, warn=say)
        if found:
            note = (f"; --load {args.load} is used only when --save holds no checkpoint"
                    if args.load else "")
            say(f"resuming from {found} (the newest intact checkpoint in --save; "
                f"--no-resume starts over{note})")
            return found
    found = None
    if args.load:
        found = find_resume_checkpoint(args.load, warn=say)
        missing = ValueError(f"--load {args.load}: no intact checkpoint there (see the "
                             f"warning above)") if found is None and ps.rank == 0 else None
        agree(missing, f"--load {args.load}")  # rank 0 says why, the others stop quietly
    if args.save and args.no_resume:
        start, error = read_checkpoint_meta(found)["step"] if found else 0, None
        if ps.rank == 0:
            try:
                removed = remove_checkpoints(args.save, after_step=start)
                if removed:
                    say(f"--no-resume: deleted {len(removed)} checkpoint(s) after step {start} "
                        f"in {args.save}: {', '.join(os.path.basename(r) for r in removed)}")
            except OSError as e:
                error = e
        agree(error, f"deleting old checkpoints in {args.save}")  # also a barrier
    return found


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    dp, num_microbatches, cfg, table = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    ps = parallel.initialize(tp=args.tp, pp=args.pp, timeout_s=args.comm_timeout)
    say = print if ps.rank == 0 else (lambda *a, **k: None)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    resume_from = choose_start(args, ps, say)
    start_step = read_checkpoint_meta(resume_from)["step"] if resume_from else 0
    if start_step > args.steps:
        raise UsageError(f"{resume_from} is at step {start_step}, past --steps {args.steps} "
                         f"(--steps is the step to train until): pass a larger --steps, or "
                         f"--no-resume to start over")
    if resume_from and start_step == args.steps:
        say(f"{resume_from} is already at --steps {args.steps}: nothing to train", flush=True)
        parallel.destroy()
        return 0

    parallel.model_parallel_seed(args.seed)
    stages = rank_stages(table)
    model = GPT(cfg, stages=stages[ps.pp_rank], num_stages=sum(map(len, stages.values())))
    dataset = TokenDataset(args.data or default_corpus_path(), args.seq_len)
    sampler = ShardedSampler(len(dataset), args.global_batch_size, ps.dp_rank, ps.dp, args.seed)
    # At dp=1 the distributed optimizer warns (on rank 0) that it shards nothing.
    optimizer = build_optimizer(model, args.lr, args.weight_decay,
                                distributed=args.distributed_optimizer)
    warmup = args.warmup if args.warmup is not None else default_warmup(args.steps)
    # The schedule always spans --steps, so a run stopped and resumed any number of times
    # follows the same learning rates as one that ran through.
    scheduler = build_scheduler(optimizer, warmup, args.steps, args.decay, args.min_lr_ratio)
    scaler = DynamicLossScaler() if args.dtype == "fp16" else None
    if resume_from:
        load_checkpoint(resume_from, model, optimizer, scheduler, sampler, scaler,
                        verify=False)  # choose_start verified it

    tokens_per_step = args.global_batch_size * args.seq_len
    flops_per_token = cfg.flops_per_token(args.seq_len)
    peak = peak_flops(ps.device, args.dtype)
    logger = MetricsLogger(ps.rank, args.steps, args.metrics_out, args.log_interval,
                           args.tensorboard, resumed_at=start_step if resume_from else None)
    schedule_name = args.schedule_file or args.schedule
    if model.num_stages > ps.pp:
        schedule_name += f" ({model.num_stages // ps.pp} stages per rank)"
    predicted = planner_prediction(args, ps.dp, cfg, ps.device)
    if predicted:
        say(predicted[0], flush=True)
    say(f"megalite: {args.model} ({cfg.num_params() / 1e6:.2f}M params) on {ps.world_size} "
        f"{ps.device.type} processes: tp={ps.tp} pp={ps.pp} dp={ps.dp}, "
        f"{num_microbatches} microbatches of {args.micro_batch_size} x {args.seq_len}, "
        f"{schedule_name}, {args.dtype}"
        + (", distributed optimizer" if args.distributed_optimizer else "")
        + (f", recompute {args.recompute}" if args.recompute != "none" else "")
        + (f" (first {args.recompute_layers} layers of each stage)"
           if args.recompute_layers else "")
        + f"; steps {start_step + 1}..{args.steps}"
        + (f" (resumed from {resume_from})" if resume_from else ""), flush=True)

    # Saved with every checkpoint: generate.py finds the tokenizer here.
    extra = {"args": vars(args), "tokenizer": dataset.meta.get("tokenizer")}
    # From here on SIGTERM/SIGINT stop the run after a step, with a checkpoint (before, with
    # nothing to save, they end the process as usual).
    signals = StopSignals().install()
    stopper = Stopper(signals, max_time_min=args.max_time, exit_after=args.exit_after,
                      max_skipped=args.max_skipped_steps, start_time=started, device=ps.device)
    watchdog = StepWatchdog(ps.rank, ps.world_size, args.step_timeout,
                            startup_s=args.comm_timeout)
    if args.step_timeout != 0:
        watchdog.start()
    result, stop, saved, profiled = None, None, None, None
    for step in range(start_step + 1, args.steps + 1):
        watchdog.step_started(step)
        inject.at_step_start(step, ps.rank)  # test-only faults (MEGALITE_FAULT)
        tokens, targets = get_batch(dataset, sampler.next_batch_indices())
        tokens, targets = tokens.to(ps.device), targets.to(ps.device)
        if ps.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]

        def run_step():
            return train_step(model, optimizer, tokens, targets,
                              micro_batch_size=args.micro_batch_size, schedule=table,
                              max_grad_norm=args.clip_grad, grad_scaler=scaler,
                              dtype=args.dtype,
                              overlap_grad_reduce=not args.no_overlap_grad_reduce,
                              verbose=args.verbose_p2p,
                              trace=bool(args.trace) and step == args.steps,
                              loss_fn=inject.poison_loss(model.loss, step, ps.rank))
        if args.profile and step == args.steps:
            result, profiled = profiling.profile_step(
                run_step, args.profile, ps.device, f"trace_rank{ps.rank}.json")
        else:
            result = run_step()
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
            row["skip_reason"] = "non-finite loss or grad norm" if result.nonfinite else \
                "fp16 overflow"
        logger.log(row)
        stop = stopper.after_step(result.nonfinite, dt)  # collective: all ranks agree
        watchdog.step_finished(dt)
        if args.save and (stop or step == args.steps
                          or (args.save_every and step % args.save_every == 0)):
            with watchdog.paused():
                saved = save_checkpoint(args.save, step, model, optimizer, scheduler, sampler,
                                        scaler, extra=extra, keep_last=args.keep_last)
        if stop:
            break
    watchdog.close()
    if stop and step == args.steps:
        stop = None  # the run was complete anyway
    if args.trace and result is not None and stop is None:
        write_timeline(args.trace, result.spans, ps, schedule_name)
    say(logger.summary() + (f"; checkpoint {saved}" if saved else ""), flush=True)
    if args.profile and profiled is not None:
        rows, total = profiling.breakdown(profiled, ps.device.type)
        copies = profiling.count_calls(profiled)
        say(f"profile of step {args.steps} on rank 0 (traces in {args.profile}/):\n"
            + profiling.format_table(rows, total, ps.device.type) + "\ncopy calls: "
            + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in copies.items()),
            flush=True)
    if predicted and logger.history:
        say(measured_vs_planned(logger.history, predicted[1], ps), flush=True)
    if stop:  # the last line: what stopped the run and what to do next
        line = f"{stop.message} after step {step}; " + (
            "nothing saved (no --save)" if not saved else f"saved {saved}; {stop.advice}")
        say(line, flush=True)
        if stop.exit_code:
            write_launcher_error_file(f"rank {ps.rank}: {line}")
    logger.close()
    parallel.destroy()
    signals.uninstall()
    return stop.exit_code if stop else 0


def measured_vs_planned(history: list, predicted: dict, ps) -> str:
    """The measured figures next to the planner's (the peak of the predicted rank, the
    median step time after the first step)."""
    timed = sorted(r["step_time_s"] for r in (history[1:] or history))
    median = timed[len(timed) // 2]
    peak = max(r["peak_mem_gb"] for r in history)   # this rank: pipeline rank 0
    line = (f"measured vs planner: peak {peak:.3g} GiB on pipeline rank 0 (planner "
            f"{predicted['rank0_gib']:.3g} GiB)")
    if ps.device.type != "cuda":
        line += " [CPU: RSS, not comparable]"
    line += f"; step {median:.3f} s"
    if predicted["step_s"] is not None:
        line += f" (planner {predicted['step_s']:.3f} s)"
    return line


def write_timeline(directory: str, spans: list, ps, schedule: str) -> None:
    """Gather every pipeline rank's spans of the last step; rank 0 writes trace and PNG."""
    os.makedirs(directory, exist_ok=True)
    all_spans = gather_spans(spans, ps)
    if all_spans is not None:
        write_chrome_trace(all_spans, os.path.join(directory, "timeline.json"), unit_us=1e6)
        plot_timeline(all_spans, os.path.join(directory, "timeline.png"),
                      f"{schedule}, pp={ps.pp}: measured step (seconds)")
        print(f"timeline written to {directory}/timeline.json and timeline.png", flush=True)


if __name__ == "__main__":
    run_cli(main)
