"""What a run prints and writes besides its metrics: the planner's prediction next to the
measured figures, and the pipeline timeline of the last step (``--trace``)."""
from __future__ import annotations

import os

import torch

from megalite import plan
from megalite.pipeline import gather_spans, plot_timeline, write_chrome_trace
from megalite.training.cli import memory_budget, planned_layout


def planner_prediction(args, dp: int, cfg, device) -> tuple[str, dict] | None:
    """(a line to print, {'peak_gib', 'step_s'}) of the planner's prediction for this run."""
    layout = planned_layout(args, dp, cfg)
    if layout is None:
        return None
    mem = plan.memory(cfg, layout)
    worst = mem.worst
    parts = ", ".join(f"{k} {v / 2**30:.3g}" for k, v in worst.parts().items() if v)
    line = (f"planner: peak {worst.total / 2**30:.3g} GiB on pipeline rank {worst.pp_rank} "
            f"({parts}; activations of {sum(worst.live_microbatches.values())} live "
            f"stage-microbatches)")
    predicted = {"rank0_gib": mem.ranks[0].total / 2**30, "step_s": None}
    gpu = plan.gpu_for_device(torch.cuda.get_device_name(device)) \
        if device.type == "cuda" else None
    if gpu is not None:
        t = plan.step_time(cfg, layout, gpu)
        predicted["step_s"] = t.step
        line += f"; step {t.step:.3f} s, MFU {t.mfu:.1%} on {gpu.name}"
    elif device.type != "cuda":
        line += " (GPU accounting: on CPU the measured peak is the process RSS)"
    budget = memory_budget(args)
    if budget is not None and worst.total > budget:
        line += f"; over --gpu-memory {budget / 2**30:.1f} GiB"
    return line, predicted


def measured_vs_planned(history: list, predicted: dict, ps) -> str:
    """The measured figures next to the planner's (the peak of the predicted rank, the
    median step time after the first step)."""
    timed = sorted(r["step_time_s"] for r in (history[1:] or history))
    median = timed[len(timed) // 2]
    peak = max(r["peak_mem_gb"] for r in history)   # this rank: pipeline rank 0
    line = (f"measured vs planner: peak {peak:.3g} GiB on pipeline rank 0 (planner "
            f"{predicted['rank0_gib']:.3g} GiB)")
    if ps.device.type != "cuda":
        line += " [CPU: RSS, not comparable]"
    line += f"; step {median:.3f} s"
    if predicted["step_s"] is not None:
        line += f" (planner {predicted['step_s']:.3f} s)"
    return line


def write_timeline(directory: str, spans: list, ps, schedule: str) -> None:
    """Gather every pipeline rank's spans of the last step; rank 0 writes trace and PNG."""
    os.makedirs(directory, exist_ok=True)
    all_spans = gather_spans(spans, ps)
    if all_spans is not None:
        write_chrome_trace(all_spans, os.path.join(directory, "timeline.json"), unit_us=1e6)
        plot_timeline(all_spans, os.path.join(directory, "timeline.png"),
                      f"{schedule}, pp={ps.pp}: measured step (seconds)")
        print(f"timeline written to {directory}/timeline.json and timeline.png", flush=True)
