"""Data blends (--data W1 P1 W2 P2 ...), held-out splits and the blend sampler, in-process."""
import json

import numpy as np
import pytest
import torch

from megalite.training.data import (DataBlend, TokenDataset, get_batch, open_data,
                                    parse_data_spec, split_heldout)
from megalite.training.sampler import ShardedSampler, heldout_batches


def _token_file(tmp_path, name, n, tokenizer="byte", vocab_size=256, start=0):
    meta = {"format": "megalite-tokens", "version": 1, "dtype": "uint16", "num_tokens": n,
            "num_documents": 1, "tokenizer": tokenizer, "vocab_size": vocab_size, "eos_id": 0}
    ((np.arange(n) + start) % vocab_size).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return str(tmp_path / name)


def _dataset_of(index, sizes):
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


def _steps(sampler, n):
    return [sampler.next_batch_indices() for _ in range(n)]


def test_blend_proportions_per_batch_and_overall():
    sizes, raw, gbs, steps = [2000, 3000, 700], [6, 3, 1], 32, 400  # 12,800 samples
    weights = np.array(raw) / sum(raw)
    sampler = ShardedSampler(sizes, gbs, seed=5, weights=raw)
    counts = np.zeros(3)
    per_dataset = [[], [], []]
    for step in range(1, steps + 1):
        for i in sampler.next_batch_indices():
            d = _dataset_of(i, sizes)
            counts[d] += 1
            per_dataset[d].append(i - sum(sizes[:d]))
        # exact proportions after every step, not only on average: within one sample
        assert np.all(np.abs(counts - weights * step * gbs) < 1), (step, counts)
    measured = counts / counts.sum()
    assert np.all(np.abs(measured - weights) < 0.01), measured
    assert sampler.drawn == counts.astype(int).tolist()
    for d, drawn in enumerate(per_dataset):
        epoch = sizes[d] // gbs * gbs
        for e in range(len(drawn) // epoch):  # no sample twice within a dataset's epoch
            chunk = drawn[e * epoch: (e + 1) * epoch]
            assert len(set(chunk)) == epoch and max(chunk) < sizes[d]
        assert drawn[:epoch] != drawn[epoch: 2 * epoch]  # reshuffled every epoch


def test_blend_deterministic_and_dp_invariant():
    sizes, raw, gbs, steps = [90, 130], [0.25, 0.75], 16, 30  # several epochs of each
    ref = _steps(ShardedSampler(sizes, gbs, seed=3, weights=raw), steps)
    assert ref == _steps(ShardedSampler(sizes, gbs, seed=3, weights=raw), steps)
    assert ref != _steps(ShardedSampler(sizes, gbs, seed=4, weights=raw), steps)
    for dp in (2, 4):
        ranks = [_steps(ShardedSampler(sizes, gbs, d, dp, 3, raw), steps) for d in range(dp)]
        for step in range(steps):
            assert sum((ranks[d][step] for d in range(dp)), []) == ref[step]


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 4), (4, 1)])
def test_blend_resume(dp_before, dp_after):
    sizes, raw, gbs, seed, total = [70, 45, 120], [2, 1, 3], 8, 11, 40
    full = _steps(ShardedSampler(sizes, gbs, seed=seed, weights=raw), total)
    for cut in (0, 7, 19, 33):
        first = ShardedSampler(sizes, gbs, 0, dp_before, seed, raw)
        _steps(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        after = [ShardedSampler(sizes, gbs, d, dp_after, seed, raw) for d in range(dp_after)]
        for s in after:
            s.load_state_dict(state)
        for step in range(cut, total):
            assert sum((s.next_batch_indices() for s in after), []) == full[step]
    with pytest.raises(ValueError, match="--data weights"):
        ShardedSampler(sizes, gbs, seed=seed, weights=[1, 1, 1]).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        ShardedSampler(sizes[:2], gbs, seed=seed, weights=raw[:2]).load_state_dict(state)


def test_weight_one_is_the_plain_dataset(tmp_path):
    """--data 1.0 P draws exactly the batches of --data P, which are the single-dataset rule:
    epoch e is numpy's permutation seeded (seed, e), steps take consecutive slices of it."""
    prefix = _token_file(tmp_path, "a", 1000)
    seq, gbs, seed, steps = 7, 12, 9, 40  # 142 samples: 11 steps per epoch, tail dropped
    batches = {}
    for spec in ([prefix], ["1.0", prefix], ["0.3", prefix]):
        train, held = open_data(spec, seq)
        assert held is None and len(train) == 142
        sampler = ShardedSampler(train.sizes, gbs, seed=seed, weights=train.weights)
        batches[len(spec), spec[0]] = [get_batch(train, sampler.next_batch_indices())
                                       for _ in range(steps)]
    one, *others = batches.values()
    for other in others:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(one, other))
    ds = TokenDataset(prefix, seq)
    for step, (tokens, targets) in enumerate(one):
        epoch, k = divmod(step, 142 // gbs)
        perm = np.random.default_rng([seed, epoch]).permutation(142)
        ref = get_batch(ds, perm[k * gbs: (k + 1) * gbs].tolist())
        assert torch.equal(tokens, ref[0]) and torch.equal(targets, ref[1])


def test_heldout_split_and_batches(tmp_path):
    a, b = _token_file(tmp_path, "a", 801), _token_file(tmp_path, "b", 1601, start=7)
    train, held = open_data(["1", a, "3", b], seq_len=8, eval_split=0.1)
    assert train.sizes == [90, 180] and held.sizes == [10, 20]  # the last 10% of each
    assert held.weights == train.weights == [0.25, 0.75]
    # the held-out samples are the files' last ones, and training never draws them
    assert torch.equal(held[0][0], TokenDataset(a, 8)[90][0])
    assert torch.equal(held[10][1], TokenDataset(b, 8)[180][1])
    sampler = ShardedSampler(train.sizes, 10, seed=1, weights=train.weights)
    seen = {i for _ in range(200) for i in sampler.next_batch_indices()}
    assert seen == set(range(len(train)))
    batches = heldout_batches(held.sizes, held.weights, 10, 2)
    assert batches == heldout_batches(held.sizes, held.weights, 10, 2)
    flat = sum(batches, [])  # 5 of a and 15 of b, each the first of its held-out samples
    assert sorted(flat) == list(range(5)) + list(range(10, 25))
    with pytest.raises(ValueError, match="--eval-iters 3 .* needs 22 held-out samples of b"):
        heldout_batches(held.sizes, held.weights, 10, 3, names=["a", "b"])
    with pytest.raises(ValueError, match="--eval-split"):
        split_heldout(TokenDataset(a, 8), 0.001)


def test_split_keeps_targets_apart(tmp_path):
    prefix = _token_file(tmp_path, "t", 101, vocab_size=256)  # token k is k (k < 256)
    train, held = split_heldout(TokenDataset(prefix, 10), 0.2)
    train_targets = {int(t) for i in range(len(train)) for t in train[i][1]}
    held_targets = {int(t) for i in range(len(held)) for t in held[i][1]}
    assert len(train) == 8 and len(held) == 2 and not train_targets & held_targets


def test_data_spec_errors(tmp_path):
    a = _token_file(tmp_path, "a", 500)
    assert parse_data_spec(["0.5", a, "2", a]) == ([0.5, 2.0], [a, a])
    with pytest.raises(ValueError, match="WEIGHT PREFIX pairs"):
        parse_data_spec(["0.5", a, "0.5"])
    with pytest.raises(ValueError, match="must be a positive number"):
        parse_data_spec(["-1", a, "2", a])
    with pytest.raises(ValueError, match="expected a weight before"):
        parse_data_spec([a, a])
    with pytest.raises(FileNotFoundError, match="nope"):
        open_data(["1", a, "1", str(tmp_path / "nope")], 8)
    other = _token_file(tmp_path, "o", 500, tokenizer="hf:/tok", vocab_size=300)
    with pytest.raises(ValueError, match="one --tokenizer"):
        DataBlend([TokenDataset(a, 8), TokenDataset(other, 8)], [1, 1])
    with pytest.raises(ValueError, match="blended dataset 1 has 3 samples"):
        ShardedSampler([100, 3], 8, weights=[1, 1])
