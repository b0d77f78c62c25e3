"""Checkpoints: exact resume, resharding across layouts, atomic saves, clear errors.

One gloo world of 4 trains the uninterrupted (tp=2, pp=2, dp=1) run, saving at step 3, then
resumes from that checkpoint in the same layout and at (tp=1, pp=2, dp=2) with the
distributed optimizer; the test process itself then resumes it as a single process. A world
of 8 does the same from a distributed-optimizer checkpoint at (2, 2, 2): resumed without it,
at (2, 1, 4) with it, and in one process. Every resumed run must continue with the
uninterrupted run's losses. That world also checks that its save and a save_hf stream: at
most one full tensor gathered onto the (simulated) device at a time, no tensor inside an
object message. Abandoned and corrupt checkpoints set aside stay bounded in number.
"""
import contextlib
import json
import os
import pickle
import shutil
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megalite import parallel
from megalite.models import GPT, GPTConfig, save_hf
from megalite.parallel import comm
from megalite.parallel.grad_buffer import GradBuffer
from megalite.parallel.random import get_rng_tracker
from megalite.training import checkpoint
from megalite.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megalite.training.checkpoint_dir import (SET_ASIDE_KEPT, find_resume_checkpoint,
                                              list_checkpoints)
from megalite.training.data import ShardedSampler, TokenDataset, get_batch
from megalite.training.optim import build_optimizer, build_scheduler
from megalite.training.step import train_step
from world import run_world

# Tied embeddings: at pp=2 the last stage's duplicate must load from `embed.weight`.
CFG = GPTConfig(vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch", tie_embeddings=True)
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS, SAVE_AT = 8, 2, 8, 6, 3
DATA_SEED = 5


def _token_file(directory) -> str:
    """A small megalite token file of random ids (64 samples of SEQ tokens)."""
    prefix = os.path.join(directory, "tokens")
    n = 64 * SEQ + 1
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, n).astype(np.uint16)
    ids.tofile(prefix + ".bin")
    with open(prefix + ".json", "w") as f:
        json.dump({"format": "megalite-tokens", "version": 1, "dtype": "uint16",
                   "num_tokens": n, "vocab_size": CFG.vocab_size}, f)
    return prefix


def _build(data, ps, model_seed=0, cfg=CFG, warmup=2, total_steps=STEPS, distributed=False):
    """Everything a training run holds; a different ``model_seed`` gives other weights, so a
    resume that failed to load them would show."""
    parallel.model_parallel_seed(model_seed, ps)
    model = GPT(cfg, state=ps)
    dataset = TokenDataset(data, SEQ)
    sampler = ShardedSampler(len(dataset), GLOBAL_BATCH, ps.dp_rank, ps.dp, seed=DATA_SEED)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1, distributed=distributed)
    sched = build_scheduler(opt, warmup_steps=warmup, total_steps=total_steps)
    return SimpleNamespace(model=model, opt=opt, sched=sched, sampler=sampler, dataset=dataset)


def _train(run, steps) -> list[float]:
    losses = []
    for _ in range(steps):
        tokens, targets = get_batch(run.dataset, run.sampler.next_batch_indices())
        device = run.model.ps.device
        result = train_step(run.model, run.opt, tokens.to(device), targets.to(device),
                            micro_batch_size=MICRO_BATCH, max_grad_norm=1.0)
        run.sched.step()
        losses.append(result.loss)
    return losses


def _save(root, step, run, **kw):
    return save_checkpoint(root, step, run.model, run.opt, run.sched, run.sampler, **kw)


def _load(path, run):
    return load_checkpoint(path, run.model, run.opt, run.sched, run.sampler)


def _world_resume_and_reshard(rank, world, data, root):
    ps = parallel.initialize(tp=2, pp=2, dp=1)
    run = _build(data, ps)
    losses = _train(run, SAVE_AT)
    path = _save(root, SAVE_AT, run, extra={"args": {"tp": 2, "pp": 2}})
    rng_at_save = torch.get_rng_state()
    losses += _train(run, STEPS - SAVE_AT)  # the uninterrupted run

    fresh = _build(data, ps, model_seed=1)
    assert _load(latest_checkpoint(root), fresh) == SAVE_AT
    assert torch.equal(torch.get_rng_state(), rng_at_save), "CPU RNG not restored"
    resumed = _train(fresh, STEPS - SAVE_AT)

    ps = parallel.initialize(tp=1, pp=2, dp=2)
    other = _build(data, ps, model_seed=2, distributed=True)
    assert _load(path, other) == SAVE_AT
    resharded = _train(other, STEPS - SAVE_AT)

    # One rank (stage 1's writer at (1,2,2)) fails mid-save: every rank raises instead of
    # hanging, and `latest` still names the good checkpoint.
    if rank == 2:
        checkpoint.save_file = _disk_full
    with pytest.raises((OSError, RuntimeError), match="simulated crash|failed on rank"):
        _save(root, STEPS, other)
    assert latest_checkpoint(root) == path
    return losses, resumed, resharded, path


