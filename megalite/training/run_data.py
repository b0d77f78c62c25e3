"""The data a pretraining run's flags name: ``--data`` (one prefix or a weighted blend),
``--eval-split`` / ``--eval-data`` (held-out data), ``--eval-iters`` (how much of it every
evaluation reads), for :mod:`megalite.training.cli_checks` (checks) and the trainer (use).
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.training.data import DataBlend, check_same_tokenizer, open_data
from megalite.training.evaluate import evaluate, perplexity
from megalite.training.sampler import heldout_batches


@dataclass
class RunData:
    train: DataBlend                 # what the sampler draws from
    heldout: DataBlend | None        # what evaluations read (None: no evaluation)
    eval_batches: list | None        # the global batches of indices into heldout


def open_run_data(args) -> RunData:
    """Open and check everything the data flags name; raises ValueError naming the flag."""
    evaluating = args.eval_interval is not None
    if args.eval_data and args.eval_split:
        raise ValueError("give one of --eval-split (hold out part of --data) and --eval-data")
    if (args.eval_data or args.eval_split) and not evaluating:
        raise ValueError(f"{'--eval-data' if args.eval_data else '--eval-split'} needs "
                         "--eval-interval N (0: evaluate only at the end of the run)")
    if evaluating and not (args.eval_data or args.eval_split):
        raise ValueError("--eval-interval needs held-out data: --eval-split 0.05 (the last 5% "
                         "of each --data dataset's samples) or --eval-data PREFIX")
    try:
        train, heldout = open_data(args.data, args.seq_len, args.eval_split)
    except (OSError, ValueError) as e:
        raise type(e)(f"--data: {e}") from None
    if args.eval_data:
        try:
            heldout = open_data(args.eval_data, args.seq_len)[0]
        except (OSError, ValueError) as e:
            raise type(e)(f"--eval-data: {e}") from None
        check_same_tokenizer([train.meta, heldout.meta], [train.names[0], heldout.names[0]])
    for name, samples in zip(train.names, train.sizes):  # the sampler needs a batch of each
        if samples < args.global_batch_size:
            raise ValueError(f"--data {name} has {samples} samples of --seq-len {args.seq_len}"
                             + (" left after --eval-split" if args.eval_split else "")
                             + f", fewer than one --global-batch-size {args.global_batch_size}")
    batches = None
    if evaluating:
        batches = heldout_batches(heldout.sizes, heldout.weights, args.global_batch_size,
                                  args.eval_iters, heldout.names)
    return RunData(train, heldout, batches)


def describe(data: RunData, args) -> str:
    """The data line printed before the first step."""
    line = f"data: {data.train.describe()}"
    if data.eval_batches is not None:
        source = "--eval-data" if args.eval_data else f"the last {args.eval_split:g} of --data"
        line += (f"; validation: {args.eval_iters} batches of {args.global_batch_size} from "
                 f"{source}")
    return line


def evaluation_due(args, step: int) -> bool:
    """Every --eval-interval steps, and at the last step."""
    if args.eval_interval is None:
        return False
    return step == args.steps or (args.eval_interval > 0 and step % args.eval_interval == 0)


def validation_metrics(model, data: RunData, args, schedule) -> dict:
    """{"val_loss", "val_ppl"} on the held-out batches (every rank)."""
    loss = evaluate(model, data.heldout, data.eval_batches,
                    micro_batch_size=args.micro_batch_size, schedule=schedule,
                    dtype=args.dtype if getattr(args, "autocast", False) else "fp32")
    return {"val_loss": loss, "val_ppl": perplexity(loss)}
