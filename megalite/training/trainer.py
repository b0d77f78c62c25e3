"""The training loop as a library: layout, schedule, resume, checkpoints, the stop/watchdog/
non-finite rules, metrics, Hugging Face import/export and the end-of-run reports.

    from megalite.training import Trainer, parse_args
    Trainer(parse_args(["--tp", "2", "--pp", "2", "--steps", "50"])).run()      # a GPT
    Trainer(parse_args([...]), model_provider=build).run()                        # your model

``model_provider(ps, stages, num_stages)`` builds this rank's part of a model of your own
(:class:`megalite.training.trainable.TrainableModel`); without one the trainer builds the
GPT of ``--model`` / ``--init-from-hf``. ``python -m megalite.train``, ``megalite-train``
and ``examples/pretrain_gpt.py`` are this loop behind :mod:`megalite.training.cli`'s flags.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

from megalite import parallel
from megalite.models import GPT, save_hf
from megalite.parallel import fsdp
from megalite.parallel.comm import agree
from megalite.pipeline import rank_stages
from megalite.training import inject, profiling
from megalite.training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from megalite.training.checkpoint_dir import find_resume_checkpoint, remove_checkpoints
from megalite.parallel.state import ParallelState
from megalite.training.cli import (RunPlan, autocast_dtype, check_args, default_warmup,
                                   schedule_note)
from megalite.training.config_file import write_effective_config
from megalite.training.data import ShardedSampler, get_batch
from megalite.training.errors import UsageError, write_launcher_error_file
from megalite.training.fault import StepWatchdog, Stopper, StopSignals
from megalite.training.metrics import MetricsLogger, peak_flops, peak_memory_gb
from megalite.training.optim import build_optimizer, build_scheduler
from megalite.training.precision import DynamicLossScaler, activation_dtype
from megalite.training.reporting import measured_vs_planned, planner_prediction, write_timeline
from megalite.training.hf import copy_tokenizer_files, gpt_from_hf, hf_model_type
from megalite.training.run_data import describe as describe_data
from megalite.training.run_data import evaluation_due, open_run_data, validation_metrics
from megalite.training.step import train_step
from megalite.training.trainable import TrainableModel, check_trainable


ModelProvider = Callable[[ParallelState, list, int], TrainableModel]


class Trainer:
    """One training run of the flags ``args`` (:func:`megalite.training.cli.parse_args`).

    ``model_provider(ps, stages, num_stages)``, when given, builds this rank's ``stages`` of
    ``num_stages`` of the model to train (after the process group started, so it may use the
    parallel layers; every rank calls it with the same seed set); the GPT flags are refused
    then. ``run_plan`` is ``check_args``'s result (computed here when omitted); ``started``
    the ``time.monotonic()`` the run's wall time (``--max-time``) counts from. ``run()``
    starts the process group, trains to ``--steps`` and returns the exit code
    (:mod:`megalite.training.errors`); a bad flag raises UsageError before anything starts.
    """

    def __init__(self, args, run_plan: RunPlan | None = None, *,
                 model_provider: ModelProvider | None = None, started: float | None = None):
        self.started = time.monotonic() if started is None else started
        self.args = args
        self.model_provider = model_provider
        self.plan = run_plan or check_args(args, int(os.environ.get("WORLD_SIZE", "1")),
                                           gpt=model_provider is None)

    # ------------------------------------------------------------------ setup
    def run(self) -> int:
        args, cfg, table = self.args, self.plan.cfg, self.plan.schedule
        ps = self.ps = parallel.initialize(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep,
                                           timeout_s=args.comm_timeout)
        say = self.say = print if ps.rank == 0 else (lambda *a, **k: None)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        resume_from = choose_start(args, ps, say)
        start_step = read_checkpoint_meta(resume_from)["step"] if resume_from else 0
        if start_step > args.steps:
            raise UsageError(f"{resume_from} is at step {start_step}, past --steps {args.steps} "
                             f"(--steps is the step to train until): pass a larger --steps, or "
                             f"--no-resume to start over")
        if resume_from and start_step == args.steps and not args.export_hf:
            say(f"{resume_from} is already at --steps {args.steps}: nothing to train",
                flush=True)
            parallel.destroy()
            return 0

        parallel.model_parallel_seed(args.seed)
        stages = rank_stages(table)
        model = self.model = self.build_model(stages[ps.pp_rank],
                                              sum(map(len, stages.values())),
                                              from_hf=not resume_from)
        if getattr(args, "fsdp", False):  # before the optimizer: it holds the DTensor shards
            fsdp.fully_shard_model(model, ps, param_dtype=torch.bfloat16
                                   if args.dtype == "bf16" else None)
        self.data = open_run_data(args)
        self.dataset = self.data.train
        self.sampler = ShardedSampler(self.dataset.sizes, args.global_batch_size, ps.dp_rank,
                                      ps.dp, args.seed, weights=self.dataset.weights)
        # At dp=1 the distributed optimizer warns (on rank 0) that it shards nothing.
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay,
                                         distributed=args.distributed_optimizer)
        warmup = args.warmup if args.warmup is not None else default_warmup(args.steps)
        # The schedule always spans --steps, so a run stopped and resumed any number of times
        # follows the same learning rates as one that ran through.
        self.scheduler = build_scheduler(self.optimizer, warmup, args.steps, args.decay,
                                         args.min_lr_ratio)
        self.scaler = DynamicLossScaler() if args.dtype == "fp16" else None
        # A GPT takes --dtype as its parameters' dtype (cfg.params_dtype) unless --autocast;
        # a model of the user's own with fp32 parameters keeps autocasting to --dtype.
        self.autocast = autocast_dtype(args) if self.model_provider is None or \
            activation_dtype(model) != torch.float32 else args.dtype
        if resume_from:  # a run that resumes continues its own weights, not the HF ones
            load_checkpoint(resume_from, model, self.optimizer, self.scheduler, self.sampler,
                            self.scaler, verify=False)  # choose_start verified it
        if start_step == args.steps:  # already trained: only --export-hf is left to do
            self.export_hf()
            parallel.destroy()
            return 0
        write_effective_config(args, ps)

        self.logger = MetricsLogger(ps.rank, args.steps, args.metrics_out, args.log_interval,
                                    args.tensorboard,
                                    resumed_at=start_step if resume_from else None)
        self.schedule_name = args.schedule_file or args.schedule
        if model.num_stages > ps.pp:
            self.schedule_name += f" ({model.num_stages // ps.pp} stages per rank)"
        self.predicted = planner_prediction(args, ps.dp, cfg, ps.device) if cfg else None
        if self.predicted:
            say(self.predicted[0], flush=True)
        note = schedule_note(args, self.plan)
        if note:
            say(note, flush=True)
        say(self.describe(start_step, resume_from), flush=True)
        say(describe_data(self.data, args), flush=True)
        try:
            return self.train(start_step)
        finally:
            self.logger.close()

    def build_model(self, stages: list[int], num_stages: int, from_hf: bool):
        """This rank's part of the model: the provider's, or the GPT of the flags (with the
        --init-from-hf weights when ``from_hf``)."""
        if self.model_provider is not None:
            model = self.model_provider(self.ps, stages, num_stages)
            check_trainable(model)
            return model
        directory = self.args.init_from_hf
        if directory and from_hf:
            return gpt_from_hf(directory, self.plan.cfg, self.ps, stages, num_stages)
        model = GPT(self.plan.cfg, self.ps, stages=stages, num_stages=num_stages)
        if directory:  # resumed: --export-hf writes the architecture it was imported from
            model.hf_model_type = hf_model_type(directory)
        return model

    def export_hf(self) -> None:
        """--export-hf: the model as a Hugging Face directory (collective), with the
        tokenizer files of --init-from-hf's directory, if it has any."""
        args = self.args
        if not args.export_hf:
            return
        save_hf(self.model, args.export_hf)
        copied = copy_tokenizer_files(args.init_from_hf, args.export_hf) \
            if args.init_from_hf and self.ps.rank == 0 else []
        self.say(f"exported the model to {args.export_hf} (Hugging Face format"
                 + (f"; tokenizer files from {args.init_from_hf}" if copied else "") + ")",
                 flush=True)

    def describe(self, start_step: int, resume_from: str | None) -> str:
        """The run's one-line description, printed before the first step."""
        args, ps = self.args, self.ps
        count = sum(p.numel() for p in self.model.parameters())  # this rank's share
        size = (f"{self.plan.cfg.num_params() / 1e6:.2f}M params" if self.plan.cfg else
                f"{count / 1e6:.2f}M params on rank {ps.rank}")
        name = type(self.model).__name__ if self.model_provider else self.plan.model_name
        return (f"megalite: {name} ({size}) on "
                f"{ps.world_size} {ps.device.type} processes: tp={ps.tp} pp={ps.pp} dp={ps.dp}"
                + (f" cp={ps.cp} ({args.cp_comm})" if ps.cp > 1 else "")
                + (f" ep={args.ep}" if args.ep > 1 else "") + ", "
                f"{self.plan.num_microbatches} microbatches of {args.micro_batch_size} x "
                f"{args.seq_len}, {self.schedule_name}, {args.dtype}"
                + (" autocast" if self.autocast != "fp32" else
                   " parameters" if args.dtype != "fp32" else "")
                + (", distributed optimizer" if args.distributed_optimizer else "")
                + (", FSDP" if getattr(args, "fsdp", False) else "")
                + (f", recompute {args.recompute}" if args.recompute != "none" else "")
                + (f" (first {args.recompute_layers} layers of each stage)"
                   if args.recompute_layers else "")
                + f"; steps {start_step + 1}..{args.steps}"
                + (f" (resumed from {resume_from})" if resume_from else ""))

    # ------------------------------------------------------------------ the loop
    def train(self, start_step: int) -> int:
        args, ps, model, say = self.args, self.ps, self.model, self.say
        tokens_per_step = args.global_batch_size * args.seq_len
        flops_per_token = getattr(model, "flops_per_token", lambda seq_len: None)(args.seq_len)
        peak = peak_flops(ps.device, args.dtype) if flops_per_token else None
        # Saved with every checkpoint: generate.py finds the tokenizer here.
        extra = {"args": vars(args), "tokenizer": self.dataset.meta.get("tokenizer")}
        # From here on SIGTERM/SIGINT stop the run after a step, with a checkpoint (before,
        # with nothing to save, they end the process as usual).
        signals = StopSignals().install()
        stopper = Stopper(signals, max_time_min=args.max_time, exit_after=args.exit_after,
                          max_skipped=args.max_skipped_steps, start_time=self.started,
                          device=ps.device)
        watchdog = StepWatchdog(ps.rank, ps.world_size, args.step_timeout,
                                startup_s=args.comm_timeout, comm_timeout_s=args.comm_timeout)
        if args.step_timeout != 0:
            watchdog.start()
        result, stop, saved, profiled = None, None, None, None
        for step in range(start_step + 1, args.steps + 1):
            watchdog.step_started(step)
            inject.at_step_start(step, ps.rank)  # test-only faults (MEGALITE_FAULT)
            tokens, targets = get_batch(self.dataset, self.sampler.next_batch_indices())
            tokens, targets = tokens.to(ps.device), targets.to(ps.device)
            if ps.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]

            def run_step():
                return train_step(model, self.optimizer, tokens, targets,
                                  micro_batch_size=args.micro_batch_size,
                                  schedule=self.plan.schedule, max_grad_norm=args.clip_grad,
                                  grad_scaler=self.scaler, dtype=self.autocast,
                                  overlap_grad_reduce=not args.no_overlap_grad_reduce,
                                  verbose=args.verbose_p2p,
                                  trace=bool(args.trace) and step == args.steps,
                                  loss_fn=inject.poison_loss(model.loss, step, ps.rank))
            if args.profile and step == args.steps:
                result, profiled = profiling.profile_step(
                    run_step, args.profile, ps.device, f"trace_rank{ps.rank}.json")
            else:
                result = run_step()
            # As in Megatron, a skipped step (fp16 overflow, non-finite loss) consumed its
            # batch but does not advance the learning-rate schedule: the schedule counts
            # updates, so the run's lrs do not depend on how many steps were skipped.
            if not result.skipped:
                self.scheduler.step()
            if ps.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                   "tokens_per_sec": tokens_per_step / dt, "step_time_s": dt}
            if peak:
                row["mfu"] = flops_per_token * tokens_per_step / dt / (peak * ps.world_size)
            row["peak_mem_gb"] = peak_memory_gb(ps.device)
            row.update(result.moe)  # MoE: aux_loss, z_loss, expert_load per layer
            if result.skipped:
                row["skipped"] = True
                row["skip_reason"] = "non-finite loss or grad norm" if result.nonfinite else \
                    "fp16 overflow"
            if evaluation_due(args, step):
                with watchdog.paused():
                    row.update(validation_metrics(model, self.data, args, self.plan.schedule))
                    if fsdp.is_fsdp(model):  # the forward left the root group gathered
                        fsdp.reshard(model)
                say(f"validation at step {step}: loss {row['val_loss']:.4f}, perplexity "
                    f"{row['val_ppl']:.2f}", flush=True)
            self.logger.log(row)
            stop = stopper.after_step(result.nonfinite, dt)  # collective: all ranks agree
            watchdog.step_finished(dt)
            if args.save and (stop or step == args.steps
                              or (args.save_every and step % args.save_every == 0)):
                with watchdog.paused():
                    saved = save_checkpoint(args.save, step, model, self.optimizer,
                                            self.scheduler, self.sampler, self.scaler,
                                            extra=extra, keep_last=args.keep_last)
            if stop:
                break
        watchdog.close()
        if stop and step == args.steps:
            stop = None  # the run was complete anyway
        if args.trace and result is not None and stop is None:
            write_timeline(args.trace, result.spans, ps, self.schedule_name)
        say(self.logger.summary() + (f"; checkpoint {saved}" if saved else ""), flush=True)
        if args.profile and profiled is not None:
            rows, total = profiling.breakdown(profiled, ps.device.type)
            copies = profiling.count_calls(profiled)
            say(f"profile of step {args.steps} on rank 0 (traces in {args.profile}/):\n"
                + profiling.format_table(rows, total, ps.device.type) + "\ncopy calls: "
                + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in copies.items()),
                flush=True)
        if self.predicted and self.logger.history:
            say(measured_vs_planned(self.logger.history, self.predicted[1], ps), flush=True)
        if stop:  # the last line: what stopped the run and what to do next
            line = f"{stop.message} after step {step}; " + (
                "nothing saved (no --save)" if not saved else f"saved {saved}; {stop.advice}")
            say(line, flush=True)
            if stop.exit_code:
                write_launcher_error_file(f"rank {ps.rank}: {line}")
        elif args.export_hf:
            self.export_hf()
        parallel.destroy()
        signals.uninstall()
        return stop.exit_code if stop else 0


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
