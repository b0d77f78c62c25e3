"""Token files, fixed-length samples over them, blends of several, held-out splits.

A token file is PREFIX.bin (the corpus's token ids back to back, uint16 or uint32, native
little-endian) plus PREFIX.json (metadata; see `read_metadata`). Make one with

    python -m megalite.training.preprocess --input docs/*.txt --output data/mycorpus

`TokenDataset` cuts the token stream into samples, `open_data` opens what ``--data`` names
(one prefix or ``W1 PREFIX1 W2 PREFIX2 ...``) as a `DataBlend`, optionally holding out the
end of each dataset for validation; `ShardedSampler` (in :mod:`megalite.training.sampler`)
decides which samples each dp rank trains on at each step, `get_batch` stacks them.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from megalite.training.sampler import ShardedSampler, normalized_weights  # noqa: F401

FORMAT = "megalite-tokens"
FORMAT_VERSION = 1


def token_dtype(vocab_size):
    """uint16 holds ids 0..65535, so any vocabulary of up to 2**16 tokens; else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def default_corpus_path():
    """Prefix of the byte-level corpus bundled with megalite (Python stdlib docstrings, ~1 MB)."""
    return str(Path(__file__).resolve().parent.parent / "data" / "corpus")


def _prefix(path):
    """Accept PREFIX, PREFIX.bin or PREFIX.json."""
    path = str(path)
    for ext in (".bin", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def read_metadata(path):
    """Read and check PREFIX.json against PREFIX.bin; returns the metadata dict.

    Keys: format, version, dtype ("uint16"|"uint32"), num_tokens, num_documents, tokenizer
    (the spec), vocab_size, eos_id, append_eos, sources.
    """
    prefix = _prefix(path)
    bin_path, meta_path = Path(prefix + ".bin"), Path(prefix + ".json")
    for p in (bin_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"token file {str(p)!r} not found. Create it with: python -m "
                f"megalite.training.preprocess --input YOUR_TEXT_FILES --output {prefix}")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        num_tokens = int(meta["num_tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt token metadata {str(meta_path)!r} ({type(e).__name__}: "
                         f"{e}); re-run megalite.training.preprocess to rebuild it") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{str(meta_path)!r} is not a {FORMAT} v{FORMAT_VERSION} file "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r}); "
                         "re-run megalite.training.preprocess to rebuild it")
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"{str(meta_path)!r}: dtype must be uint16 or uint32, got {dtype}")
    expected = num_tokens * dtype.itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        # Usually an interrupted preprocess or a .bin/.json pair from different runs.
        raise ValueError(
            f"{str(bin_path)!r} has {actual} bytes but {str(meta_path)!r} says {num_tokens} "
            f"{dtype} tokens ({expected} bytes); the pair is truncated or mismatched, "
            "re-run megalite.training.preprocess")
    return meta


class TokenDataset:
    """Fixed-length samples over a memory-mapped token file.

    Sample i reads the seq_len + 1 tokens starting at i * seq_len: the inputs are the first
    seq_len, the targets the same window shifted by one. Consecutive samples' inputs tile the
    stream without overlap (sample i's last target is sample i+1's first input); the tail
    that does not fill a window is unused. Items are (tokens, targets), int64 [seq_len].
    """

    def __init__(self, path, seq_len):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.prefix = _prefix(path)
        self.meta = read_metadata(self.prefix)
        self.seq_len = seq_len
        self.vocab_size = int(self.meta["vocab_size"])
        num_tokens = int(self.meta["num_tokens"])
        self.num_samples = (num_tokens - 1) // seq_len if num_tokens else 0
        if self.num_samples < 1:
            raise ValueError(f"{self.prefix}.bin has {num_tokens} tokens, too few for one "
                             f"sample of seq_len + 1 = {seq_len + 1}; use a smaller --seq-len "
                             "or more text")
        # A read-only memmap: the OS pages in only what is read, and many processes on one
        # node share the page cache instead of each holding a copy of the corpus.
        self._open()

    def _open(self):
        self.tokens = np.memmap(self.prefix + ".bin", dtype=self.meta["dtype"], mode="r",
                                shape=(int(self.meta["num_tokens"]),))

    # Pickling a memmap copies the whole array; send worker processes (e.g. DataLoader with
    # num_workers > 0 under spawn) the path instead and let them map the file themselves.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start: start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


def get_batch(dataset, indices):
    """Stack samples: (tokens [b, seq_len], targets [b, seq_len]), int64."""
    if len(indices) == 0:
        raise ValueError("get_batch needs at least one index")
    tokens, targets = zip(*(dataset[i] for i in indices))
    return torch.stack(tokens), torch.stack(targets)


