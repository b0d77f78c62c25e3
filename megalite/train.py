"""``python -m megalite.train`` (also the ``megalite-train`` script): pretrain with tensor,
pipeline and data parallelism. ``--help`` lists the flags; docs/training.md explains them.

    python -m megalite.train --steps 20                      # one process, bundled corpus
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 -m megalite.train --tp 2 --pp 2

Exit codes: 0 done (or a planned stop), 1 a rank failed, 2 bad command line, 3 too many
non-finite steps, 4 a stuck step, 128+N stopped by signal N after saving
(docs/reliability.md).
"""
from __future__ import annotations

import os
import time

from megalite.training.cli import check_args, parse_args
from megalite.training.errors import run_cli
from megalite.training.trainer import Trainer


def main(argv=None) -> int:
    """Parse and check the flags (before any process group), then train; the exit code."""
    started = time.monotonic()
    args = parse_args(argv)
    run_plan = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    return Trainer(args, run_plan, started=started).run()


def cli() -> None:
    """The ``megalite-train`` console script."""
    run_cli(main)


if __name__ == "__main__":
    cli()
