"""FSDP: data parallelism that shards the parameters too (ZeRO-3), through torch's own
``fully_shard`` (FSDP2).

:func:`fully_shard_model` gives every transformer block its own FSDP group and puts what is
left (embeddings, final norm, output head: whatever the root module holds itself) in the
root's group. Each parameter becomes a ``DTensor`` sharded on dim 0 over the data-parallel
group (a ``DeviceMesh`` made from ``ps.dp_group``, or ``ps.dp_cp_group`` when the state has
one). Tensor parallelism composes underneath: our TP layers hold plain local shards, and
FSDP splits each local shard further over dp, so a DTensor's (global) shape is the TP
shard's shape and the parameter metadata (:mod:`megalite.parallel.param_meta`: TP layout,
pipeline duplicates) is given to the new parameters.

Pipeline schedules run stage modules microbatch by microbatch, with the backward of one
microbatch between the forwards of others, and FSDP2 runs its end-of-backward callback after
each of them, over every group. So a step is arranged (:func:`begin_step`) for that: blocks
all-gather before forward, free after it, all-gather again in backward, free after it, and
reduce-scatter their gradients after every microbatch (``reduce_every_microbatch=False``:
accumulate them unsharded and reduce once, as ``torch.distributed.pipelining`` does). The
root group (embeddings, final norm, output head) is gathered at its first forward and stays
gathered, accumulating unsharded gradients, for the whole step: the loss uses the output
head and a tied embedding outside any module's forward, where no FSDP hook could gather
them. :func:`finish_grads` then reduce-scatters what is left (averaged over dp), frees the
gathered parameters and sums a tied embedding's shards over the first and last pipeline
stage. Between steps a rank holds only its shards: 4 (fp32 parameter) + 4 (gradient) + 8
(AdamW moments) bytes per parameter divided by dp.

Every schedule runs, the split backward of the zero-bubble schedules (I, then W later) too:
W computes weight gradients from saved activations and output gradients, never from the
weights, and its gradients land on the same unsharded gradient tensors until
:func:`finish_grads` (tests/parallel/test_fsdp.py checks zbv against one process). fp16
(loss scaling over DTensor gradients) and the distributed optimizer (FSDP shards the
optimizer state already) are refused by the command line and by ``train_step``.

Gradients are DTensors: :func:`local_grads` gives this rank's local shards with the
parameters' metadata, and :func:`clip_` computes the global norm from them (each element
lives on exactly one dp rank, so the squares are summed over dp too). Checkpoints store whole tensors: :func:`full_tensor` gathers
a shard over dp (then the TP gather of :mod:`sharding` runs as before) and
:func:`like_param` turns a whole (TP-local) tensor back into this rank's dp shard.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from megalite.parallel.param_meta import ParamMeta, meta_by_name, param_meta, set_param_meta


def dp_group(ps):
    """The group FSDP shards over: the one dense gradients reduce over (data x context)."""
    from megalite.parallel.grad_buffer import dense_reduction
    return dense_reduction(ps).group


def _mesh(ps):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    group = dp_group(ps)
    if not dist.is_initialized() or group is None:
        raise ValueError("FSDP shards over a process group and this process has none: "
                         "launch several processes (torchrun --nproc-per-node N) and call "
                         "megalite.parallel.initialize there")
    return DeviceMesh.from_group(group, ps.device.type)


def check_state(ps) -> None:
    """Layouts FSDP is not wired for yet, refused by name: context parallelism (the norm of
    the gradient shards would have to sum over dp x cp) and expert parallelism (expert
    weights reduce over their own expert_dp group)."""
    for name, fix in (("cp", "--cp 1"), ("ep", "--ep 1")):
        if getattr(ps, name, 1) > 1:
            raise ValueError(f"FSDP with {name}={getattr(ps, name)} is not supported yet: "
                             f"run --fsdp with {fix}, or drop --fsdp")


def mixed_precision(param_dtype: torch.dtype | None):
    """FSDP2's policy: ``param_dtype`` (bf16) for the gathered parameters and compute,
    fp32 for the gradient reduce-scatter and the sharded (main) weights; None: all fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if param_dtype in (None, torch.float32):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def fully_shard_model(model: nn.Module, ps, blocks: Iterable[nn.Module] | None = None,
                      param_dtype: torch.dtype | None = None,
                      reshard_after_forward: bool = True,
                      reduce_every_microbatch: bool = True) -> nn.Module:
    """Shard ``model`` (this rank's stages, already TP-sharded) over dp, in place: one FSDP
    group per module of ``blocks`` (the transformer layers; default: the modules in
    ``model.layers``, as GPT holds them), one for the rest on the root.
    ``param_dtype`` bf16 computes with bf16 copies of the fp32 shards; the root returns fp32
    so pipeline transfers keep their dtype. ``reshard_after_forward=False`` keeps each
    block's parameters gathered from its forward to its backward (more memory, one
    all-gather less per block and microbatch). ``reduce_every_microbatch``: see
    :func:`begin_step`. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard
    if is_fsdp(model):
        raise ValueError("the model is sharded with FSDP already")
    if any(param_meta(p).expert_parallel for p in model.parameters()):
        raise ValueError("FSDP does not shard MoE experts yet (their gradients reduce over "
                         "the expert-data-parallel ranks, not FSDP's group): train MoE models "
                         "without FSDP, with the distributed optimizer")
    check_state(ps)
    if blocks is None:
        layers = getattr(model, "layers", [])
        blocks = list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)
    mesh = _mesh(ps)
    policy = mixed_precision(param_dtype)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("FSDP keeps fp32 shards and gathers 16-bit copies itself: build the "
                         "model with params_dtype='fp32' and pass param_dtype=torch.bfloat16")
    saved = meta_by_name(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    root_policy = policy
    if param_dtype not in (None, torch.float32):
        from torch.distributed.fsdp import MixedPrecisionPolicy
        root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
    for name, p in model.named_parameters():  # the DTensor parameters replaced the originals
        set_param_meta(p, **vars(saved[name]))
    model.fsdp_mesh = mesh
    model.fsdp_param_dtype = param_dtype or torch.float32
    model.fsdp_reduce_every_microbatch = reduce_every_microbatch
    return model


def is_fsdp(model) -> bool:
    return getattr(model, "fsdp_mesh", None) is not None


def _states(model):
    from torch.distributed.fsdp import fully_shard
    root = fully_shard.state(model)
    root._lazy_init()  # idempotent; finds every group under the root
    return root, root._state_ctx.all_states


def begin_step(model) -> None:
    """Before a step's schedule. The root group (embeddings, head) stays gathered and
    accumulates its unsharded gradients until finish_grads. Blocks free their parameters
    after each backward; with ``reduce_every_microbatch`` they reduce-scatter their
    gradients after each microbatch's backward too (gradient memory 4/dp bytes per
    parameter, m reduce-scatters a step), else accumulate unsharded gradients (4 bytes per
    parameter until finish_grads, one reduce-scatter a step)."""
    model.set_is_last_backward(False)
    model.set_requires_gradient_sync(model.fsdp_reduce_every_microbatch)
    model.set_reshard_after_backward(True)
    model.set_requires_gradient_sync(False, recurse=False)
    model.set_reshard_after_backward(False, recurse=False)


def finish_grads(model, ps) -> None:
    """After the schedule: reduce-scatter every group's gradients (mean over dp), free the
    gathered parameters, and sum a tied embedding's shards across pipeline stages."""
    model.set_is_last_backward(True)
    model.set_requires_gradient_sync(True)
    model.set_reshard_after_backward(True)
    root, states = _states(model)
    # What the step held beyond the shards at its end (its peak, with one block's share):
    model.fsdp_gathered_bytes = _gathered_bytes(states)
    for state in states:
        for group in state._fsdp_param_groups:
            group.post_backward()
    root._root_post_backward_final_callback()  # waits for the reductions, resets state
    reshard(model)
    shared = model.shared_embedding_params() if hasattr(model, "shared_embedding_params") else []
    if ps.pp > 1 and shared:
        from megalite.parallel.grads import allreduce_shared
        # Both stages shard the table alike over equal-sized dp groups, and the embedding
        # group pairs ranks of equal dp rank: summing local shards sums the whole gradients.
        allreduce_shared([g for _, g in local_grads(shared)], ps)


