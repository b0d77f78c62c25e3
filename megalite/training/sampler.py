"""Which samples each dp rank trains on at each optimizer step, from one dataset or a
weighted blend of several: `ShardedSampler`.

Two rules make a step's global batch of G = global_batch_size samples:

1. **Which dataset each position draws from** (blends only). Positions p = 0, 1, 2, ... of
   the run's sample stream go, in order, to the dataset d that maximises
   ``w[d] * (p + 1) - drawn[d]`` (ties: the lower d), where ``w`` are the weights normalised
   to sum 1 and ``drawn[d]`` counts d's earlier positions: each position goes to the dataset
   furthest behind its share (Megatron's blending rule). So after any P positions every
   dataset has drawn ``w[d] * P`` samples to within one: the proportions hold per batch, not
   only on average, and no randomness is involved.
2. **Which sample a dataset gives** at its c-th draw: epoch ``e = c // E[d]`` of dataset d is
   a permutation of its samples seeded by ``(seed, e, d)``, and the draw takes entry
   ``c % E[d]`` of it. ``E[d]`` is d's sample count rounded down to a multiple of G (the
   tail is dropped each epoch; with one dataset an epoch is then whole steps).

The global batch of a step depends only on the seed, the datasets' sizes and weights, G and
the number of samples consumed, never on the layout; dp rank r takes the contiguous slice
``[r * G/dp, (r + 1) * G/dp)`` of it. A single dataset is the blend of one (weight 1): every
position draws from it, and the rule reduces to "epoch e is a permutation seeded by (seed,
e)". The position (samples consumed, and each dataset's draws) is the state a checkpoint
saves; a resume at any dp size continues with the next global batch.
"""
import numpy as np


