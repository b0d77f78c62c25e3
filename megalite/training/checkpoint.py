"""Checkpoints that resume exactly and load into any (tp, pp, dp) layout.

A checkpoint is one directory ``ROOT/step_XXXXXXXX`` holding

    meta.json                    step, layout, the model's config, which tensor is in which file,
                                 optimizer hyperparameters, scheduler, sampler, loss scaler,
                                 ``extra`` (the script's args); written last: it marks the
                                 checkpoint complete
    model_stage{k}.safetensors   parameters of pipeline stage k as full (tp=1, unpadded)
                                 tensors, keyed by their global names (``layers.3.mlp.up.weight``);
                                 always fp32: a model with 16-bit parameters saves the
                                 optimizer's fp32 main weights, so resume is exact and
                                 checkpoints load across --dtype modes
    optim_stage{k}.safetensors   optimizer state of those parameters, ``{name}.exp_avg``,
                                 ``{name}.exp_avg_sq``, ``{name}.step``, gathered the same way
    rng_rank{r:05d}.safetensors  RNG states of global rank r (CPU, CUDA, TP tracker streams)

and ``ROOT/latest`` names the newest one. meta.json records the sha256 and size of every
file; :func:`verify_checkpoint` checks them (ranks share the work) and loading refuses a
checkpoint whose files do not match. No tensor depends on the saving layout: a loading
rank reads the names its stage holds from whichever files hold them and keeps its TP shard.
Optimizer state is keyed by parameter name, as optimizer indices differ from stage to stage.
The distributed optimizer's dp-sharded state is gathered whole to save and re-sharded on
load (:func:`_param_state`, ``DistributedOptimizer.load_full_state``), so either kind of
optimizer loads either kind of checkpoint. FSDP's dp-sharded parameters and optimizer state
(DTensors) are gathered whole the same way and sliced back on load (:mod:`megalite.parallel.fsdp`),
so FSDP and non-FSDP runs load each other's checkpoints.

Atomic: ranks write under ``ROOT/step_XXXXXXXX.tmp-<id>``; once all succeeded, rank 0 adds
meta.json, publishes the directory with one rename and then replaces ``latest``. A killed
save leaves only a ``*.tmp-*`` directory: never loaded, deleted by the next good save.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megalite.parallel import fsdp
from megalite.parallel.comm import agree
from megalite.parallel.distributed_optimizer import MainParamOptimizer
from megalite.parallel.param_meta import param_meta
from megalite.parallel.random import get_rng_tracker
from megalite.parallel.sharding import gather_full_to_cpu, is_expert_sharded, shard_full
from megalite.parallel.state import global_rank
from megalite.training.checkpoint_dir import (FORMAT, VERSION, _LEFTOVER, _fsync,  # noqa: F401
                                              _write_atomic, file_checksum, latest_checkpoint,
                                              list_checkpoints, prune_checkpoints,
                                              read_checkpoint_meta, verify_checkpoint)

_RNG_FILE = "rng_rank{:05d}.safetensors"


# ----------------------------------------------------------------------------- files

def _save_tensors(tensors: dict, path: str) -> dict:
    """Write and flush a safetensors file; returns its checksum entry for meta.json."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
              metadata={"format": FORMAT})
    _fsync(path)
    return file_checksum(path)


# ----------------------------------------------------------------------------- save

