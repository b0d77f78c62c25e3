"""The pretraining command line: every flag, and where their checks live.

``parse_args`` reads the flags (first from ``--config FILE.toml``, whose keys are the flag
names, then from the command line, which overrides them); ``check_args``
(:mod:`megalite.training.cli_checks`, re-exported here) runs before any process group, model
or data is built and raises :class:`~megalite.training.errors.UsageError` (one line, exit
code 2) naming the flag and the fix. :mod:`megalite.training.trainer` runs what they
describe; ``python -m megalite.train``, the ``megalite-train`` script and
``examples/pretrain_gpt.py`` are this one command line.
"""
from __future__ import annotations

import argparse
import math
import sys

from megalite.pipeline import SCHEDULE_NAMES
from megalite.training.cli_checks import (  # noqa: F401  (re-exported: the names callers import)
    RunPlan, autocast_dtype, check_args, check_batch_sizes, check_context_model, check_fsdp,
    check_memory, check_model, check_moe, check_precision, check_vocabulary, hf_config_path,
    memory_budget, params_dtype, pipeline_table, planned_layout, refuse_gpt_flags,
    same_tokenizer, schedule_note)
from megalite.training.config_file import config_file_argv
from megalite.training.errors import UsageError
from megalite.training import layout_auto

DESCRIPTION = "Pretrain a GPT with tensor, pipeline and data parallelism."


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
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} "
                                             f"{low:g}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _fraction(high_open: bool):
    """A number in [0, 1), or [0, 1] when not ``high_open``."""
    def parse(text: str) -> float:
        value = float(text)
        if not (0 <= value < 1 if high_open else 0 <= value <= 1):  # also refuses nan
            bracket = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be a number in [0, 1{bracket}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block on every rank; say the mistake in one line, once."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --layout auto's conflict check must see every layout flag by name.
    p = _Parser(description=DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read flags from a TOML file: keys are the flag names (seq-len or "
                        "seq_len), the command line overrides them (docs/training.md)")
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
    layout.add_argument("--layout", choices=["auto"], default=None,
                        help="auto: the planner picks tp, pp, schedule, virtual stages, "
                             "micro-batch, recompute and the distributed optimizer that fit "
                             "--gpu-memory fastest (docs/training.md)")
    ctx = p.add_argument_group("context parallelism (docs/context_parallel.md)")
    ctx.add_argument("--cp", type=POSITIVE, default=1,
                     help="context-parallel size: each sequence is split over cp ranks "
                          "(load-balanced chunks; attention over the whole sequence)")
    ctx.add_argument("--cp-comm", choices=["ring", "all-to-all"], default="ring",
                     help="ring: K/V travel around the cp ranks (any head count); "
                          "all-to-all: re-shard sequence <-> heads (heads divisible by cp)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="GPTConfig preset (default: tiny); not with --init-from-hf")
    model.add_argument("--init-from-hf", default=None, metavar="DIR",
                       help="start from a Hugging Face save_pretrained directory (Llama, Qwen, "
                            "Mistral, GPT-2): its config.json is the model, its weights "
                            "the start")
    model.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto")
    model.add_argument("--dropout", type=_fraction(high_open=True), default=0.0)
    model.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                       help="activation recomputation (docs/memory.md): full keeps only each "
                            "layer's input; selective recomputes norms, attention core and "
                            "the MLP activation")
    model.add_argument("--recompute-layers", type=POSITIVE, default=None, metavar="N",
                       help="with --recompute full: only the first N layers of each stage "
                            "(default: all)")
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", default=None, metavar="PREFIX | W PREFIX",
                      help="token file prefix (python -m megalite.training.preprocess), or "
                           "WEIGHT PREFIX pairs to blend several (docs/data.md); default: the "
                           "bundled corpus")
    data.add_argument("--seq-len", type=POSITIVE, default=128)
    data.add_argument("--micro-batch-size", type=POSITIVE, default=2)
    data.add_argument("--global-batch-size", type=POSITIVE, default=16)
    val = p.add_argument_group("validation (docs/training.md)")
    val.add_argument("--eval-interval", type=NON_NEGATIVE, default=None, metavar="N",
                     help="validation loss every N steps and at the end (0: only at the end)")
    val.add_argument("--eval-iters", type=POSITIVE, default=10, metavar="K",
                     help="global batches per evaluation (the same ones every time)")
    val.add_argument("--eval-split", type=_float_at_least(0), default=0.0, metavar="FRACTION",
                     help="hold out the last FRACTION of each --data dataset's samples for "
                          "validation (training never reads them)")
    val.add_argument("--eval-data", nargs="+", default=None, metavar="PREFIX | W PREFIX",
                     help="validate on these token files instead (same syntax as --data)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=POSITIVE, default=100, help="train until this optimizer step")
    opt.add_argument("--lr", type=_float_at_least(0), default=3e-3, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=_fraction(high_open=False), default=0.1,
                     help="the decay ends at --lr x this")
    opt.add_argument("--warmup", type=NON_NEGATIVE, default=None,
                     help="default: 5%% of --steps, at least 10 steps, at most half the run")
    opt.add_argument("--decay", choices=["cosine", "linear", "constant"], default="cosine")
    opt.add_argument("--weight-decay", type=_float_at_least(0), default=0.1)
    opt.add_argument("--clip-grad", type=_float_at_least(0), default=1.0,
                     help="0 disables clipping")
    opt.add_argument("--distributed-optimizer", action="store_true",
                     help="shard the AdamW state over the dp group (ZeRO-1, docs/memory.md)")
    # FSDP (H2): torch's fully_shard per block over the dp group (docs/fsdp.md)
    opt.add_argument("--fsdp", action="store_true",
                     help="shard parameters, gradients and AdamW state over the dp group "
                          "with torch's FSDP2, one group per transformer block (docs/fsdp.md)")
    opt.add_argument("--no-overlap-grad-reduce", action="store_true",
                     help="reduce gradients over dp after the whole backward instead of "
                          "bucket by bucket during the last microbatch's")
    # --- precision (H1, docs/precision.md) ---
    opt.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                     help="bf16/fp16: 16-bit weights, activations and pipeline transfers with "
                          "fp32 main weights and gradients (Megatron's --bf16)")
    opt.add_argument("--autocast", action="store_true",
                     help="with --dtype bf16/fp16: keep fp32 weights and run the matmuls under "
                          "torch.autocast instead (the earlier mode)")
    opt.add_argument("--tf32", action="store_true",
                     help="fp32 matmuls on TF32 tensor cores (GPU; fp32 MFU assumes it)")
    opt.add_argument("--seed", type=int, default=1234)
    out = p.add_argument_group("output")
    out.add_argument("--metrics-out", default=None, help="JSONL file, one object per step")
    out.add_argument("--log-interval", type=POSITIVE, default=10, metavar="STEPS",
                     help="print a progress line every STEPS steps (--metrics-out has them all)")
    out.add_argument("--tensorboard", default=None, help="TensorBoard log directory")
    out.add_argument("--export-hf", default=None, metavar="DIR",
                     help="write the trained model as a Hugging Face directory when the run "
                          "reaches --steps")
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
    moe = p.add_argument_group("mixture of experts (docs/moe.md)")
    moe.add_argument("--ep", type=POSITIVE, default=1,
                     help="expert-parallel size: experts split over this many of a stage's "
                          "tp x cp x dp ranks")
    moe.add_argument("--moe-aux-loss-coeff", type=_float_at_least(0), default=None,
                     metavar="C", help="load-balancing loss coefficient (default: the model's)")
    moe.add_argument("--moe-z-loss-coeff", type=_float_at_least(0), default=None,
                     metavar="C", help="router z-loss coefficient (default: the model's)")
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
                          "--comm-timeout for the first steps, then max(60, 10 x median); "
                          "always at most --comm-timeout - 10 s)")
    return p


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    """The flags of ``argv`` (default: sys.argv[1:]) over those of its ``--config`` file,
    over ``defaults`` ({flag dest: value}, a program's own defaults), over the parser's."""
    parser = build_parser()
    if defaults:
        unknown = set(defaults) - {a.dest for a in parser._actions}
        if unknown:
            raise ValueError(f"defaults for unknown flags: {sorted(unknown)}")
        parser.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=None)
    path = config.parse_known_args(argv)[0].config
    argv = (config_file_argv(path, parser) if path else []) + argv
    args = parser.parse_args(argv)
    chosen = layout_auto.conflicting_flags(argv)
    if args.layout == "auto" and chosen:
        raise UsageError(f"--layout auto chooses {', '.join(chosen)}: drop {' '.join(chosen)}, "
                         f"or drop --layout auto")
    return args


def default_warmup(steps: int) -> int:
    """5% of the run, but at least 10 steps (a 1-step warmup at full lr can blow a large
    model up on its first updates), and never more than half of a short run."""
    return min(max(10, steps // 20), max(1, steps // 2))
