"""Training: the trainer (the loop behind ``megalite-train``), the 3D step, optimizer, mixed
precision, data, checkpoints, metrics, and how a run stops (signals, limits, watchdog,
one-line errors)."""
from megalite.training.checkpoint import (latest_checkpoint, load_checkpoint,
                                          read_checkpoint_meta, save_checkpoint)
from megalite.training.checkpoint_dir import (find_resume_checkpoint, list_checkpoints,
                                              prune_checkpoints, verify_checkpoint)
from megalite.training.errors import RunStopped, UsageError, run_cli
from megalite.training.fault import StepWatchdog, Stopper, StopSignals
from megalite.training.data import (ShardedSampler, TokenDataset, default_corpus_path, get_batch,
                                    read_metadata)
from megalite.training.metrics import MetricsLogger, peak_flops, peak_memory_gb
from megalite.training.optim import build_optimizer, build_scheduler, param_groups
from megalite.training.precision import DynamicLossScaler, autocast
from megalite.training.step import (StepResult, attach_grad_buffer, attach_main_grads,
                                    check_placement, distributed_optimizer, forward_backward,
                                    train_step)
from megalite.training.tokenizer import get_tokenizer
from megalite.training.trainable import TrainableModel, check_trainable
from megalite.training.cli import check_args, parse_args
from megalite.training.trainer import Trainer

__all__ = ["ShardedSampler", "TokenDataset", "default_corpus_path", "get_batch",
           "read_metadata", "build_optimizer", "build_scheduler", "param_groups",
           "DynamicLossScaler", "autocast", "StepResult", "check_placement", "forward_backward",
           "train_step", "attach_grad_buffer", "attach_main_grads", "distributed_optimizer",
           "get_tokenizer", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "read_checkpoint_meta", "MetricsLogger", "peak_flops", "peak_memory_gb",
           "find_resume_checkpoint", "list_checkpoints", "prune_checkpoints",
           "verify_checkpoint", "RunStopped", "UsageError", "run_cli", "StepWatchdog",
           "Stopper", "StopSignals", "TrainableModel", "check_trainable", "check_args",
           "parse_args", "Trainer"]