def _gathered_bytes(states) -> dict[str, int]:
    """Bytes of the gathered (unsharded) parameters and of the unsharded gradients that
    FSDP holds now, over every group of the model."""
    params = grads = 0
    for state in states:
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                unsharded = getattr(fp, "_unsharded_param", None)
                if unsharded is None:
                    continue
                if group.is_unsharded:
                    params += unsharded.numel() * unsharded.element_size()
                for g in (unsharded.grad, fp.unsharded_accumulated_grad):
                    if g is not None:
                        grads += g.numel() * g.element_size()
    return {"gathered_params": params, "unsharded_grads": grads}


def reshard(model) -> None:
    """Free every gathered parameter (after a forward-only pass, e.g. evaluation), so the
    registered parameters are the sharded ones the optimizer and checkpoints use."""
    _, states = _states(model)
    for state in states:
        for group in state._fsdp_param_groups:
            group.reshard()


def _local(t):
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def local_grads(params: Iterable[nn.Parameter]) -> list[tuple[ParamMeta, torch.Tensor]]:
    """``(metadata, this rank's local gradient shard)`` of ``params`` that have a gradient;
    the shard is a view, so scaling it scales the DTensor gradient."""
    return [(param_meta(p), _local(p.grad)) for p in params if p.grad is not None]


def check_step(optimizer, dtype: str, activation_dtype: torch.dtype) -> None:
    """What train_step refuses for an FSDP model (the command line refuses it earlier)."""
    from megalite.parallel.distributed_optimizer import MainParamOptimizer
    if isinstance(optimizer, MainParamOptimizer):
        raise ValueError("an FSDP model shards its parameters and optimizer state already: "
                         "build a plain optimizer over its parameters (no distributed "
                         "optimizer, no main-weight wrapper)")
    if dtype == "fp16" or activation_dtype == torch.float16:
        raise ValueError("FSDP runs fp32 or bf16 (param_dtype=torch.bfloat16), not fp16")


def clip_(model, max_norm: float, ps) -> torch.Tensor:
    """Scale the gradient shards so the global norm is at most ``max_norm`` (0: no clip);
    returns the norm before. Each element lives on exactly one dp rank: the squares are
    summed over the FSDP group too."""
    from megalite.parallel.grads import norm_squares, scale_to_max_norm_
    pieces = local_grads(model.parameters())
    norm = norm_squares(pieces, ps, dense_sharded=True).sqrt()[0]
    scale_to_max_norm_([g for _, g in pieces], norm, max_norm)
    return norm


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole over its mesh (collective over dp); other tensors as they are."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``param``'s whole, TP-local value) as this rank's dp shard
    when ``param`` is an FSDP DTensor (no communication: each rank keeps its slice)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return tensor
    tensor = tensor.to(param.device, param.dtype)
    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


def local_bytes(model, optimizer=None) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradients and optimizer state (local shards)."""
    params = list(model.parameters())
    out = {"params": sum(_local(p).numel() * p.element_size() for p in params),
           "grads": sum(_local(p.grad).numel() * p.grad.element_size()
                        for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim():
                    out["optimizer"] += _local(v).numel() * v.element_size()
    return out

