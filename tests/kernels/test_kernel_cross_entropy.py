import pytest
import torch
import torch.nn.functional as F
from kernel_testing import close

from megalite import kernels
from megalite.kernels import cross_entropy, shard_grad_, shard_stats
from megalite.kernels.cross_entropy import cross_entropy_reference

DTYPES = [torch.float32, torch.float16]


def targets(shape, V, ignore_index=-100):
    t = torch.randint(0, V, shape)
    t.view(-1)[::4] = ignore_index  # every 4th token ignored
    return t


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((13,), 1000), ((7,), 123), ((2, 5), 321)])
def test_cross_entropy_matches_torch(shape, V, dtype, smoothing):
    base = (torch.randn(*shape, V) * 4).to(dtype).requires_grad_()
    t = targets(shape, V)
    g = torch.rand(shape)
    logits = base * 1  # a non-leaf, as from an LM head: its buffer receives the gradient
    loss = cross_entropy(logits, t, label_smoothing=smoothing, backend="triton")
    (dx,) = torch.autograd.grad(loss, base, g)
    ref_base = base.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_base.flatten(0, -2), t.flatten(), reduction="none",
                          label_smoothing=smoothing).view(shape)
    (ref_dx,) = torch.autograd.grad(ref, ref_base, g)
    assert loss.dtype == torch.float32 and loss.shape == t.shape
    assert (loss[t == -100] == 0).all()
    close(loss, ref, torch.float32, scale=10.0, what="loss")
    close(dx, ref_dx, dtype, what="grad")
    assert dx.dtype == dtype


def test_gradient_is_written_into_non_leaf_logits_only():
    base = torch.randn(6, 50, requires_grad=True)
    t = torch.randint(0, 50, (6,))
    logits = base * 1
    cross_entropy(logits, t, backend="triton").sum().backward()
    close(logits.detach(), base.grad, torch.float32)  # the buffer now holds the gradient
    before = base.detach().clone()
    base.grad = None
    cross_entropy(base, t, backend="triton").sum().backward()  # a leaf is never overwritten
    assert torch.equal(base.detach(), before)
    logits = base * 1
    cross_entropy(logits, t, inplace_backward=False, backend="triton").sum().backward()
    assert torch.equal(logits.detach(), before)


def test_custom_ignore_index_and_all_ignored():
    x = torch.randn(5, 40)
    t = torch.tensor([3, 7, 7, 0, 39])
    close(cross_entropy(x, t, ignore_index=7, backend="triton"),
          cross_entropy_reference(x, t, ignore_index=7), torch.float32)
    xl = x.clone().requires_grad_()
    loss = cross_entropy(xl * 1, torch.full((5,), -100), backend="triton")
    loss.sum().backward()
    assert (loss == 0).all() and (xl.grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shards,smoothing", [(2, 0.0), (3, 0.0), (3, 0.2)])
def test_vocab_parallel_building_blocks_match_torch(shards, smoothing, backend):
    # Simulate tensor parallelism: a vocabulary of 1001 padded to a multiple of the shard
    # count, split by columns; combine the statistics as the collectives would.
    N, V = 11, 1001
    Vp = -(-V // shards) * shards
    part = Vp // shards
    logits = torch.randn(N, Vp) * 3
    t = targets((N,), V)
    stats = [shard_stats(s, t, r * part, V, with_sum=smoothing > 0, backend=backend)
             for r, s in enumerate(logits.split(part, -1))]
    lse = torch.logsumexp(torch.stack([s[0] for s in stats]), 0)       # all-gather
    xt = sum(s[1] for s in stats)                                       # all-reduce
    loss = lse - (1 - smoothing) * xt
    if smoothing:
        loss = loss - smoothing / V * sum(s[2] for s in stats)
    loss = torch.where(t == -100, 0.0, loss)
    ref_x = logits[:, :V].clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, reduction="none", label_smoothing=smoothing)
    g = torch.rand(N)
    (ref_dx,) = torch.autograd.grad(ref, ref_x, g)
    close(loss, ref, torch.float32, scale=10.0, what="loss")
    grads = [shard_grad_(s.clone(), t, lse, g, r * part, V, label_smoothing=smoothing,
                         backend=backend) for r, s in enumerate(logits.split(part, -1))]
    grad = torch.cat(grads, -1)
    close(grad[:, :V], ref_dx, torch.float32, what="grad")
    assert (grad[:, V:] == 0).all()  # padding columns


def test_shard_of_only_padding():
    x = torch.randn(4, 8)
    t = torch.tensor([1, 2, -100, 3])
    lse, xt, total = shard_stats(x, t, vocab_start=16, vocab_size=10, with_sum=True,
                                 backend="triton")
    assert torch.isneginf(lse).all() and (xt == 0).all() and (total == 0).all()
    out = torch.empty_like(x)
    shard_grad_(x, t, torch.zeros(4), torch.ones(4), 16, 10, out=out, backend="triton")
    assert (out == 0).all()


def test_shard_stats_target_outside_shard_gives_zero():
    x = torch.randn(3, 10)
    t = torch.tensor([5, 12, 25])  # shard covers [10, 20)
    for backend in ("triton", "torch"):
        _, xt, _ = shard_stats(x, t, 10, 30, backend=backend)
        close(xt, torch.tensor([0.0, x[1, 2].item(), 0.0]), torch.float32)


def test_module_style_spelling_and_errors():
    assert kernels.cross_entropy.shard_stats is shard_stats
    assert kernels.cross_entropy.shard_grad_ is shard_grad_
    with pytest.raises(ValueError, match="target shape"):
        cross_entropy(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        shard_stats(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))


def test_reference_gradcheck_fp64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, -100, 2])
    assert torch.autograd.gradcheck(lambda x: cross_entropy_reference(x, t, -100, 0.1), (x,))