def normalized_weights(weights, count):
    """Weights as floats summing to 1; one per dataset, each > 0."""
    if weights is None:
        if count != 1:
            raise ValueError(f"a blend of {count} datasets needs one weight per dataset")
        return [1.0]
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} datasets")
    if not all(w > 0 and np.isfinite(w) for w in weights):
        raise ValueError(f"blend weights must be positive numbers, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def blend_positions(weights, drawn, start, count):
    """The datasets of stream positions start .. start+count-1 (rule 1 of the module
    docstring), given ``drawn`` (each dataset's draws before ``start``); returns (list of
    dataset indices, each dataset's draws after them)."""
    drawn = list(drawn)
    datasets = range(len(weights))
    chosen = []
    for p in range(start, start + count):
        d = max(datasets, key=lambda i: (weights[i] * (p + 1) - drawn[i], -i))
        drawn[d] += 1
        chosen.append(d)
    return chosen, drawn


def dp_shard(batch, dp_rank, dp_size):
    """dp rank ``dp_rank``'s contiguous slice of a global batch of indices."""
    per_rank = len(batch) // dp_size
    return batch[dp_rank * per_rank: (dp_rank + 1) * per_rank]


class ShardedSampler:
    """Which samples each dp rank trains on at each optimizer step (rules in the module
    docstring).

    ``num_samples``: the dataset's sample count, or a list of counts for a blend, with
    ``weights`` (one per dataset, any positive scale). Indices are into the datasets'
    concatenated index space: dataset d's sample i is ``sum(num_samples[:d]) + i`` (what
    `megalite.training.data.DataBlend` serves).
    """

    def __init__(self, num_samples, global_batch_size, dp_rank=0, dp_size=1, seed=0,
                 weights=None):
        sizes = [int(num_samples)] if np.ndim(num_samples) == 0 else [int(n) for n in num_samples]
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive "
                             f"multiple of dp_size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        for d, n in enumerate(sizes):
            if n < global_batch_size:
                which = "the dataset" if len(sizes) == 1 else f"blended dataset {d}"
                raise ValueError(f"{which} has {n} samples, fewer than one global batch of "
                                 f"{global_batch_size}; use a smaller --global-batch-size or "
                                 "--seq-len, or more data")
        self.sizes = sizes
        self.weights = normalized_weights(weights, len(sizes))
        self.offsets = np.cumsum([0] + sizes[:-1]).tolist()
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.epoch_sizes = [n // global_batch_size * global_batch_size for n in sizes]
        self.consumed_samples = 0
        self.drawn = [0] * len(sizes)
        self._perms = {}

    @property
    def num_samples(self):
        """The sample count (one dataset) or the list of counts (a blend), as given."""
        return self.sizes[0] if len(self.sizes) == 1 else list(self.sizes)

    @property
    def steps_per_epoch(self):
        """Steps per epoch of the first dataset (of the only one, without a blend)."""
        return self.sizes[0] // self.global_batch_size

    @property
    def epochs(self):
        """Each dataset's current epoch."""
        return [c // e for c, e in zip(self.drawn, self.epoch_sizes)]

    @property
    def epoch(self):
        return self.epochs[0]

    @property
    def offset(self):
        """Position inside the first dataset's current epoch."""
        return self.drawn[0] % self.epoch_sizes[0]

    def permutation(self, epoch, dataset=0):
        """The sample order of one epoch of one dataset (cached: used for many steps)."""
        key = (dataset, epoch)
        if key not in self._perms:
            # Seeded by the tuple, not a sum, so (seed=1, epoch=0) and (seed=0, epoch=1)
            # differ. numpy pads the key with zeros, so dataset 0's (seed, epoch, 0) is the
            # (seed, epoch) a single dataset used before blends: old runs resume unchanged.
            rng = np.random.default_rng([self.seed, epoch, dataset])
            self._perms = {k: v for k, v in self._perms.items() if k[0] != dataset}
            self._perms[key] = rng.permutation(self.sizes[dataset])
        return self._perms[key]

    def _draw(self):
        """(the next global batch's indices, each dataset's draws after it)."""
        chosen, after = blend_positions(self.weights, self.drawn, self.consumed_samples,
                                        self.global_batch_size)
        counts = list(self.drawn)
        batch = []
        for d in chosen:
            epoch, k = divmod(counts[d], self.epoch_sizes[d])
            batch.append(self.offsets[d] + int(self.permutation(epoch, d)[k]))
            counts[d] += 1
        return batch, after

    def global_batch_indices(self):
        """All dp ranks' indices for the next step, without advancing."""
        return self._draw()[0]

    def next_batch_indices(self):
        """This rank's global_batch_size / dp_size sample indices for the next step."""
        batch, self.drawn = self._draw()
        self.consumed_samples += self.global_batch_size
        return dp_shard(batch, self.dp_rank, self.dp_size)

    def state_dict(self):
        state = {"consumed_samples": self.consumed_samples, "seed": self.seed,
                 "num_samples": self.num_samples, "global_batch_size": self.global_batch_size}
        if len(self.sizes) == 1:  # epoch/offset derive from consumed_samples; for readers
            state.update(epoch=self.epoch, offset=self.offset)
        else:
            state.update(weights=self.weights, drawn=list(self.drawn), epochs=self.epochs)
        return state

    def load_state_dict(self, state):
        # dp_size may differ from the saving run (resharding); these may not, because they
        # change what "the next global batch" means.
        saved_weights = [float(w) for w in state.get("weights", [1.0])]
        for key, saved, mine in (("seed", state.get("seed"), self.seed),
                                 ("num_samples", state.get("num_samples"), self.num_samples),
                                 ("global_batch_size", state.get("global_batch_size"),
                                  self.global_batch_size)):
            if saved is not None and saved != mine:
                raise ValueError(
                    f"sampler state has {key}={saved} but this run has {mine}; resume with "
                    "the same --seed, --data, --seq-len, --eval-split and --global-batch-size "
                    "as the saved run")
        if not np.allclose(saved_weights, self.weights, rtol=1e-12, atol=0):
            raise ValueError(f"sampler state has blend weights {saved_weights} but this run "
                             f"has {self.weights}; resume with the same --data weights")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ValueError(f"sampler state consumed_samples={consumed} is not a multiple "
                             f"of global_batch_size={self.global_batch_size}")
        drawn = [int(c) for c in state.get("drawn", [consumed])]
        if len(drawn) != len(self.sizes) or sum(drawn) != consumed:
            raise ValueError(f"sampler state drawn={drawn} does not add up to "
                             f"consumed_samples={consumed} over {len(self.sizes)} datasets")
        self.consumed_samples, self.drawn = consumed, drawn

    def __repr__(self):
        blend = f", weights={self.weights}" if len(self.sizes) > 1 else ""
        return (f"ShardedSampler(num_samples={self.num_samples}{blend}, global_batch_size="
                f"{self.global_batch_size}, dp_rank={self.dp_rank}, dp_size={self.dp_size}, "
                f"seed={self.seed}, consumed_samples={self.consumed_samples})")


def heldout_batches(sizes, weights, global_batch_size, num_batches, names=None):
    """The ``num_batches`` global batches that every evaluation reads: stream positions 0 ..
    num_batches * G - 1 go to datasets by rule 1 (the same weights as training), and dataset
    d's c-th draw is its held-out sample c, in file order. So the same samples are measured
    at every evaluation and every layout, and none twice; indices are into the concatenated
    index space as for `ShardedSampler`. Raises ValueError when a dataset holds too few."""
    weights = normalized_weights(weights, len(sizes))
    offsets = np.cumsum([0] + list(sizes[:-1])).tolist()
    chosen, drawn = blend_positions(weights, [0] * len(sizes), 0,
                                    num_batches * global_batch_size)
    for d, (need, have) in enumerate(zip(drawn, sizes)):
        if need > have:
            name = names[d] if names else f"dataset {d}"
            raise ValueError(f"--eval-iters {num_batches} x --global-batch-size "
                             f"{global_batch_size} needs {need} held-out samples of {name} but "
                             f"it has {have}; lower --eval-iters or hold out more "
                             "(--eval-split, --eval-data)")
    counts = [0] * len(sizes)
    flat = []
    for d in chosen:
        flat.append(offsets[d] + counts[d])
        counts[d] += 1
    return [flat[k * global_batch_size: (k + 1) * global_batch_size]
            for k in range(num_batches)]
