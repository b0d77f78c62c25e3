"""Where ``from_hf`` reads Hugging Face weights from: a ``save_pretrained`` directory
(safetensors or ``.bin``, single or sharded with an index) or in-memory tensors.

Every source answers ``shape(key)`` without reading and ``read(key, dim, start, stop)``:
the rows (dim 0) or columns (dim 1) a rank needs. Safetensors files are read with plain
file reads into the returned tensor, never memory-mapped, so a rank's resident memory
holds the slices it asked for, not the pages of every tensor it touched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct

import torch

from megalite.models.hf_config import as_dict

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_BLOCK_BYTES = 16 * 2**20   # a column slice is read this many bytes of whole rows at a time


class SafetensorsFile:
    """Reads tensors, or slices of them, from a .safetensors file (header: 8-byte length,
    JSON of {key: dtype, shape, data_offsets}; then the raw little-endian data)."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        (n,) = struct.unpack("<Q", self._file.read(8))
        self._header = {k: v for k, v in json.loads(self._file.read(n)).items()
                        if k != "__metadata__"}
        self._data = 8 + n

    def close(self):
        self._file.close()

    def keys(self):
        return self._header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def read(self, key: str, dim: int | None = None, start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        info = self._header[key]
        shape, dtype = list(info["shape"]), _DTYPES[info["dtype"]]
        base = self._data + info["data_offsets"][0]
        if dim is None or not shape:
            return self._read_into(torch.empty(shape, dtype=dtype), base)
        stop = shape[dim] if stop is None else stop
        rows = math.prod(shape[1:]) * dtype.itemsize      # bytes of one dim-0 row
        if dim == 0:
            out = torch.empty([stop - start, *shape[1:]], dtype=dtype)
            return self._read_into(out, base + start * rows)
        if dim != 1:
            raise ValueError(f"{key}: slices along dim {dim} are not supported")
        out = torch.empty([shape[0], stop - start, *shape[2:]], dtype=dtype)
        step = max(1, _BLOCK_BYTES // max(rows, 1))
        for first in range(0, shape[0], step):
            block = torch.empty([min(step, shape[0] - first), *shape[1:]], dtype=dtype)
            self._read_into(block, base + first * rows)
            out[first:first + len(block)] = block[:, start:stop]
        return out

    def _read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else b""
        self._file.seek(offset)
        if out.numel() and self._file.readinto(view) != len(view):
            raise ValueError(f"{self.path}: truncated tensor data")
        return out


class BinFile:
    """A pytorch_model.bin with SafetensorsFile's interface (memory-mapped, tensors only)."""

    def __init__(self, path: str):
        self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def close(self):
        pass

    def keys(self):
        return self._sd.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def read(self, key, dim=None, start=0, stop=None) -> torch.Tensor:
        return _narrow(self._sd[key], dim, start, stop)


def _narrow(t: torch.Tensor, dim, start, stop) -> torch.Tensor:
    if dim is None:
        return t
    stop = t.shape[dim] if stop is None else stop
    return t.narrow(dim, start, stop - start)


class Tensors:
    """HF tensors by key, read on demand so each rank loads only its stage's weights (and
    of those only its TP slice)."""

    def __init__(self, where: dict):
        self._where = where          # key -> an object with shape() and read()

    @classmethod
    def in_memory(cls, state_dict: dict) -> "Tensors":
        source = _Memory(state_dict)
        return cls(dict.fromkeys(state_dict, source))

    def _key(self, key: str) -> str:
        if key not in self._where:
            # Bare LlamaModel / GPT2Model state dicts lack the "model." / "transformer." prefix.
            short = key.split(".", 1)[1] if key.startswith(("model.", "transformer.")) else None
            if short not in self._where:
                raise KeyError(key)
            key = short
        return key

    def shape(self, key: str) -> tuple[int, ...]:
        key = self._key(key)
        return self._where[key].shape(key)

    def get(self, key: str, dim: int | None = None, start: int = 0,
            stop: int | None = None) -> torch.Tensor:
        key = self._key(key)
        return self._where[key].read(key, dim, start, stop)


class _Memory:
    def __init__(self, state_dict):
        self._sd = state_dict

    def shape(self, key):
        return tuple(self._sd[key].shape)

    def read(self, key, dim=None, start=0, stop=None):
        return _narrow(self._sd[key], dim, start, stop)


def open_directory(path: str, stack: contextlib.ExitStack) -> tuple[dict, Tensors]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} has no config.json: pass a local save_pretrained directory "
                         f"(hub ids are not downloaded), or a state dict with config=...")
    present = set(os.listdir(path))
    index = next((n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if n in present), None)
    single = next((n for n in ("model.safetensors", "pytorch_model.bin") if n in present), None)
    if index is None and single is None:
        raise ValueError(f"{path} holds no model.safetensors or pytorch_model.bin weights")
    if index is not None:   # sharded checkpoint: key -> file name
        with open(os.path.join(path, index)) as f:
            names = json.load(f)["weight_map"]
    else:
        names = None
    opened = {}

    def open_file(name):
        if name not in opened:
            full = os.path.join(path, name)
            reader = SafetensorsFile(full) if name.endswith(".safetensors") else BinFile(full)
            opened[name] = reader
            stack.callback(reader.close)
        return opened[name]

    if names is None:
        names = dict.fromkeys(open_file(single).keys(), single)
    # Files open lazily: a pipeline stage never opens the shards holding no tensor of its.
    files = {n: _Lazy(open_file, n) for n in set(names.values())}
    return as_dict(config_path), Tensors({k: files[n] for k, n in names.items()})


class _Lazy:
    def __init__(self, open_file, name):
        self._open, self._name = open_file, name

    def shape(self, key):
        return self._open(self._name).shape(key)

    def read(self, key, dim=None, start=0, stop=None):
        return self._open(self._name).read(key, dim, start, stop)
