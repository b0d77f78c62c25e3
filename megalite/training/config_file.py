"""``--config FILE.toml``: flags from a TOML file, and the effective flags of a run written
back as one.

Keys are the flag names without the dashes, in either spelling (``seq-len`` or ``seq_len``).
The file becomes command-line words placed before the real ones, so every value is parsed
and checked exactly as on the command line, and the command line overrides the file.
"""
from __future__ import annotations

import argparse
import json
import os

from megalite.parallel.comm import agree
from megalite.training.errors import UsageError


def config_file_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A TOML file of flags as command-line words, so that each value goes through the same
    parsing and checks as on the command line (which, coming after, overrides it)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError(f"--config {path}: reading TOML needs Python >= 3.11 (tomllib) "
                             f"or pip install tomli") from None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    keys = {key: key.replace("-", "_") for key in table}
    unknown = [key for key, dest in keys.items() if dest not in actions or dest == "config"]
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {', '.join(unknown)}: keys are flag "
                         f"names without the dashes, e.g. seq-len or seq_len (see --help)")
    words = []
    for key, value in table.items():
        action = actions[keys[key]]
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} is a switch: true or false")
            words += [flag] if value else []
        elif isinstance(value, list):
            if action.nargs not in ("+", "*") and not (isinstance(action.nargs, int)
                                                      and action.nargs > 1):
                raise UsageError(f"--config {path}: {key} = {value!r}: {flag} takes one value")
            words += [flag, *map(str, value)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            words += [flag, str(value)]
        else:
            raise UsageError(f"--config {path}: {key} = {value!r} is not a value {flag} takes")
    return words


# Flags that act once, at the launch that gives them, and would do harm on a rerun of the
# file (--no-resume deletes --save's checkpoints; --exit-after stops the rerun early), and
# --layout, whose choice the file records as the layout flags it picked.
NOT_RECORDED = {"config", "no_resume", "exit_after", "layout"}


def effective_config(args) -> str:
    """The run's flags as a TOML file that ``--config`` reads back (unset flags and the
    one-launch flags of ``NOT_RECORDED`` left out)."""
    lines = ["# The effective flags of this run: megalite-train --config THIS_FILE reruns it."]
    for key, value in sorted(vars(args).items()):
        if value is None or value is False or key in NOT_RECORDED:
            continue
        lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def write_effective_config(args, ps) -> None:
    """The run's flags as TOML (``--config`` reads it back) next to its checkpoints and its
    metrics: SAVE/config.toml and METRICS_STEM.config.toml (one file when both are in
    the --save directory). Rank 0 writes; collective, so that an unwritable --save stops
    every rank before the first step rather than at the first save."""
    paths = [os.path.join(args.save, "config.toml")] if args.save else []
    if args.metrics_out and not (args.save and os.path.abspath(args.save) ==
                                 os.path.abspath(os.path.dirname(args.metrics_out))):
        paths.append(os.path.splitext(args.metrics_out)[0] + ".config.toml")
    error = None
    if ps.rank == 0:
        try:
            text = effective_config(args)
            for path in paths:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
        except OSError as e:
            error = e
    agree(error, "writing the effective configuration")
