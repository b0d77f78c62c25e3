"""What megalite needs to know about a parameter beyond its tensor, in one registry.

:class:`ParamMeta` holds a parameter's tensor-parallel layout (``tp_dim``, ``tp_sizes``,
``tp_real_size``: how the full tp=1 tensor maps onto this rank's shard) and its two flags:

* ``pipeline_duplicate``: a copy of a parameter another pipeline stage owns (the tied
  embedding on the last stage): its gradient is summed across the stages, it is counted
  once in the gradient norm and saved once;
* ``expert_parallel``: an MoE expert's weight, different on each rank of the expert-parallel
  group: its gradient reduces over the expert-data-parallel group (not data x context), and
  the gradient norm sums it over the expert-parallel group.

The registry is keyed by the parameter object (weakly: it dies with the parameter), so the
metadata survives whatever copies a loose attribute would not (``Tensor.detach()``, a view,
an fp32 main weight, a wrapper such as FSDP's sharded parameter): whoever makes such a
stand-in calls :func:`share_meta` (or reads :func:`meta_by_name` before wrapping and
:func:`set_param_meta` after). The sharding helpers, the gradient path, the norm and the
checkpoints all read :func:`param_meta`.

Attributes of the same names set directly on a parameter (``p.expert_parallel = True`` where
a model makes its experts, ``p.tp_dim``... on a hand-made parameter) are honoured too: a flag
is set when either says so, and a parameter absent from the registry takes its layout from
its attributes. megalite itself writes only the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.weak import WeakIdKeyDictionary

_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class ParamMeta:
    tp_dim: int | None = None            # None: replicated over the TP group
    tp_sizes: tuple[int, ...] | None = None   # full-tensor segment sizes along tp_dim
    tp_real_size: int | None = None      # unpadded length of tp_dim (vocab tables)
    pipeline_duplicate: bool = False
    expert_parallel: bool = False

    @property
    def tp_sharded(self) -> bool:
        return self.tp_dim is not None


def param_meta(p: torch.Tensor) -> ParamMeta:
    """``p``'s metadata (defaults for a plain replicated dense parameter)."""
    meta = _REGISTRY.get(p)
    if meta is None:
        tp_dim = getattr(p, "tp_dim", None)
        sizes = getattr(p, "tp_sizes", None)
        meta = ParamMeta(tp_dim=tp_dim, tp_sizes=tuple(sizes) if sizes is not None else None,
                         tp_real_size=getattr(p, "tp_real_size", None))
    dup = meta.pipeline_duplicate or bool(getattr(p, "pipeline_duplicate", False))
    expert = meta.expert_parallel or bool(getattr(p, "expert_parallel", False))
    if dup != meta.pipeline_duplicate or expert != meta.expert_parallel:
        meta = replace(meta, pipeline_duplicate=dup, expert_parallel=expert)
    return meta


def set_param_meta(p: torch.Tensor, **fields) -> ParamMeta:
    """Update ``p``'s metadata fields (``tp_dim=..., expert_parallel=True, ...``)."""
    if "tp_sizes" in fields and fields["tp_sizes"] is not None:
        fields["tp_sizes"] = tuple(fields["tp_sizes"])
    meta = replace(param_meta(p), **fields)
    _REGISTRY[p] = meta
    return meta


def share_meta(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Give ``dst`` (a stand-in for ``src``: a shard view, a main weight, a wrapped
    parameter) ``src``'s metadata; returns ``dst``."""
    _REGISTRY[dst] = param_meta(src)
    return dst


def meta_by_name(module: torch.nn.Module) -> dict[str, ParamMeta]:
    """{parameter name: metadata} of a module: read it before a wrapper replaces the
    parameters, give it back with ``set_param_meta(new, **vars(meta))`` after."""
    return {name: param_meta(p) for name, p in module.named_parameters()}


def mark_expert_parallel(p: torch.Tensor) -> None:
    set_param_meta(p, expert_parallel=True)


def mark_pipeline_duplicate(p: torch.Tensor) -> None:
    set_param_meta(p, pipeline_duplicate=True)
