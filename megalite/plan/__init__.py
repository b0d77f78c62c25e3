"""The planner: predicted memory and step time of a training layout (tp, cp, pp, dp, ep,
FSDP, 16-bit parameters or autocast), and a search over layouts (``python -m
megalite.plan``). Saved activation bytes come from
:mod:`megalite.models.activation_memory`. Nothing in the library imports it; see
docs/planner.md.

    from megalite.models import GPTConfig
    from megalite.plan import Layout, memory
    m = memory(GPTConfig.preset("llama-7b"), Layout(tp=2, pp=2, dp=2, micro_batch_size=1,
                                                    seq_len=4096, global_batch_size=64))
    print(m.table(), m.worst.total / 2**30, "GiB")
"""
from megalite.plan.layout import Layout, invalid_reason
from megalite.plan.memory import MemoryBreakdown, RankMemory, memory, parse_bytes
from megalite.plan.gpus import GPU, GPUS, get_gpu
from megalite.plan.params import model_flops_per_token, model_parameters
from megalite.plan.speed import StepTime, step_time
from megalite.plan.search import fit_reason, search

__all__ = ["Layout", "invalid_reason", "memory", "MemoryBreakdown", "RankMemory",
           "parse_bytes", "GPU", "GPUS", "get_gpu",
           "StepTime", "step_time", "fit_reason", "search", "gpu_for_device",
           "model_flops_per_token", "model_parameters"]


def gpu_for_device(name: str):
    """The table's GPU for a device name such as torch.cuda.get_device_name() ("NVIDIA
    H100 80GB HBM3" -> H100 SXM); None when the table has no such GPU."""
    for key, gpu in GPUS.items():
        if key in name.lower():
            return gpu
    return None
