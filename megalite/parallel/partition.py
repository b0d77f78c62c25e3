"""Which layers each pipeline stage holds."""
from __future__ import annotations


def layers_per_stage(num_layers: int, num_stages: int,
                     split: list[int] | None = None) -> list[int]:
    """Layer counts per stage.

    Even split by default; when ``num_layers`` is not a multiple of ``num_stages`` the first
    ``num_layers % num_stages`` stages take one extra layer (the last stage already carries
    the final norm, the output head and the loss). ``split`` gives the counts explicitly.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if split is not None:
        split = list(split)
        if len(split) != num_stages or any(n < 1 for n in split) or sum(split) != num_layers:
            raise ValueError(f"layers_per_stage={split} must list {num_stages} counts >= 1 "
                             f"summing to n_layers={num_layers}")
        return split
    if num_layers < num_stages:
        raise ValueError(f"n_layers={num_layers} < {num_stages} pipeline stages (pp x virtual "
                         f"stages): every stage needs a layer; lower --pp or --virtual-stages, "
                         f"or use more layers")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def stage_layers(num_layers: int, num_stages: int, stage: int,
                 split: list[int] | None = None) -> range:
    """Global indices of the layers on ``stage``."""
    counts = layers_per_stage(num_layers, num_stages, split)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])
