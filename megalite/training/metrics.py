"""What a run tells its user: a progress line per interval, JSONL metrics, MFU, a summary.

Only global rank 0 prints or writes. ``--metrics-out`` gets one JSON object per step with
``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_sec`` and, on GPU, ``mfu`` and
``peak_mem_gb``. TensorBoard scalars are written too when tensorboard is installed and a
log directory is given.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor specs, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "V100": 125e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The card's dense peak for ``dtype``. fp32 counts against the TF32 tensor-core peak
    (half the bf16 rate), reachable only with TF32 on (``pretrain_gpt.py --tf32``); without
    it fp32 matmuls run on the far slower CUDA cores and the MFU reads low."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops if dtype in ("bf16", "fp16") else flops / 2
    return None


def peak_memory_gb(device: torch.device) -> float:
    """GPU: the allocator's peak since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only; ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _keep_rows_up_to(path: str, step: int) -> None:
    """Drop the rows after ``step`` (logged by the run that died; the resumed run redoes
    them) and any line it cut off mid-write; replace the file atomically."""
    kept = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line + "\n")
    tmp = f"{path}.tmp"
    Path(tmp).write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0's training log: a console line every ``log_interval`` steps, one JSON row per
    step in ``metrics_out``, optional TensorBoard scalars. ``resumed_at=step`` keeps the
    file's rows up to that step (a resumed run redoes the later ones)."""

    def __init__(self, rank: int, total_steps: int, metrics_out: str | None = None,
                 log_interval: int = 10, tensorboard_dir: str | None = None,
                 resumed_at: int | None = None):
        self.active = rank == 0
        self.total_steps, self.log_interval = total_steps, log_interval
        self.file = None
        self.tb = None
        self.history: list[dict] = []
        self.start = time.perf_counter()
        if not self.active:
            return
        if metrics_out:
            Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None and Path(metrics_out).exists():
                _keep_rows_up_to(metrics_out, resumed_at)
            self.file = open(metrics_out, "a" if resumed_at is not None else "w")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                print("tensorboard is not installed; skipping --tensorboard", file=sys.stderr)

    def log(self, row: dict) -> None:
        if not self.active:
            return
        self.history.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])
        step = row["step"]
        if step % self.log_interval == 0 or step == self.total_steps or step == 1:
            print(self.format(row), flush=True)
        elif sys.stdout.isatty():
            print("\r" + self.progress(step), end="", flush=True)

    def progress(self, step: int) -> str:
        done = int(30 * step / max(1, self.total_steps))
        return f"[{'#' * done}{'.' * (30 - done)}] {step}/{self.total_steps}"

    def format(self, row: dict) -> str:
        parts = [f"step {row['step']:>5}/{self.total_steps}", f"loss {row['loss']:.4f}",
                 f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.3f}",
                 f"{row['tokens_per_sec']:,.0f} tok/s"]
        if row.get("mfu") is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("peak_mem_gb") is not None:
            parts.append(f"mem {row['peak_mem_gb']:.2f} GB")
        if row.get("skipped"):
            parts.append(f"(step skipped: {row.get('skip_reason', 'fp16 overflow')})")
        return "\r" + " | ".join(parts) if sys.stdout.isatty() else " | ".join(parts)

    def summary(self) -> str:
        if not self.history:
            return "no steps run"
        first, last = self.history[0], self.history[-1]
        timed = self.history[1:] or self.history  # the first step includes warm-up costs
        tps = sum(r["tokens_per_sec"] for r in timed) / len(timed)
        text = (f"done: steps {first['step']}..{last['step']}, loss {first['loss']:.4f} -> "
                f"{last['loss']:.4f}, mean {tps:,.0f} tokens/s, "
                f"wall {time.perf_counter() - self.start:.1f}s")
        mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
        if mfus:
            text += f", mean MFU {100 * sum(mfus) / len(mfus):.1f}%"
        return text

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
