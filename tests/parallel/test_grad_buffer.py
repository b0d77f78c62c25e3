"""GradBuffer's layout and bookkeeping, in one process (the reductions themselves run in the
multi-process layout and checkpoint tests)."""
import pytest
import torch

from megalite.parallel import ParallelState
from megalite.parallel.grad_buffer import GradBuffer


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in ((7, 5), (3,), (11, 2), (4,))]


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_buckets_and_dp_chunks_cover_every_element_once(dp):
    params = _params()
    owned = {id(p): torch.zeros(p.numel(), dtype=torch.int64) for p in params}
    for rank in range(dp):
        buf = GradBuffer({0: params}, ParallelState(dp=dp, dp_rank=rank), shard=True,
                         bucket_bytes=20 * 4)  # about 20 elements a bucket
        # 4 | 22 | 3 | 35 elements: a parameter larger than a bucket gets one of its own
        assert len(buf.buckets) == 4 and all((b.end - b.start) % dp == 0 for b in buf.buckets)
        # reverse order of the parameters (backward finishes the last ones first)
        assert [id(p) for b in buf.buckets for p in b.params] == [id(p) for p in params[::-1]]
        for p in params:
            assert p.grad.data_ptr() == buf.grad_view(p).data_ptr()
            lo, hi = buf.owned_range(p)
            owned[id(p)][lo:hi] += 1
        buf.remove_hooks()
    assert all(bool((o == 1).all()) for o in owned.values())


def test_zero_grad_repoints_replaced_grads_and_finish_refuses_them():
    params = _params()
    buf = GradBuffer({0: params}, ParallelState())
    params[0].grad = None  # what optimizer.zero_grad(set_to_none=True) would do
    with pytest.raises(RuntimeError, match="no longer points into the gradient buffer"):
        buf.finish()
    buf.zero_grad()
    sum(p.sum() for p in params).backward()
    buf.finish()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    assert buf.data.sum().item() == sum(p.numel() for p in params)


def test_two_accumulations_in_the_final_action_are_refused():
    params = _params()
    buf = GradBuffer({0: params}, ParallelState())
    with buf.final_backward(0):
        params[1].sum().backward()
        with pytest.raises(RuntimeError, match="two gradient accumulations"):
            params[1].sum().backward()