def save_checkpoint(root: str, step: int, model, optimizer, scheduler, sampler, scaler=None,
                    extra=None, keep_last: int = 0) -> str:
    """Write a checkpoint of ``step`` to ``root/step_XXXXXXXX``; returns its path.

    Collective over all ranks; no rank returns before the checkpoint is complete and
    ``root/latest`` names it. ``extra`` is stored as JSON (other values as strings).
    ``keep_last`` > 0 then deletes all but the newest ``keep_last`` checkpoints; checkpoints
    set aside (abandoned, corrupt) are pruned to the newest ``keep_last`` (or
    ``SET_ASIDE_KEPT``) either way (:func:`prune_checkpoints`). A failure
    on any rank raises on every rank and leaves the previous checkpoint as ``latest``."""
    ps, rank = model.ps, model.ps.rank
    name = f"step_{int(step):08d}"
    error, tmp = None, None
    if rank == 0:
        try:
            tmp = os.path.join(root, f"{name}.tmp-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)  # and root
        except OSError as e:
            error = e
    tmp = agree(error, f"creating {root}", tmp)[0]  # rank 0's name, on every rank

    files, sums, error = {}, {}, None
    try:
        files, sums = _write_stage(tmp, model, optimizer, ps)
        rng_file = _RNG_FILE.format(rank)
        sums[rng_file] = _save_tensors(_rng_states(ps), os.path.join(tmp, rng_file))
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, see agree
        error = e
    all_files, all_sums = {}, {}
    for rank_files, rank_sums in agree(error, f"saving checkpoint {tmp}", (files, sums)):
        all_files.update(rank_files)
        all_sums.update(rank_sums)

    error, final = None, os.path.join(root, name)
    if rank == 0:
        try:
            meta = _meta(step, model, optimizer, scheduler, sampler, scaler, extra, all_files)
            meta["checksums"] = dict(sorted(all_sums.items()))
            _commit(root, tmp, final, meta)
            prune_checkpoints(root, keep_last)
        except Exception as e:  # noqa: BLE001
            error = e
    agree(error, f"committing checkpoint {final}")  # also the final barrier
    return final


def _write_stage(tmp: str, model, optimizer, ps) -> tuple[dict, dict]:
    """Gather this stage's full parameters and optimizer state (collective over TP, and over
    dp for a sharded optimizer) tensor by tensor into host memory; the stage's (tp_rank 0,
    dp_rank 0, cp_rank 0) rank writes them. Returns {file: names} of what it wrote and {file:
    checksum}."""
    sharded_model = fsdp.is_fsdp(model)  # FSDP: parameters and state are dp shards
    sharded = sharded_model or (isinstance(optimizer, MainParamOptimizer)
                                and optimizer.main_grads.shard)
    # dp and cp replicas hold identical values: replica 0 writes. MoE experts split over
    # ep > 1 are gathered over the ep group of the first expert-data-parallel replica (the
    # writer's).
    first_expert = ps.ep > 1 and ps.expert_dp_rank == 0
    if (ps.dp_rank != 0 or ps.cp_rank != 0) and not sharded and not first_expert:
        return {}, {}
    writer = ps.tp_rank == 0 and ps.dp_rank == 0 and ps.cp_rank == 0
    params, states = {}, {}
    for name, p in model.named_parameters():
        if param_meta(p).pipeline_duplicate:
            continue  # tied embedding copy on the last stage: the first stage saves it
        # The fp32 main weight of a 16-bit p (collective over dp when sharded), or an FSDP
        # shard gathered over dp (collective too); else p itself.
        main = _main_weight(optimizer, p)
        if sharded_model:
            main = fsdp.full_tensor(p.detach())
        joins = first_expert if is_expert_sharded(p, ps) else ps.dp_rank == 0
        if joins:
            params[name] = gather_full_to_cpu(p, ps, tensor=main, keep=writer,
                                              dtype=torch.float32)
        for key, value in _param_state(optimizer, p):  # gathered over dp one at a time
            value = fsdp.full_tensor(value)
            if not joins:
                continue
            if torch.is_tensor(value) and value.shape == p.shape:  # exp_avg, exp_avg_sq
                states[f"{name}.{key}"] = gather_full_to_cpu(p, ps, value, keep=writer)
            else:  # per-parameter scalars: AdamW's step
                states[f"{name}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    if not writer:
        return {}, {}
    written, sums = {}, {}
    for kind, tensors in (("model", params), ("optim", states)):
        fname = f"{kind}_stage{ps.pp_rank}.safetensors"
        sums[fname] = _save_tensors(tensors, os.path.join(tmp, fname))
        written[fname] = sorted(tensors)
    return written, sums


def _main_weight(optimizer, p) -> torch.Tensor | None:
    """The fp32 main weight of a 16-bit ``p`` (this TP shard, whole over dp); None when
    ``p`` is its own main weight (fp32)."""
    if p.dtype == torch.float32 or not isinstance(optimizer, MainParamOptimizer):
        return None
    return optimizer.main_weight(p)


def _param_state(optimizer, p):
    """``(key, value)`` of ``p``'s optimizer state, tensors shaped like ``p`` (this TP shard,
    all of dp); a sharded state is gathered over dp as it is consumed."""
    if isinstance(optimizer, MainParamOptimizer):
        return optimizer.iter_gathered_state(p)
    return iter(optimizer.state.get(p, {}).items())


def _rng_states(ps) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if ps.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(ps.device)
    for stream, state in get_rng_tracker().states.items():
        states[f"tracker.{stream}"] = state.clone()
    return states


def _meta(step, model, optimizer, scheduler, sampler, scaler, extra, files) -> dict:
    ps = model.ps
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in optimizer.state_dict()["param_groups"]]
    return {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
        # "fsdp" only when true, informative: the tensors are layout-free
        "layout": {"tp": ps.tp, "pp": ps.pp, "dp": ps.dp, "cp": ps.cp, "ep": ps.ep,
                   "world_size": ps.world_size,
                   **({"fsdp": True} if fsdp.is_fsdp(model) else {})},
        "config": model.checkpoint_config(),
        "files": dict(sorted(files.items())),
        "rng_files": [_RNG_FILE.format(r) for r in range(ps.world_size)],
        "optimizer": {"param_groups": groups},
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": extra,
    }


def _commit(root: str, tmp: str, final: str, meta: dict) -> None:
    """Rank 0, after every rank wrote its files: publish the checkpoint in one rename."""
    _write_atomic(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str))
    _fsync(tmp)
    if os.path.exists(final):  # saving a step again (a rerun): move the old one aside
        os.rename(final, f"{final}.old-{uuid.uuid4().hex[:8]}")
    # Checkpoints of later steps belong to an abandoned history (e.g. a run restarted from
    # an older checkpoint): set them aside so `latest` is always the newest step directory.
    for step, path in list_checkpoints(root):
        if step > meta["step"]:
            os.rename(path, f"{path}.abandoned-{uuid.uuid4().hex[:8]}")
    os.rename(tmp, final)
    _write_atomic(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    _fsync(root)
    for leftover in os.listdir(root):  # interrupted saves and replaced steps
        if _LEFTOVER.match(leftover):
            shutil.rmtree(os.path.join(root, leftover), ignore_errors=True)


# ----------------------------------------------------------------------------- load

def load_checkpoint(path: str, model, optimizer=None, scheduler=None, sampler=None,
                    scaler=None, verify: bool = True) -> int:
    """Restore a checkpoint (a step directory, or a root: its newest one) into this rank's
    model and whichever of optimizer, scheduler, sampler and scaler are given, for any
    (tp, pp, dp) layout of the same model. Returns the checkpoint's step. RNG states are
    restored only when resuming training (an optimizer is given). ``verify`` first checks
    every file against meta.json's checksums (``verify=False``: the caller just did).
    Collective: every rank raises if one fails."""
    problems = verify_checkpoint(latest_checkpoint(path) or path) if verify else []
    if problems:
        raise ValueError(f"checkpoint {path!r} is corrupt: {'; '.join(problems)}; load an "
                         f"earlier checkpoint (a step_XXXXXXXX directory) or save again")
    error, step = None, 0
    try:
        meta = read_checkpoint_meta(path)
        try:
            model.check_checkpoint_config(meta["config"])
        except ValueError as e:
            raise ValueError(f"checkpoint {meta['path']!r} is of {e}") from None
        files = _TensorFiles(meta)
        _load_model(files, model)
        if optimizer is not None:
            _load_optimizer(files, meta, model, optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
            if optimizer is not None:
                _continue_schedule(scheduler, optimizer)
        if sampler is not None:
            sampler.load_state_dict(meta["sampler"])
        if scaler is not None and meta.get("scaler") is not None:
            scaler.load_state_dict(meta["scaler"])
        if optimizer is not None:
            _load_rng(meta, model.ps)
        step = int(meta["step"])
    except Exception as e:  # noqa: BLE001 - see agree
        error = e
    agree(error, f"loading checkpoint {path}")
    return step


class _TensorFiles:
    """Reads single tensors by global name from whichever file meta.json says holds them."""

    def __init__(self, meta: dict):
        self.dir = meta["path"]
        self.where = {n: f for f, names in meta["files"].items() for n in names}
        self.handles = {}
        # Optimizer-state keys per parameter: "layers.0.attn.qkv.weight.exp_avg" -> exp_avg.
        self.state_keys: dict[str, list[str]] = {}
        for key, fname in self.where.items():
            if fname.startswith("optim_"):
                param, state_key = key.rsplit(".", 1)
                self.state_keys.setdefault(param, []).append(state_key)

    def get(self, name: str) -> torch.Tensor:
        fname = self.where.get(name)
        if fname is None:
            raise ValueError(f"checkpoint {self.dir!r} holds no tensor {name!r} (meta.json "
                             f"lists none); it is incomplete or from another model")
        path = os.path.join(self.dir, fname)
        try:
            if fname not in self.handles:  # lazy: reads only the tensors asked for
                self.handles[fname] = safe_open(path, framework="pt")
            return self.handles[fname].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"corrupt checkpoint file {path!r} (reading {name!r}: {e}); "
                             f"load an earlier checkpoint or save again") from None


def _shard(files: _TensorFiles, key: str, full: torch.Tensor, param, ps) -> torch.Tensor:
    try:
        shard = shard_full(full, param, ps)
        if shard.shape != param.shape:
            raise ValueError(f"full shape {tuple(full.shape)} does not give this rank's "
                             f"shard shape {tuple(param.shape)}")
    except ValueError as e:
        raise ValueError(f"{key} in {files.dir!r}: {e}") from None
    return shard


def _load_model(files: _TensorFiles, model) -> None:
    with torch.no_grad():
        # A tied embedding's copy on the last stage has the same name: it loads the same tensor.
        for name, p in model.named_parameters():
            p.copy_(fsdp.like_param(_shard(files, name, files.get(name), p, model.ps), p))


def _load_optimizer(files: _TensorFiles, meta: dict, model, optimizer) -> None:
    """Rebuild a torch optimizer state_dict for this rank's parameters and load it (torch
    then casts the states to each parameter's device and dtype)."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = optimizer.state_dict()["param_groups"]
    saved = meta["optimizer"]["param_groups"]
    if len(saved) != len(current):
        raise ValueError(f"checkpoint {files.dir!r} has {len(saved)} optimizer param groups, "
                         f"this optimizer {len(current)}; build it with build_optimizer")
    if isinstance(optimizer, MainParamOptimizer):
        for name, p in model.named_parameters():
            if p.dtype != torch.float32:  # the fp32 main weight, not the rounded parameter
                optimizer.load_main_weight(p, _shard(files, name, files.get(name), p,
                                                     model.ps).float())
            saved_state = {k: files.get(f"{name}.{k}") for k in files.state_keys.get(name, [])}
            if saved_state:
                optimizer.load_full_state(p, {  # keeps this dp rank's range
                    k: v if v.dim() == 0 else _shard(files, f"{name}.{k}", v, p, model.ps)
                    for k, v in saved_state.items()})
        for group, hyper in zip(optimizer.param_groups, saved):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v
                          for k, v in hyper.items()})
        return
    state, groups = {}, []
    for group, indices, hyper in zip(optimizer.param_groups, current, saved):
        for p, index in zip(group["params"], indices["params"]):
            name = names[id(p)]  # build_optimizer's groups hold only model parameters
            saved_state = {k: files.get(f"{name}.{k}") for k in files.state_keys.get(name, [])}
            if saved_state:  # none: saved before the first step
                state[index] = {k: v if v.dim() == 0 else  # an FSDP shard of it for FSDP
                                fsdp.like_param(_shard(files, f"{name}.{k}", v, p, model.ps), p)
                                for k, v in saved_state.items()}
        hyper = {k: tuple(v) if isinstance(indices.get(k), tuple) else v
                 for k, v in hyper.items()}  # JSON turned AdamW's betas into a list
        groups.append({**hyper, "params": indices["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _continue_schedule(scheduler, optimizer) -> None:
    """The next step's lr is *this* run's schedule at the restored step, not the saved lr: a
    run resumed with a larger --steps follows its own warmup/decay from there on."""
    lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR (build_scheduler)
    if lambdas is None:
        return
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(lambdas, scheduler.base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _load_rng(meta: dict, ps) -> None:
    """Same tp, cp and pp: each rank restores its own streams (dp replicas share them), so a
    resume draws the same dropout masks. Another tp or pp: the per-TP-rank tracker streams
    do not map onto other shards; keep the freshly seeded ones and restore only the default
    stream, which model_parallel_seed starts identically on every rank (from rank 0)."""
    layout = meta["layout"]
    same = (layout["tp"], layout["pp"], layout.get("cp", 1)) == (ps.tp, ps.pp, ps.cp)
    src = global_rank(ps.tp_rank, ps.dp_rank if ps.dp_rank < layout["dp"] else 0,
                      ps.pp_rank, ps.tp, layout["dp"], ps.cp_rank, ps.cp) if same else 0
    path = os.path.join(meta["path"], _RNG_FILE.format(src))
    try:
        with safe_open(path, framework="pt") as f:
            states = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"corrupt checkpoint file {path!r} ({e}); load an earlier "
                         f"checkpoint or save again") from None
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and ps.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], ps.device)
    if same:
        get_rng_tracker().states.update({k[len("tracker."):]: v for k, v in states.items()
                                         if k.startswith("tracker.")})
