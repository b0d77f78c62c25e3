"""The checks the pretraining flags alone decide, run before any process group, model or data.

``check_args`` takes the flags :func:`megalite.training.cli.parse_args` read and the world
size, and returns the :class:`RunPlan` (dp, microbatches, the GPT config, the pipeline
table), or raises :class:`~megalite.training.errors.UsageError` (one line, exit code 2)
naming the flag and the fix. The ``check_*`` helpers are one concern each (layout, schedule,
model, MoE, context parallelism, FSDP, precision, memory); ``megalite.training.cli``
re-exports them under their old names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megalite import plan
from megalite.kernels import HAS_TRITON, interpreting
from megalite.models import GPTConfig, gpt_config_from_hf
from megalite.parallel import check_layout
from megalite.parallel.context import check_context_parallel
from megalite.parallel.state import cuda_selected
from megalite.pipeline import build_schedule, layers_per_stage, load_schedule, rank_stages
from megalite.training.checkpoint_dir import list_checkpoints
from megalite.training.errors import UsageError
from megalite.training import layout_auto
from megalite.training.fault import check_timeouts
from megalite.training.run_data import open_run_data
from megalite.training.step import check_placement


@dataclass
class RunPlan:
    """What the flags decide before anything starts (``check_args``)."""
    dp: int                         # data-parallel size: world // (tp * pp)
    num_microbatches: int           # per step and dp rank
    cfg: GPTConfig | None           # the GPT to train (None: the caller brings its model)
    schedule: dict[int, list[str]]  # the pipeline table every pipeline rank runs
    model_name: str = "model"       # for the log: the preset, or the HF directory


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


def schedule_note(args, run_plan: RunPlan) -> str | None:
    """What a schedule of several stages per rank does in a single pipeline rank."""
    stages = sum(map(len, rank_stages(run_plan.schedule).values()))
    if args.pp > 1 or stages == 1:
        return None
    name = args.schedule_file or args.schedule
    return (f"note: {name} at --pp 1 runs the model as {stages} stages, one after the other "
            f"in each process: the losses of 1f1b, and no pipeline overlap to gain (that "
            f"needs --pp >= 2)")


def params_dtype(args) -> str:
    """The parameters' dtype of a run: --dtype, or fp32 under --autocast and under --fsdp
    (FSDP keeps fp32 shards and gathers --dtype copies of them itself)."""
    if getattr(args, "autocast", False) or getattr(args, "fsdp", False):
        return "fp32"
    return args.dtype


def autocast_dtype(args) -> str:
    """The dtype train_step autocasts to: --dtype under --autocast, and under --fsdp (whose
    blocks compute with --dtype copies of fp32 shards: the pipeline's stages take fp32
    inputs, so the matmuls between them autocast); else none ("fp32")."""
    if getattr(args, "autocast", False) or getattr(args, "fsdp", False):
        return args.dtype
    return "fp32"


def check_precision(args) -> None:
    if getattr(args, "autocast", False) and args.dtype == "fp32":
        raise UsageError("--autocast needs --dtype bf16 or fp16 (the dtype to autocast to); "
                         "drop --autocast for fp32")


def check_args(args, world_size: int, gpt: bool = True) -> RunPlan:
    """Every check the flags alone decide, run before any process group, model or data is
    built: a mistake raises UsageError naming the flag and the fix. ``gpt=False``: the
    caller trains its own model (the GPT's flags are refused, its checks skipped)."""
    if args.layout == "auto":
        if not gpt:
            raise UsageError("--layout auto plans megalite's GPT; give your model's --tp/--pp")
        try:
            base = gpt_config_from_hf(hf_config_path(args.init_from_hf)) \
                if args.init_from_hf else GPTConfig.preset(args.model or "tiny")
            choice = layout_auto.choose_for_run(args, world_size, memory_budget(args), base)
        except ValueError as e:
            raise UsageError(f"--layout auto: {e}") from None
        layout_auto.apply(args, choice)
        if os.environ.get("RANK", "0") == "0":
            print(f"--layout auto: {choice.why}; running {' '.join(choice.flags)}", flush=True)
    check_precision(args)
    try:  # cp ranks share one dp rank's batch: dp = world // (tp * pp * cp)
        dp = check_layout(args.tp, args.pp, None, world_size, cp=args.cp)
    except ValueError as e:
        raise UsageError(str(e)) from None
    num_microbatches = check_batch_sizes(args, dp)
    try:
        check_timeouts(args.step_timeout, args.comm_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        table = pipeline_table(args, num_microbatches)
    except ValueError as e:
        flag = "--schedule-file" if args.schedule_file else "--schedule/--virtual-stages"
        raise UsageError(f"{flag}: {e}") from None
    num_stages = sum(map(len, rank_stages(table).values()))
    check_fsdp(args, world_size)  # after --layout auto, which may choose --fsdp
    cfg = check_model(args, num_stages) if gpt else refuse_gpt_flags(args)
    check_context_model(args, cfg)
    if cfg is not None:
        cfg = check_moe(args, cfg, world_size)
    elif args.ep > 1 and (world_size // args.pp) % args.ep:
        raise UsageError(f"--ep {args.ep} must divide the {world_size // args.pp} ranks of a "
                         f"pipeline stage (tp x cp x dp = world / pp); choose a divisor")
    if args.sequence_parallel and (args.seq_len // args.cp) % args.tp:
        held = (f"the --seq-len {args.seq_len} / --cp {args.cp} = {args.seq_len // args.cp} "
                f"tokens a cp rank holds" if args.cp > 1 else f"--seq-len {args.seq_len}")
        raise UsageError(f"--sequence-parallel splits the sequence over tp ranks: {held} must "
                         f"be divisible by --tp {args.tp}")
    if args.kernels == "triton":
        if not HAS_TRITON:
            raise UsageError("--kernels triton needs the triton package: pip install "
                             "'megalite[triton]', or use --kernels auto")
        if not (cuda_selected() or interpreting()):
            raise UsageError("--kernels triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run "
                             "the kernels in Triton's (slow) CPU interpreter; or use "
                             "--kernels auto")
    try:
        train = open_run_data(args).train
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    if cfg is not None:
        check_vocabulary(args, train.meta, cfg)
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
    if cfg is not None:
        check_memory(args, dp, cfg, world_size)
    return RunPlan(dp, num_microbatches, cfg, table,
                   model_name=(args.init_from_hf or args.model or "tiny") if gpt else "model")


def check_fsdp(args, world_size: int) -> None:
    """--fsdp's combinations, refused before any process group."""
    if not getattr(args, "fsdp", False):
        return
    if world_size == 1:
        raise UsageError("--fsdp shards over processes and this is one: launch several "
                         "with torchrun --nproc-per-node N, or drop --fsdp")
    for name in ("cp", "ep"):  # FSDP shards over dp only so far
        if getattr(args, name, 1) > 1:
            raise UsageError(f"--fsdp with --{name} {getattr(args, name)} is not supported "
                             f"yet: run --fsdp with --{name} 1, or drop --fsdp")
    if args.distributed_optimizer:
        raise UsageError("--fsdp shards the optimizer state already: drop "
                         "--distributed-optimizer")
    if args.dtype == "fp16":
        raise UsageError("--fsdp runs --dtype fp32 or bf16 (FSDP's bf16 parameters with fp32 "
                         "reduction), not fp16: use --dtype bf16")


def check_model(args, num_stages: int) -> GPTConfig:
    """The GPT the flags describe (--model's preset, or --init-from-hf's config.json) and the
    checks that need it."""
    if args.init_from_hf and args.model:
        raise UsageError(f"--model {args.model} and --init-from-hf {args.init_from_hf} both "
                         f"choose the model: drop --model (the architecture is the HF "
                         f"directory's config.json)")
    name = args.model or "tiny"
    if args.recompute_layers is not None and args.recompute != "full":
        raise UsageError(f"--recompute-layers {args.recompute_layers} applies to full "
                         f"recompute: add --recompute full (it is {args.recompute}), or drop "
                         f"--recompute-layers")
    free = dict(sequence_parallel=args.sequence_parallel, kernels=args.kernels,
                dropout=args.dropout, cp_comm=args.cp_comm)
    try:
        if args.init_from_hf:
            name = args.init_from_hf
            cfg = gpt_config_from_hf(hf_config_path(args.init_from_hf), **free)
        else:
            cfg = GPTConfig.preset(name, **free)
        counts = layers_per_stage(cfg.n_layers, num_stages, cfg.layers_per_stage)
    except (OSError, ValueError) as e:
        flag = "--init-from-hf" if args.init_from_hf else "--model"
        raise UsageError(f"{flag} {name}: {e}") from None
    if args.recompute_layers is not None and args.recompute_layers > min(counts):
        raise UsageError(f"--recompute-layers {args.recompute_layers} exceeds the layers of a "
                         f"stage: {name}'s {cfg.n_layers} layers over {num_stages} "
                         f"stages are {counts} per stage; use --recompute-layers <= "
                         f"{min(counts)}, or drop it to recompute every layer")
    cfg = cfg.replace(recompute=args.recompute, recompute_layers=args.recompute_layers,
                      params_dtype=params_dtype(args))
    what = "the HF model" if args.init_from_hf else f"the {name} preset"
    if cfg.n_heads % args.tp or cfg.n_kv_heads % args.tp:
        raise UsageError(f"--tp {args.tp} must divide {what}'s n_heads "
                         f"{cfg.n_heads} and n_kv_heads {cfg.n_kv_heads}; lower --tp")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds {what}'s "
                         f"max_seq_len {cfg.max_seq_len}")
    return cfg


def check_context_model(args, cfg) -> None:
    """--seq-len must cut into 2*cp chunks; all-to-all needs the heads divisible by cp."""
    if args.cp == 1:
        return
    heads = (cfg.n_heads, cfg.n_kv_heads) if cfg is not None else (None, None)
    try:
        check_context_parallel(args.seq_len, args.cp, args.cp_comm, *heads, tp=args.tp)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_moe(args, cfg: GPTConfig, world_size: int) -> GPTConfig:
    """--ep and the MoE loss coefficients against the model and the layout (before any
    process group); returns the config with the coefficients applied."""
    stage_ranks = world_size // args.pp
    if args.ep > 1 and stage_ranks % args.ep:
        raise UsageError(f"--ep {args.ep} must divide the {stage_ranks} ranks of a pipeline "
                         f"stage (tp x cp x dp = world / pp); choose a divisor of {stage_ranks}")
    if args.ep > 1 and not cfg.moe_num_experts:
        raise UsageError(f"--ep {args.ep} splits the experts of an MoE model, and this model "
                         f"is dense; drop --ep or train an MoE (e.g. --model tiny-moe)")
    if cfg.moe_layers and getattr(args, "fsdp", False):
        raise UsageError("--fsdp does not shard MoE experts yet (they reduce over the "
                         "expert-data-parallel ranks): drop --fsdp and use "
                         "--distributed-optimizer")
    if cfg.moe_layers and args.cp > 1:
        raise UsageError(f"--cp {args.cp}: MoE layers do not run with context parallelism yet; "
                         f"train this model with --cp 1 (use --tp/--sequence-parallel for long "
                         f"sequences)")
    if cfg.moe_num_experts % args.ep:
        raise UsageError(f"--ep {args.ep} must divide the model's {cfg.moe_num_experts} "
                         f"experts; choose a divisor of {cfg.moe_num_experts}")
    if cfg.moe_layers and args.tp > 1 and not args.sequence_parallel and args.seq_len % args.tp:
        raise UsageError(f"MoE layers split the sequence over the tp ranks: --seq-len "
                         f"{args.seq_len} must be divisible by --tp {args.tp}")
    changes = {k: v for k, v in (("moe_aux_loss_coeff", args.moe_aux_loss_coeff),
                                 ("moe_z_loss_coeff", args.moe_z_loss_coeff)) if v is not None}
    if changes and not cfg.moe_num_experts:
        raise UsageError("--moe-aux-loss-coeff/--moe-z-loss-coeff apply to MoE models; this "
                         "model is dense: drop them")
    return cfg.replace(**changes) if changes else cfg


def refuse_gpt_flags(args) -> None:
    """A model of the caller's own: the flags that build or export a GPT do not apply."""
    given = [flag for flag, is_set in (
        ("--model", args.model), ("--init-from-hf", args.init_from_hf),
        ("--export-hf", args.export_hf), ("--recompute", args.recompute != "none"),
        ("--recompute-layers", args.recompute_layers), ("--kernels", args.kernels != "auto"),
        ("--dropout", args.dropout), ("--check-memory", args.check_memory),
        # a model that knows nothing of cp would attend only to its own chunks
        ("--cp", args.cp > 1), ("--cp-comm", args.cp_comm != "ring")) if is_set]
    if given:
        raise UsageError(f"{', '.join(given)}: these flags build the trainer's GPT, and this "
                         f"run trains a model of its own; drop them")


def hf_config_path(directory: str) -> str:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError("no config.json there; give a directory written by save_pretrained")
    return path


def check_vocabulary(args, meta: dict, cfg: GPTConfig) -> None:
    """The data's tokens must be ids of the model's vocabulary; with --init-from-hf, a data
    set tokenized by a Hugging Face tokenizer must have used the model's tokenizer."""
    model = f"--init-from-hf {args.init_from_hf}" if args.init_from_hf else \
        f"the {args.model or 'tiny'} model"
    if int(meta["vocab_size"]) > cfg.vocab_size:
        raise UsageError(f"the data's tokenizer has {meta['vocab_size']} tokens but "
                         f"{model} only {cfg.vocab_size}: pick a matching "
                         f"{'--init-from-hf' if args.init_from_hf else '--model'} or --data")
    spec = str(meta.get("tokenizer") or "")
    if args.init_from_hf and spec.startswith("hf:"):
        if not same_tokenizer(spec[3:], args.init_from_hf):
            raise UsageError(f"--data was tokenized with {spec}, whose tokenizer.json differs "
                             f"from --init-from-hf {args.init_from_hf}'s: preprocess it with "
                             f"--tokenizer hf:{args.init_from_hf}")


def same_tokenizer(tokenizer: str, model_dir: str) -> bool:
    """False when both name a tokenizer.json and the files differ (the same directory, or
    one without a tokenizer.json, cannot be told apart: True)."""
    def file(path):
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        return path if os.path.isfile(path) else None
    a, b = file(tokenizer), file(model_dir)
    if a is None or b is None or os.path.samefile(a, b):
        return True
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def planned_layout(args, dp: int, cfg) -> plan.Layout | None:
    """The planner's view of this run (None for a --schedule-file table, which it does not
    model). The fused loss has no flag: it is ``cfg.fused_loss`` (on by default)."""
    if args.schedule_file:
        return None
    triton = cuda_selected() and args.kernels != "torch"
    return plan.Layout(
        tp=args.tp, pp=args.pp, dp=dp, micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len, global_batch_size=args.global_batch_size,
        schedule=args.schedule, virtual_stages=args.virtual_stages,
        sequence_parallel=args.sequence_parallel and args.tp > 1, dtype=args.dtype,
        recompute=args.recompute, recompute_layers=args.recompute_layers,
        distributed_optimizer=args.distributed_optimizer,
        overlap_grad_reduce=not args.no_overlap_grad_reduce,
        kernels="triton" if triton else "torch", fused_loss=cfg.fused_loss,
        **layout_auto.plan_extras(args))



def memory_budget(args) -> float | None:
    """--gpu-memory, else the GPU's memory (queried without allocating), else None."""
    if args.gpu_memory:
        try:
            return plan.parse_bytes(args.gpu_memory)
        except ValueError:
            raise UsageError(f"--gpu-memory {args.gpu_memory}: give a size such as 80GB or "
                             f"75GiB") from None
    if cuda_selected():
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
    if reason and args.init_from_hf:  # the planner's command line plans presets only
        raise UsageError(f"--check-memory: {layout.describe()} {reason}; --layout auto "
                         f"picks a layout that fits, if one does")
    if reason:
        raise UsageError(f"--check-memory: {layout.describe()} {reason}; python -m "
                         f"megalite.plan --model {args.model or 'tiny'} --gpus {world_size} "
                         f"--gpu-memory {budget / 2**30:.1f}GiB --seq-len {args.seq_len} "
                         f"--global-batch-size {args.global_batch_size} --dtype {args.dtype}"
                         f"{' --autocast' if layout.autocast else ''} lists layouts that fit")
