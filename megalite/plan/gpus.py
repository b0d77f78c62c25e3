"""GPUs the planner knows: datasheet peaks, and the fractions of them megalite reaches.

Peaks (dense, no sparsity) from NVIDIA's datasheets: H100 SXM5 and H200 SXM
(nvidia.com/en-us/data-center/h100, /h200: 989 TFLOP/s bf16, 3.35 / 4.8 TB/s HBM, 80 / 141
GB, NVLink 900 GB/s both directions), A100 SXM4 80GB (nvidia.com/en-us/data-center/a100:
312 TFLOP/s bf16, 2.039 TB/s, 600 GB/s NVLink). Between nodes, one 400 Gb/s (H100/H200,
ConnectX-7) or 200 Gb/s (A100, ConnectX-6) InfiniBand port per GPU, as in DGX systems.
Link figures are per direction (half of NVIDIA's bidirectional number).

The efficiencies are calibrated on the one GPU measurement we have (docs/planner.md): llama-1b
on one H200, bf16, seq 2048, micro-batch 4, global batch 16: 590 ms per step, of which
~317 ms matmuls at ~770 TFLOP/s, 68 ms attention, ~202 ms other memory-bound kernels. They
are assumed to carry over to the other GPUs (same kernels, same ratio of achieved to peak).
Collectives reach ``link_efficiency`` of the link (NCCL bus bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float        # dense peak, FLOP/s
    hbm_bandwidth: float     # bytes/s
    memory: float            # bytes
    nvlink_bandwidth: float  # bytes/s per direction, per GPU
    network_bandwidth: float  # bytes/s per direction, per GPU, between nodes
    gpus_per_node: int = 8


GPUS = {
    "h100": GPU("H100 SXM", 989e12, 3.35e12, 80e9, 450e9, 50e9),
    "h200": GPU("H200 SXM", 989e12, 4.8e12, 141e9, 450e9, 50e9),
    "a100": GPU("A100 SXM 80GB", 312e12, 2.039e12, 80e9, 300e9, 25e9),
}

# Calibrated on llama-1b / H200 (see the module doc and docs/planner.md).
MATMUL_EFFICIENCY = 770e12 / 989e12     # ~317 ms of linear-layer matmuls at ~770 TFLOP/s
ATTENTION_EFFICIENCY = 0.229            # Triton flash attention: 68 ms for 15.4 TFLOP
MEMORY_EFFICIENCY = 0.464               # other kernels' bytes moved vs HBM peak (fitted)
LINK_EFFICIENCY = 0.8                   # NCCL bus bandwidth vs link peak


def get_gpu(name: str) -> GPU:
    key = name.lower().replace(" ", "").replace("-sxm", "")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)}")
    return GPUS[key]
