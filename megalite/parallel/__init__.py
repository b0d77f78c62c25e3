"""Process groups, communication ops with autograd, and tensor-parallel layers."""
from megalite.parallel.state import (ParallelState, initialize, get_state, destroy,
                                     group_ranks, global_rank, check_layout)
from megalite.parallel.comm import (copy_to_tp_region, reduce_from_tp_region,
                                    scatter_to_tp_region, gather_from_tp_region,
                                    scatter_to_sequence_parallel_region,
                                    gather_from_sequence_parallel_region,
                                    reduce_scatter_to_sequence_parallel_region, count_comm)
from megalite.parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, padded_vocab_size)
from megalite.parallel.cross_entropy import (vocab_parallel_cross_entropy,
                                            vocab_parallel_linear_cross_entropy)
from megalite.parallel.random import RNGTracker, get_rng_tracker, model_parallel_seed
from megalite.parallel import grads, sharding
from megalite.parallel.grads import clip_grad_norm_
from megalite.parallel.grad_buffer import GradBuffer
from megalite.parallel.main_grads import MainGrads
from megalite.parallel.param_meta import (ParamMeta, meta_by_name, param_meta, set_param_meta,
                                          share_meta)
from megalite.parallel.distributed_optimizer import DistributedOptimizer, MainParamOptimizer

__all__ = [
    "ParallelState", "initialize", "get_state", "destroy", "group_ranks", "global_rank",
    "check_layout",
    "copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region",
    "gather_from_tp_region", "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region", "reduce_scatter_to_sequence_parallel_region",
    "count_comm", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "padded_vocab_size", "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "RNGTracker", "get_rng_tracker", "model_parallel_seed", "grads", "sharding",
    "clip_grad_norm_", "GradBuffer", "MainGrads", "DistributedOptimizer",
    "MainParamOptimizer", "ParamMeta", "param_meta", "set_param_meta", "share_meta",
    "meta_by_name",
]
