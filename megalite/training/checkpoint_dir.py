"""The checkpoint directory: which checkpoints exist, which is newest, whether one is
intact, and keeping the directory tidy.

``ROOT/step_XXXXXXXX/`` is a checkpoint once its meta.json exists (checkpoint.py writes it
last, then publishes the directory with one rename); ``ROOT/latest`` names the newest one.
Three promises hold for a run that saves into ROOT:

* the newest complete step directory is the one to resume from, and ``latest`` names it:
  nothing newer than it stays beside it (older histories are set aside or removed);
* every file's sha256 and size are in meta.json, and :func:`verify_checkpoint` checks them;
  :func:`find_resume_checkpoint` skips a corrupt or incomplete newest checkpoint, with a
  warning, for the previous intact one;
* :func:`prune_checkpoints` keeps the newest K checkpoints, and the newest K directories set
  aside for inspection (``step_XXXXXXXX.abandoned-<id>``, ``.corrupt-<id>``; K =
  ``SET_ASIDE_KEPT`` when every checkpoint is kept), so neither grows without bound.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid

import torch

from megalite.parallel.comm import all_gather_object

FORMAT, VERSION = "megalite-checkpoint", 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Leftovers of interrupted saves and of replaced or pruned steps: deleted by the next save.
_LEFTOVER = re.compile(r"^(step_\d{8}\.(tmp|old)|latest\.tmp)-[0-9a-f]+$")
# Checkpoints set aside (a later, abandoned history; a corrupt newest one): kept for a look.
_SET_ASIDE = re.compile(r"^step_\d{8}\.(abandoned|corrupt)-[0-9a-f]+$")
SET_ASIDE_KEPT = 2  # how many set-aside directories a run that keeps every checkpoint keeps


# ----------------------------------------------------------------------------- files

def _fsync(path: str) -> None:
    """Flush a file or directory to disk, so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
    _fsync(tmp)
    os.replace(tmp, path)


def file_checksum(path: str) -> dict:
    """{"sha256": hex digest, "bytes": size}: read back from the file, so what is recorded
    is what a later load will read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint (one with meta.json) under ``root``,
    oldest first. Interrupted saves (``*.tmp-*``, no meta.json) never count."""
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root)
                  if (m := _STEP_DIR.match(d))
                  and os.path.isfile(os.path.join(root, d, "meta.json")))


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one);
    None when there is none. Directories without meta.json (interrupted saves) never count.
    The highest complete step wins over the ``latest`` pointer, which can lag behind after
    a crash between a checkpoint's rename and the pointer's update."""
    if os.path.isfile(os.path.join(root, "meta.json")):
        return root
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_checkpoint_meta(path: str) -> dict:
    """meta.json of a checkpoint (or of the newest one under a root): step, layout, config
    (``GPTConfig(**meta["config"])`` rebuilds the model), extra, ..."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the directory given to "
                         f"--save (or one of its step_XXXXXXXX subdirectories)")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path!r} holds no complete checkpoint (no meta.json in it or in a "
                         f"step_XXXXXXXX below it; killed saves leave only *.tmp-* dirs)")
    meta_path = os.path.join(ckpt, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"this megalite reads {FORMAT!r} version {VERSION}")
        missing = {"step", "layout", "config", "files", "optimizer", "scheduler"} - set(meta)
        if missing:
            raise ValueError(f"no {sorted(missing)} entries")
    except (ValueError, OSError, AttributeError) as e:
        raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: {e}") from None
    meta["path"] = ckpt
    return meta


