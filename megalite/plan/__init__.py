"""The planner: predicted memory and step time of a training layout, and a search over
layouts (``python -m megalite.plan``). Nothing in the library imports it; see
docs/planner.md.

    from megalite.models import GPTConfig
    from megalite.plan import Layout, memory
    m = memory(GPTConfig.preset("llama-7b"), Layout(tp=2, pp=2, dp=2, micro_batch_size=1,
                                                    seq_len=4096, global_batch_size=64))
    print(m.table(), m.worst.total / 1e9, "GB")
"""
from megalite.plan.activations import (embedding_saved_tensors, head_saved_tensors,
                                       layer_bytes_per_token, layer_saved_tensors)
from megalite.plan.layout import Layout, invalid_reason
from megalite.plan.memory import MemoryBreakdown, RankMemory, memory, parse_bytes

__all__ = ["Layout", "invalid_reason", "memory", "MemoryBreakdown", "RankMemory",
           "parse_bytes", "layer_saved_tensors", "layer_bytes_per_token",
           "head_saved_tensors", "embedding_saved_tensors"]