class _OnDevice(torch.Tensor):
    """Stands in a CPU test for a tensor on a GPU: moving it to the host copies it, and the
    bytes of every live one are tracked (distinct storages; ops on one make more of them)."""
    live: dict = {}   # id -> weak reference (tensors compare elementwise: no WeakSet)
    peak_bytes = 0

    @classmethod
    def _track(cls, t):
        if id(t) not in cls.live:
            cls.live[id(t)] = weakref.ref(t, lambda _, key=id(t): cls.live.pop(key, None))
        with torch._C.DisableTorchFunctionSubclass():
            storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()
                        for x in (r() for r in list(cls.live.values())) if x is not None}
        cls.peak_bytes = max(cls.peak_bytes, sum(storages.values()))

    @classmethod
    def adopt(cls, t):
        t = t.as_subclass(cls)
        cls._track(t)
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, cls):
                cls._track(t)
        return out

    def to(self, *args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.to(self, *args, **kwargs).clone()

    def cpu(self):
        return self.to("cpu")


@contextlib.contextmanager
def _gathers_on_device():
    """Every tensor a save gathers (over TP, over dp for a sharded optimizer) becomes an
    _OnDevice; yields the peak bytes of those alive at once."""
    real_gather, real_gather_dp = comm.all_gather, GradBuffer.gather_dp
    comm.all_gather = lambda *a, **k: _OnDevice.adopt(real_gather(*a, **k))
    GradBuffer.gather_dp = lambda self, *a: _OnDevice.adopt(real_gather_dp(self, *a))
    _OnDevice.peak_bytes = 0
    result = SimpleNamespace()
    try:
        yield result
    finally:
        comm.all_gather, GradBuffer.gather_dp = real_gather, real_gather_dp
        result.peak_bytes = _OnDevice.peak_bytes


@contextlib.contextmanager
def _object_messages():
    """The largest pickled payload of any object collective inside the block."""
    names = ("gather_object", "all_gather_object", "broadcast_object_list")
    real = {n: getattr(dist, n) for n in names}
    result = SimpleNamespace(largest=0)

    def recording(name):
        def call(obj, *args, **kwargs):
            result.largest = max(result.largest, len(pickle.dumps(obj)))
            return real[name](obj, *args, **kwargs)
        return call
    for n in names:
        setattr(dist, n, recording(n))
    try:
        yield result
    finally:
        for n in names:
            setattr(dist, n, real[n])


def _world_distributed_optimizer_checkpoint(rank, world, data, root):
    ps = parallel.initialize(tp=2, pp=2, dp=2)
    run = _build(data, ps, distributed=True)
    losses = _train(run, SAVE_AT)
    # Saving never holds a stage's model or optimizer state on the device: one full tensor
    # is gathered at a time (its dp-gathered shard, the all-gather's buffers and the copy
    # that reorders q|k|v segments; the previous shard may still be referenced: < 4x the
    # largest tensor; before streaming, 30x), and pipeline stages reach the writer one
    # tensor per message, never inside an object message.
    largest = max(p.numel() * ps.tp for p in run.model.parameters()) * 4
    with _gathers_on_device() as saving, _object_messages() as messages:
        path = _save(root, SAVE_AT, run)
    assert saving.peak_bytes < 4 * largest, (saving.peak_bytes, largest)
    with _gathers_on_device() as exporting, _object_messages() as exporting_messages:
        save_hf(run.model, os.path.join(root, "..", "hf"))
    assert exporting.peak_bytes < 4 * largest, (exporting.peak_bytes, largest)
    assert max(messages.largest, exporting_messages.largest) < largest, \
        (messages.largest, exporting_messages.largest, largest)
    losses += _train(run, STEPS - SAVE_AT)  # the uninterrupted run
    plain = _build(data, ps, model_seed=1)
    assert _load(path, plain) == SAVE_AT
    resumed_plain = _train(plain, STEPS - SAVE_AT)
    ps = parallel.initialize(tp=2, pp=1, dp=4)
    other = _build(data, ps, model_seed=2, distributed=True)
    assert _load(path, other) == SAVE_AT
    return losses, resumed_plain, _train(other, STEPS - SAVE_AT)


def _check_single_process_continues(data, root, expected, saved_as):
    """This process alone, (1, 1, 1), loads the checkpoint and continues the curve."""
    ps = parallel.initialize()
    try:
        single = _build(data, ps, model_seed=3)
        assert _load(root, single) == SAVE_AT
        continued = _train(single, STEPS - SAVE_AT)
    finally:
        parallel.destroy()
    assert np.allclose(continued, expected, rtol=0, atol=1e-5), \
        f"(1,1,1) after loading {saved_as} checkpoint: {continued} vs {expected}"


def test_distributed_optimizer_checkpoint_resumes_anywhere(tmp_path):
    data, root = _token_file(tmp_path), str(tmp_path / "ckpt")
    losses, resumed_plain, resharded = run_world(
        8, _world_distributed_optimizer_checkpoint, data, root, timeout=300)[0]
    expected = losses[SAVE_AT:]
    for name, curve in (("(2,2,2) without the distributed optimizer", resumed_plain),
                        ("(2,1,4) distributed", resharded)):
        assert np.allclose(curve, expected, rtol=0, atol=1e-5), \
            f"{name} after loading a distributed (2,2,2) checkpoint: {curve} vs {expected}"
    _check_single_process_continues(data, root, expected, "a distributed (2,2,2)")


def _disk_full(tensors, path, metadata=None):
    raise OSError("simulated crash: disk full")


def test_resume_and_reshard(tmp_path):
    data, root = _token_file(tmp_path), str(tmp_path / "ckpt")
    results = run_world(4, _world_resume_and_reshard, data, root, timeout=240)
    losses, resumed, resharded, path = results[0]
    expected = losses[SAVE_AT:]
    # Same layout: the same arithmetic on the same state, so the very same numbers.
    assert resumed == expected, f"resumed {resumed} != uninterrupted {expected}"
    assert np.allclose(resharded, expected, rtol=0, atol=1e-5), \
        f"(1,2,2) distributed after loading a (2,2,1) checkpoint: {resharded} vs {expected}"

    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["layout"] == {"tp": 2, "pp": 2, "dp": 1, "cp": 1, "ep": 1, "world_size": 4}
    assert meta["extra"] == {"args": {"tp": 2, "pp": 2}}
    assert sorted(meta["files"]) == ["model_stage0.safetensors", "model_stage1.safetensors",
                                     "optim_stage0.safetensors", "optim_stage1.safetensors"]
    # The tied embedding is saved once (by stage 0), whole: vocab_size rows, no padding.
    assert "embed.weight" not in meta["files"]["model_stage1.safetensors"]
    assert load_file(os.path.join(path, "model_stage0.safetensors"))["embed.weight"].shape \
        == (CFG.vocab_size, CFG.d_model)

    _check_single_process_continues(data, root, expected, "a (2,2,1)")


# ---------------------------------------------------------------------- dropout

DROPOUT = CFG.replace(dropout=0.2)


def _world_dropout_resume(rank, world, data, root):
    """tp=2 with dropout 0.2: with sequence parallelism (residual-stream masks from each TP
    rank's tracker stream) and without (every mask from the default stream)."""
    ps = parallel.initialize(tp=2, pp=1, dp=1)
    curves = {}
    for name, cfg in (("sp", DROPOUT.replace(sequence_parallel=True)), ("plain", DROPOUT)):
        run = _build(data, ps, cfg=cfg)
        losses = _train(run, SAVE_AT)
        path = _save(os.path.join(root, name), SAVE_AT, run)
        losses += _train(run, STEPS - SAVE_AT)  # the uninterrupted run
        fresh = _build(data, ps, model_seed=1, cfg=cfg)
        _load(path, fresh)
        curves[name] = (losses, _train(fresh, STEPS - SAVE_AT), path)
    return curves


def test_dropout_resumes_exactly_with_sequence_parallelism_and_reshards_as_documented(
        tmp_path):
    """What a checkpoint restores of the random streams (docs/training.md, "RNG states"):

    - same layout: every rank's default stream and TP-tracker streams, so a resume at
      tp=2 with sequence parallelism and dropout 0.2 has the uninterrupted losses exactly;
    - another layout: the default stream of global rank 0, and the tracker streams as
      ``model_parallel_seed`` makes them (seed + 2718 + 100 pp_rank + tp_rank: checked here
      against a fresh torch.Generator). Without sequence parallelism every dropout mask
      comes from the default stream, identical on all TP ranks, so tp=2 -> one process
      continues the uninterrupted curve (up to float reassociation); with it, the TP-region
      masks of the new layout have no counterpart in the old one and the losses differ.

    Breakages checked: dropping the tracker-stream restore in checkpoint._load_rng, or the
    CPU-state restore, fails the exact resume; restoring the tracker streams across layouts
    fails the reshard's stream check."""
    data, root = _token_file(tmp_path), str(tmp_path / "ckpt")
    curves = run_world(2, _world_dropout_resume, data, root, timeout=240)[0]
    for name, (losses, resumed, _) in curves.items():
        assert resumed == losses[SAVE_AT:], f"{name}: resumed {resumed} != {losses[SAVE_AT:]}"
    # Dropout is on: the two runs (same weights and data, other masks) differ by more than
    # float reassociation does (< 1e-5, the reshard tests' bound; 1.4e-4 at step 1 here).
    assert max(abs(a - b) for a, b in zip(curves["sp"][0], curves["plain"][0])) > 1e-5

    ps = parallel.initialize()
    try:
        plain = _build(data, ps, model_seed=3, cfg=DROPOUT)
        _load(curves["plain"][2], plain)
        continued = _train(plain, STEPS - SAVE_AT)

        seed = 7
        sp = _build(data, ps, model_seed=seed, cfg=DROPOUT.replace(sequence_parallel=True))
        _load(curves["sp"][2], sp)
        saved = load_file(os.path.join(curves["sp"][2], "rng_rank00000.safetensors"))
        assert torch.equal(torch.get_rng_state(), saved["cpu"])
        fresh = torch.Generator().manual_seed(seed + 2718)
        assert torch.equal(get_rng_tracker().states["tensor-parallel"], fresh.get_state())
        assert not torch.equal(saved["tracker.tensor-parallel"], fresh.get_state())
    finally:
        parallel.destroy()
    expected = curves["plain"][0][SAVE_AT:]
    assert np.allclose(continued, expected, rtol=0, atol=1e-5), (continued, expected)


# --------------------------------------------------------------------- single process

@pytest.fixture
def single(tmp_path):
    """A single-process untied run, trained one step and saved at step 1."""
    ps = parallel.initialize()
    data = _token_file(tmp_path)
    run = _build(data, ps, cfg=CFG.replace(tie_embeddings=False))
    _train(run, 1)
    root = str(tmp_path / "ckpt")
    run.saved = _save(root, 1, run)
    run.root, run.data, run.ps = root, data, ps
    yield run
    parallel.destroy()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_killed_save_leaves_previous_checkpoint(single, monkeypatch):
    weights_at_1 = _params(single.model)
    _train(single, 1)
    calls = []

    def dies_after_first_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("simulated crash: disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", dies_after_first_file)
    with pytest.raises(OSError, match="simulated crash"):
        _save(single.root, 2, single)
    monkeypatch.undo()

    entries = sorted(os.listdir(single.root))
    leftovers = [e for e in entries if e.startswith("step_00000002")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0], entries
    assert open(os.path.join(single.root, "latest")).read().strip() == "step_00000001"
    # A directory that looks finished but has no meta.json does not count either.
    os.makedirs(os.path.join(single.root, "step_00000009"))
    assert latest_checkpoint(single.root) == single.saved

    fresh = _build(single.data, single.ps, model_seed=7, cfg=single.model.cfg)
    assert _load(single.root, fresh) == 1
    for name, value in _params(fresh.model).items():
        assert torch.equal(value, weights_at_1[name]), name
    assert fresh.sampler.consumed_samples == GLOBAL_BATCH
    # Resumed under another schedule (--steps 20 --warmup 4): the next lr is the new
    # schedule's at step 1 (warmup 2/4 of the peak), not the saved one (the full peak).
    longer = _build(single.data, single.ps, cfg=single.model.cfg, warmup=4, total_steps=20)
    _load(single.root, longer)
    assert [g["lr"] for g in longer.opt.param_groups] == [0.5 * 3e-3] * 2

    # The next good save publishes step 2 and deletes the interrupted one's leftovers.
    path = _save(single.root, 2, single)
    assert latest_checkpoint(single.root) == path
    assert not [e for e in os.listdir(single.root) if ".tmp-" in e]
    assert latest_checkpoint(path) == path  # a checkpoint directory is its own latest


def test_clear_errors(single, tmp_path):
    def load_into(path, cfg=single.model.cfg):
        return _load(path, _build(single.data, single.ps, cfg=cfg))

    with pytest.raises(ValueError, match="does not exist"):
        load_into(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_into(str(tmp_path / "empty"))
    assert latest_checkpoint(str(tmp_path / "empty")) is None
    assert latest_checkpoint(str(tmp_path / "nowhere")) is None

    with pytest.raises(ValueError, match=r"another model: d_model=32 \(model: 64\)"):
        load_into(single.root, cfg=single.model.cfg.replace(d_model=64))
    with pytest.raises(ValueError, match="n_layers=4 .*tie_embeddings=False"):
        load_into(single.root, cfg=single.model.cfg.replace(n_layers=2, tie_embeddings=True))

    def broken(name, damage):
        path = str(tmp_path / name)
        shutil.copytree(single.saved, path)
        damage(path)
        return path

    model_file = "model_stage0.safetensors"

    def truncate(path):
        with open(os.path.join(path, model_file), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)

    def garbage(path):
        with open(os.path.join(path, model_file), "wb") as f:
            f.write(os.urandom(1000))

    def drop_tensor(path):
        tensors = load_file(os.path.join(path, model_file))
        del tensors["final_norm.weight"]
        save_file(tensors, os.path.join(path, model_file))

    # The checksums in meta.json catch damage before any tensor is read...
    for name, damage, message in [
            ("truncated", truncate, "truncated' is corrupt: model_stage0.safetensors has "
                                    r"\d+ bytes, meta.json says \d+"),
            ("garbage", garbage, "garbage' is corrupt: model_stage0.safetensors has 1000 "
                                 "bytes"),
            ("no_tensor", drop_tensor, "no_tensor' is corrupt: model_stage0.safetensors "
                                       "(does not match its sha256|has)"),
            ("missing", lambda p: os.remove(os.path.join(p, "optim_stage0.safetensors")),
             "missing' is corrupt: optim_stage0.safetensors is missing"),
            ("no_meta", lambda p: os.remove(os.path.join(p, "meta.json")),
             "no_meta.*no complete checkpoint"),
            ("bad_meta", lambda p: open(os.path.join(p, "meta.json"), "w").write("{oops"),
             "corrupt checkpoint metadata .*bad_meta")]:
        with pytest.raises(ValueError, match=message):
            load_into(broken(name, damage))
    # ... and without them (verify=False, or a checkpoint saved before checksums existed)
    # reading the damaged file still fails clearly.
    for name, message in [("truncated", "corrupt checkpoint file .*truncated.*model_stage0"),
                          ("garbage", "corrupt checkpoint file .*garbage.*model_stage0"),
                          ("no_tensor", "no_tensor.*final_norm.weight")]:
        run = _build(single.data, single.ps, cfg=single.model.cfg)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(str(tmp_path / name), run.model, run.opt, run.sched, run.sampler,
                            verify=False)


def test_set_aside_checkpoints_stay_bounded(single):
    """Abandoned histories and corrupt checkpoints are set aside for inspection, but only
    the newest few stay: SET_ASIDE_KEPT when every checkpoint is kept, K with keep_last=K."""
    root = single.root

    def set_aside():
        return sorted(d for d in os.listdir(root) if ".abandoned-" in d or ".corrupt-" in d)

    for _ in range(4):  # a run restarted from step 1 again and again abandons step 2
        _save(root, 2, single)
        _save(root, 1, single)
    path = _save(root, 2, single)
    with open(os.path.join(path, "model_stage0.safetensors"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert find_resume_checkpoint(root, set_aside=True, warn=lambda *a, **k: None) \
        == os.path.join(root, "step_00000001")
    corrupt = [d for d in set_aside() if ".corrupt-" in d]
    assert len(corrupt) == 1, set_aside()
    _save(root, 2, single)
    kept = set_aside()
    assert len(kept) == SET_ASIDE_KEPT and corrupt[0] in kept, kept
    _save(root, 3, single, keep_last=1)
    assert set_aside() == corrupt and [s for s, _ in list_checkpoints(root)] == [3]
    assert not [d for d in os.listdir(root) if ".old-" in d or ".tmp-" in d]
