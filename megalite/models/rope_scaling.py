"""RoPE frequencies, plain and scaled for long context: Llama 3's ``llama3``, ``linear``
(position interpolation) and ``yarn``, computed exactly as Hugging Face's
``modeling_rope_utils`` does, so imported checkpoints keep their function.

``GPTConfig.rope_scaling`` is ``None`` (plain RoPE) or a dict with ``"type"`` and that
type's parameters (:data:`ROPE_SCALING_FIELDS`; ``None`` marks optional ones):

    {"type": "linear", "factor": 2.0}
    {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
     "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
     "mscale_all_dim": None, "truncate": True}

YaRN also scales cos and sin by its attention factor (HF's ``attention_scaling``), which is
the same as scaling every attention logit by its square.
"""
from __future__ import annotations

import math

import torch

# type -> {field: required?}
ROPE_SCALING_FIELDS = {
    "linear": {"factor": True},
    "llama3": {"factor": True, "low_freq_factor": True, "high_freq_factor": True,
               "original_max_position_embeddings": True},
    "yarn": {"factor": True, "original_max_position_embeddings": True, "beta_fast": False,
             "beta_slow": False, "attention_factor": False, "mscale": False,
             "mscale_all_dim": False, "truncate": False},
}


def validate_rope_scaling(scaling: dict | None) -> None:
    """ValueError unless ``scaling`` is None or a complete dict of a supported type."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("type") not in ROPE_SCALING_FIELDS:
        kind = scaling.get("type") if isinstance(scaling, dict) else scaling
        raise ValueError(f"rope_scaling type {kind!r} is not supported; use None (plain RoPE) "
                         f"or a dict with type one of {sorted(ROPE_SCALING_FIELDS)}")
    fields = ROPE_SCALING_FIELDS[scaling["type"]]
    unknown = set(scaling) - set(fields) - {"type"}
    missing = [k for k, required in fields.items() if required and scaling.get(k) is None]
    if unknown or missing:
        raise ValueError(f"rope_scaling {scaling}: {scaling['type']} takes "
                         f"{sorted(fields)} (required: "
                         f"{sorted(k for k, r in fields.items() if r)}); unknown "
                         f"{sorted(unknown)}, missing {missing}")
    if scaling["factor"] <= 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {scaling['factor']}")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None
                        ) -> torch.Tensor:
    """The [head_dim / 2] rotation frequencies (float64)."""
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = 1.0 / base
    if scaling is None:
        return inv_freq
    kind, factor = scaling["type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return _yarn(inv_freq, head_dim, theta, scaling)


def attention_factor(scaling: dict | None) -> float:
    """The factor cos and sin are multiplied by (YaRN's mscale; 1 otherwise)."""
    if scaling is None or scaling["type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all = (scaling["factor"], scaling.get("mscale"),
                                  scaling.get("mscale_all_dim"))

    def log_scale(m=1.0):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if mscale and mscale_all:
        return float(log_scale(mscale) / log_scale(mscale_all))
    return log_scale()


def _llama3(inv_freq, p):
    """Long wavelengths (beyond the original context / low_freq_factor) are divided by
    factor, short ones (below original / high_freq_factor) kept, the band between blended
    linearly in original_context / wavelength."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    original = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def _yarn(inv_freq, head_dim, theta, p):
    """Interpolate (divide by factor) the dimensions that rotate fewer than beta_slow times
    over the original context, keep those rotating more than beta_fast times, ramp between."""
    factor, original = p["factor"], p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_of(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if p.get("truncate", True) is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp     # 1: extrapolate (unchanged frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep
