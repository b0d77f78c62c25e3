"""Token files, fixed-length samples over them, and the dp-sharded sampler.

A token file is PREFIX.bin (the corpus's token ids back to back, uint16 or uint32, native
little-endian) plus PREFIX.json (metadata; see `read_metadata`). Make one with

    python -m megalite.training.preprocess --input docs/*.txt --output data/mycorpus

`TokenDataset` cuts the token stream into samples, `ShardedSampler` decides which samples
each dp rank trains on at each step, `get_batch` stacks them into tensors.
"""
import json
from pathlib import Path

import numpy as np
import torch

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


class ShardedSampler:
    """Which samples each dp rank trains on at each optimizer step.

    Every epoch is a permutation of range(num_samples) seeded by (seed, epoch). Step k of an
    epoch takes the global batch perm[k*G : (k+1)*G] (G = global_batch_size); dp rank d takes
    its contiguous slice of G/dp_size of it. So the global batch of a step depends only on
    the seed and the number of samples consumed -- never on dp_size -- and every (tp, pp, dp)
    layout trains on the same data. The incomplete last batch of an epoch is dropped.

    The position is the count of consumed samples (a multiple of G); state_dict() saves it,
    and a resume, at any dp_size, continues with the next global batch: no repeat, no skip.
    """

    def __init__(self, num_samples, global_batch_size, dp_rank=0, dp_size=1, seed=0):
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive "
                             f"multiple of dp_size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global "
                             f"batch of {global_batch_size}; use a smaller --global-batch-size "
                             "or --seq-len, or more data")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size
        self.consumed_samples = 0
        self._perm_epoch, self._perm = None, None

    @property
    def epoch(self):
        return self.consumed_samples // (self.steps_per_epoch * self.global_batch_size)

    @property
    def offset(self):
        """Position inside the current epoch's permutation."""
        return self.consumed_samples % (self.steps_per_epoch * self.global_batch_size)

    def permutation(self, epoch):
        """The sample order of one epoch (cached: it is used for many steps)."""
        if self._perm_epoch != epoch:
            # Seeding with the pair (seed, epoch), not seed + epoch, keeps (seed=1, epoch=0)
            # and (seed=0, epoch=1) distinct.
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def global_batch_indices(self):
        """All dp ranks' indices for the next step, without advancing."""
        start = self.offset
        return self.permutation(self.epoch)[start: start + self.global_batch_size].tolist()

    def next_batch_indices(self):
        """This rank's global_batch_size / dp_size sample indices for the next step."""
        batch = self.global_batch_indices()
        per_rank = self.global_batch_size // self.dp_size
        self.consumed_samples += self.global_batch_size
        return batch[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]

    def state_dict(self):
        # epoch/offset are derived from consumed_samples; saved too for people reading it.
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "offset": self.offset, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state):
        # dp_size may differ from the saving run (resharding); these may not, because they
        # change what "the next global batch" means.
        for key in ("seed", "num_samples", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}; resume with the same --seed, --data, --seq-len "
                    "and --global-batch-size as the saved run")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(f"sampler state consumed_samples={consumed} is not a multiple "
                             f"of global_batch_size={self.global_batch_size}")
        self.consumed_samples = consumed

    def __repr__(self):
        return (f"ShardedSampler(num_samples={self.num_samples}, global_batch_size="
                f"{self.global_batch_size}, dp_rank={self.dp_rank}, dp_size={self.dp_size}, "
                f"seed={self.seed}, epoch={self.epoch}, offset={self.offset})")
