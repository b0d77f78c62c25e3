"""Pretrain a GPT with tensor, pipeline and data parallelism: the same command line as
``python -m megalite.train`` and ``megalite-train`` (the trainer in megalite.training).

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
from megalite.train import main
from megalite.training.cli import check_args, check_batch_sizes, parse_args  # noqa: F401
from megalite.training.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
