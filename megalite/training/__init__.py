"""Training: the 3D step, optimizer, mixed precision, data, checkpoints, metrics."""
from megalite.training.data import (ShardedSampler, TokenDataset, default_corpus_path, get_batch,
                                    read_metadata)
from megalite.training.optim import build_optimizer, build_scheduler, param_groups
from megalite.training.precision import DynamicLossScaler, autocast
from megalite.training.step import StepResult, forward_backward, train_step
from megalite.training.tokenizer import get_tokenizer

__all__ = ["ShardedSampler", "TokenDataset", "default_corpus_path", "get_batch",
           "read_metadata", "build_optimizer", "build_scheduler", "param_groups",
           "DynamicLossScaler", "autocast", "StepResult", "forward_backward", "train_step",
           "get_tokenizer"]
