import pytest

from megalite.parallel.partition import layers_per_stage, stage_layers


def test_even_split_puts_extra_layers_first_and_covers_every_layer():
    for n, p in [(8, 4), (7, 3), (5, 5), (13, 4)]:
        counts = layers_per_stage(n, p)
        assert sum(counts) == n and max(counts) - min(counts) <= 1
        assert counts == sorted(counts, reverse=True)
        ranges = [stage_layers(n, p, s) for s in range(p)]
        assert [i for r in ranges for i in r] == list(range(n))


def test_explicit_split_and_bad_splits():
    assert layers_per_stage(4, 2, [1, 3]) == [1, 3]
    assert stage_layers(4, 2, 1, [1, 3]) == range(1, 4)
    for split in ([0, 4], [2, 1], [1, 1, 2]):
        with pytest.raises(ValueError, match="counts >= 1 summing to n_layers=4"):
            layers_per_stage(4, 2, split)
    with pytest.raises(ValueError, match="lower --pp or --virtual-stages, or use more layers"):
        layers_per_stage(3, 4)
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        layers_per_stage(3, 0)