class SampleRange:
    """Samples [start, stop) of a dataset, numbered from 0: the training or the held-out
    part of a token file."""

    def __init__(self, dataset, start, stop):
        if not 0 <= start < stop <= len(dataset):
            raise ValueError(f"sample range [{start}, {stop}) is empty or outside the "
                             f"dataset's {len(dataset)} samples")
        self.dataset, self.start, self.stop = dataset, start, stop
        self.prefix, self.meta = dataset.prefix, dataset.meta

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return self.dataset[self.start + i]


def split_heldout(dataset, fraction):
    """(training part, held-out part) of ``dataset``: the last floor(fraction * samples)
    samples are held out. The parts share no target token (the training part's last target
    is the held-out part's first input token, never one of its targets)."""
    held = math.floor(len(dataset) * fraction)
    if held < 1 or held >= len(dataset):
        raise ValueError(f"--eval-split {fraction} of {dataset.prefix}'s {len(dataset)} "
                         f"samples holds out {held}; give a fraction that holds out at least "
                         "one sample and keeps at least one for training")
    cut = len(dataset) - held
    return SampleRange(dataset, 0, cut), SampleRange(dataset, cut, len(dataset))


def parse_data_spec(values):
    """``--data`` (or ``--eval-data``) values -> (weights, prefixes): ``[PREFIX]`` (weight 1)
    or ``[W1, PREFIX1, W2, PREFIX2, ...]`` (Megatron's syntax); None or [] is the bundled
    corpus. Raises ValueError naming the mistake."""
    if isinstance(values, str):
        values = [values]
    values = list(values or [default_corpus_path()])
    if len(values) == 1:
        return [1.0], values
    if len(values) % 2:
        raise ValueError(f"give one PREFIX or WEIGHT PREFIX pairs, got {len(values)} values "
                         f"({' '.join(values)})")
    weights, prefixes = [], []
    for weight, prefix in zip(values[::2], values[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"expected a weight before {prefix!r}, got {weight!r} (WEIGHT "
                             f"PREFIX pairs, e.g. 0.7 data/web 0.3 data/code)") from None
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"weight {weight} of {prefix!r} must be a positive number")
        weights.append(w)
        prefixes.append(prefix)
    return weights, prefixes


def check_same_tokenizer(metas, names):
    """Blended (and evaluated) token files must come from one tokenizer: the same ids mean
    the same text. Raises ValueError naming the two that differ."""
    first = metas[0]
    for name, meta in zip(names[1:], metas[1:]):
        if (meta.get("tokenizer"), meta["vocab_size"]) != (first.get("tokenizer"),
                                                          first["vocab_size"]):
            raise ValueError(f"{names[0]} was tokenized with {first.get('tokenizer')} (vocab "
                             f"{first['vocab_size']}) but {name} with {meta.get('tokenizer')} "
                             f"(vocab {meta['vocab_size']}); re-run megalite.training.preprocess "
                             "with one --tokenizer for all of them")


class DataBlend:
    """Several datasets behind one index space, with their blend weights.

    Dataset d's sample i is index ``offsets[d] + i``; `ShardedSampler(blend.sizes, ...,
    weights=blend.weights)` draws such indices. One dataset is a blend of one.
    """

    def __init__(self, datasets, weights, names=None):
        self.datasets = list(datasets)
        self.weights = normalized_weights(weights, len(self.datasets))
        self.names = list(names or [d.prefix for d in self.datasets])
        check_same_tokenizer([d.meta for d in self.datasets], self.names)
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.meta = self.datasets[0].meta
        self.vocab_size = int(self.meta["vocab_size"])

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        d = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.datasets[d][i - self.offsets[d]]

    def describe(self):
        """One line: each dataset's weight and samples."""
        return ", ".join(f"{w:.3g} x {n} ({s} samples)"
                         for w, n, s in zip(self.weights, self.names, self.sizes))


def open_data(values, seq_len, eval_split=0.0):
    """Open ``--data`` (see `parse_data_spec`) as (training blend, held-out blend or None).
    With ``eval_split`` > 0 each dataset's last fraction of samples (`split_heldout`) forms
    the held-out blend, with the same weights, and training never draws from it."""
    weights, prefixes = parse_data_spec(values)
    datasets = [TokenDataset(p, seq_len) for p in prefixes]
    if not eval_split:
        return DataBlend(datasets, weights, prefixes), None
    parts = [split_heldout(d, eval_split) for d in datasets]
    return (DataBlend([t for t, _ in parts], weights, prefixes),
            DataBlend([h for _, h in parts], weights, prefixes))