def verify_checkpoint(path: str) -> list[str]:
    """Check the files of a checkpoint (a step directory) against the sizes and sha256
    digests in its meta.json. Collective: the files are split over the ranks, and every
    rank returns the same list of problems (empty: intact). Checkpoints written before
    checksums were recorded are checked for presence and size only where known."""
    problems, mine = [], []
    try:
        meta = read_checkpoint_meta(path)
        sums = meta.get("checksums") or {}
        names = sorted(set(meta["files"]) | set(meta.get("rng_files", [])) | set(sums))
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        mine = names[rank::world]
    except (ValueError, OSError, KeyError) as e:
        problems.append(str(e))
    for name in mine:
        file = os.path.join(meta["path"], name)
        expected = sums.get(name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif expected and os.path.getsize(file) != expected["bytes"]:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, meta.json says "
                            f"{expected['bytes']}")
        elif expected and file_checksum(file)["sha256"] != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 in meta.json")
    found = sorted({p for rank_problems in all_gather_object(problems) for p in rank_problems})
    return found


def prune_checkpoints(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep them all), and
    all but the newest ``keep_last`` (or ``SET_ASIDE_KEPT``) set-aside directories, newest
    by when they were set aside; returns the deleted paths. Call on one rank."""
    found = list_checkpoints(root)
    doomed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    set_aside = sorted((os.path.join(root, d) for d in os.listdir(root) if _SET_ASIDE.match(d)),
                       key=lambda path: (os.stat(path).st_ctime, path))  # a rename sets ctime
    doomed += set_aside[:-(keep_last or SET_ASIDE_KEPT)]
    for path in doomed:
        # Rename first, so a crash mid-delete never leaves a step directory that looks
        # complete but lacks files.
        step_dir = os.path.basename(path)[:len("step_00000000")]
        trash = os.path.join(root, f"{step_dir}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- resuming

def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    all_gather_object(None)


def find_resume_checkpoint(path: str, set_aside: bool = False, warn=print) -> str | None:
    """The newest intact checkpoint under ``path`` (a root, or a step directory which is
    then the only candidate); None when there is none. A corrupt or incomplete candidate
    is skipped with a warning naming what is wrong (never silently); with ``set_aside``
    (the run's own --save directory) rank 0 renames it to ``step_XXXXXXXX.corrupt-<id>``,
    kept for inspection, so that `latest` can name the one resumed from. Collective: every
    rank gets the same answer (rank 0 lists the directory for all)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        candidates = [path]
    else:
        candidates = all_gather_object([p for _, p in reversed(list_checkpoints(path))])[0]
    for i, candidate in enumerate(candidates):
        problems = verify_checkpoint(candidate)
        if not problems:
            if i and set_aside and _rank() == 0:
                _write_atomic(os.path.join(path, "latest"), os.path.basename(candidate) + "\n")
            return candidate
        following = candidates[i + 1] if i + 1 < len(candidates) else None
        if _rank() == 0:
            warn(f"warning: checkpoint {candidate} is corrupt or incomplete "
                 f"({'; '.join(problems)}); "
                 + (f"falling back to {following}" if following else "no earlier checkpoint"),
                 flush=True)
            if set_aside:
                try:
                    os.rename(candidate, f"{candidate}.corrupt-{uuid.uuid4().hex[:8]}")
                except OSError as e:
                    warn(f"warning: could not set {candidate} aside: {e}", flush=True)
        _barrier()
    return None


def remove_checkpoints(root: str, after_step: int = -1) -> list[str]:
    """Delete the checkpoints (complete or interrupted) of steps after ``after_step`` (all
    by default): a fresh start in a directory an earlier run saved into. Call on one rank;
    returns the deleted step directories."""
    if not os.path.isdir(root):
        return []
    doomed = sorted(d for d in os.listdir(root)
                    if (m := re.match(r"^step_(\d{8})", d)) and int(m.group(1)) > after_step)
    for name in doomed:
        shutil.rmtree(os.path.join(root, name))
    remaining = list_checkpoints(root)
    pointer = os.path.join(root, "latest")
    if remaining:
        _write_atomic(pointer, os.path.basename(remaining[-1][1]) + "\n")
    elif os.path.exists(pointer):
        os.remove(pointer)
    return [os.path.join(root, d) for d in doomed if _STEP_DIR.match(d)]
