"""Where a step's time goes: a torch profiler run split into categories.

``profile_step(fn, directory)`` runs ``fn`` once under ``torch.profiler`` and writes a Chrome
trace (open it in chrome://tracing or https://ui.perfetto.dev). ``breakdown`` turns the
profile into rows of (category, milliseconds, calls): GPU kernel time on CUDA, the self time
of each CPU operator on the CPU (self time, so nested operators are never counted twice and
the categories add up to the profiled total). Categories are decided from the kernel or
operator name by the first matching rule in ``CATEGORIES``; ``count_calls`` counts named
operators (e.g. the copies of a step).
"""
from __future__ import annotations

import os
import re

import torch

# First match wins: the order puts specific names (fused AdamW, flash attention, norms)
# before generic ones (elementwise, reductions). A category may have several rules.
_RULES = [
    ("elementwise", r"cross_entropy|log_softmax|nll_loss|_stats_kernel|_grad_kernel"),
    ("communication", r"nccl|gloo|c10d|all_?reduce|all_?gather|reduce_?scatter|broadcast|"
                      r"allgather|send|recv|barrier"),
    ("optimizer", r"adam|optimizer|multi_tensor|foreach|sgd"),
    ("attention", r"attn|attention|flash|sdpa|softmax"),
    ("matmul", r"gemm|\bmm\b|aten::mm|addmm|bmm|matmul|linear|cutlass|xmma|cublas|"
               r"dot_product|_mm_"),
    ("norms", r"norm|_rms_|_ln_"),
    ("copies/casts", r"copy|aten::to\b|_to_copy|aten::cat|catarray|contiguous|clone|"
                     r"memcpy|memset|aten::stack|index_put|gather|scatter|transpose|permute"),
    ("elementwise", r"add|mul|sub|div|silu|gelu|swiglu|rope|exp|log|where|fill|zero|neg|"
                    r"pow|sqrt|sum|mean|max|min|reduce|elementwise|vectorized|embedding|"
                    r"dropout|sigmoid|tanh|masked|clamp|abs|cross_entropy|lse"),
]
CATEGORIES: list[tuple[str, re.Pattern]] = [(name, re.compile(pattern, re.IGNORECASE))
                                            for name, pattern in _RULES]
ORDER = ["matmul", "attention", "copies/casts", "optimizer", "elementwise", "norms",
         "communication", "other"]
COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::contiguous",
            "aten::clone")


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def _timed_events(prof, device_type: str):
    """(name, microseconds, calls) per distinct kernel (CUDA) or CPU operator."""
    rows = []
    for e in prof.key_averages():
        if device_type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if e.device_type != torch.autograd.DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        rows.append((e.key, us, e.count))
    return rows


def breakdown(prof, device_type: str = "cpu") -> tuple[list[tuple[str, float, int]], float]:
    """Rows (category, ms, calls) in ``ORDER`` and the profiled total in ms."""
    ms = {c: 0.0 for c in ORDER}
    calls = {c: 0 for c in ORDER}
    for name, us, count in _timed_events(prof, device_type):
        c = category(name)
        ms[c] += us / 1e3
        calls[c] += count
    total = sum(ms.values())
    return [(c, ms[c], calls[c]) for c in ORDER], total


def count_calls(prof, names=COPY_OPS) -> dict[str, int]:
    """How many times each named CPU operator ran (all nesting levels)."""
    counts = {n: 0 for n in names}
    for e in prof.key_averages():
        if e.key in counts:
            counts[e.key] += e.count
    return counts


def format_table(rows, total: float, device_type: str) -> str:
    what = "GPU kernel time" if device_type == "cuda" else "CPU operator self time"
    lines = [f"{'category':<15}{'ms':>10}{'%':>7}{'calls':>8}   ({what})"]
    for cat, ms, calls in rows:
        share = 100 * ms / total if total else 0.0
        lines.append(f"{cat:<15}{ms:>10.2f}{share:>6.1f}%{calls:>8}")
    lines.append(f"{'total':<15}{total:>10.2f}{100.0 if total else 0.0:>6.1f}%")
    return "\n".join(lines)


def profile_step(fn, directory: str, device: torch.device, name: str = "trace.json"):
    """Run ``fn()`` under the profiler, write ``directory/name`` (Chrome JSON); returns
    (fn's result, the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    os.makedirs(directory, exist_ok=True)
    with profile(activities=activities) as prof:
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(os.path.join(directory, name))
    return result, prof
