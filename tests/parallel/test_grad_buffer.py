"""GradBuffer's layout and bookkeeping in one process, and its reductions at dp = 2 against
one process (more layouts: tests/pipeline/test_3d.py and the checkpoint tests)."""
import pytest
import torch

from megalite.parallel import ParallelState
from megalite.parallel.grad_buffer import GradBuffer
from world import run_world


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


def test_main_grads_split_by_group_and_dtype_and_metadata_survives_stand_ins():
    """One buffer per (reduction group, dtype); the metadata registry follows a parameter to
    its stand-ins (a detached view, the optimizer's main tensor), and the norm over the
    buffers is the norm of every gradient."""
    from megalite.parallel import param_meta, set_param_meta, share_meta
    from megalite.parallel.main_grads import MainGrads
    from megalite.parallel.layers import ColumnParallelLinear
    params = _params()
    set_param_meta(params[2], expert_parallel=True)
    params[3].data = params[3].data.bfloat16()
    layer = ColumnParallelLinear(4, 6, bias=False, partition_sizes=[2, 4])
    params.append(layer.weight)
    grads = MainGrads({0: params}, ParallelState())
    kinds = sorted((b.reduction.name, str(b.param_dtype)) for b in grads.buffers)
    assert kinds == [("dp_cp", "torch.bfloat16"), ("dp_cp", "torch.float32"),
                     ("expert_dp", "torch.float32")]
    assert grads.buffer(params[2]).reduction.name == "expert_dp"
    view = share_meta(layer.weight, layer.weight.detach().view(-1))
    assert param_meta(view).tp_dim == 0 and param_meta(view).tp_sizes == (2, 4)
    assert not hasattr(layer.weight, "tp_dim")  # the registry, not loose attributes
    sum((p.float() * torch.arange(p.numel()).view(p.shape)).sum() for p in params).backward()
    grads.finish()
    assert params[3].grad is None  # the 16-bit gradient went into the fp32 buffer
    want = torch.cat([torch.arange(p.numel(), dtype=torch.float32) for p in params])
    assert torch.equal(grads.grad_view(params[3]), torch.arange(4.0))
    torch.testing.assert_close(grads.norm(), want.norm())
    grads.remove_hooks()


# ------------------------------------------------------------------- reductions at dp = 2

def _dp2_steps(rank, world):
    """Two ranks at dp = 2 train a small GPT three steps with the overlapped gradient buffer
    (plain AdamW) and with the distributed optimizer (bucket reduce-scatter, dp-sharded
    AdamW); each rank also trains the same model in one process on the whole batch."""
    from megalite import parallel
    from megalite.models import GPT, GPTConfig
    from megalite.training import build_optimizer
    from megalite.training.step import train_step
    cfg = GPTConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                    max_seq_len=16, kernels="torch", tie_embeddings=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (8, 9), generator=g) for _ in range(3)]
    runs = {}
    for name, state, distributed in (("one process", ParallelState(), False),
                                     ("overlap", parallel.initialize(dp=2), False),
                                     ("distributed", parallel.initialize(dp=2), True),
                                     ("expert buffer", parallel.initialize(dp=2), True)):
        torch.manual_seed(0)
        model = GPT(cfg, state=state)
        if name == "expert buffer":  # at ep = 1 an expert's group is the dp group: same result
            for p in model.layers["0"].mlp.parameters():
                parallel.set_param_meta(p, expert_parallel=True)
        opt = build_optimizer(model, lr=1e-2, distributed=distributed)
        mine = slice(0, 8) if state.dp == 1 else slice(4 * state.dp_rank, 4 * state.dp_rank + 4)
        losses = [train_step(model, opt, d[mine, :-1], d[mine, 1:], micro_batch_size=2).loss
                  for d in batches]
        runs[name] = (losses, [p.detach().clone() for p in model.parameters()])
    ref_losses, ref_params = runs.pop("one process")
    for name, (losses, params) in runs.items():
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (name, losses)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_dp2_reductions_train_like_one_process():
    """Fast dp = 2 check of the buffer's reductions (the layouts of tests/pipeline/test_3d.py
    cover them too, in minutes; this is the mutation pass's subset for grad_buffer.py)."""
    run_world(2, _dp2_steps, timeout=180)


def test_unsharded_16_bit_step_gathers_nothing():
    """Without the distributed optimizer every dp rank steps every main weight alike, so the
    step copies them into the 16-bit parameters and moves no bytes over dp (no process group
    exists here: a gather would fail, and count_comm would count it)."""
    from megalite.parallel import count_comm
    from megalite.parallel.distributed_optimizer import MainParamOptimizer
    from megalite.parallel.main_grads import MainGrads
    p = torch.nn.Parameter(torch.linspace(-1, 1, 12).bfloat16())
    grads = MainGrads({0: [p]}, ParallelState(dp=2), shard=False)
    opt = MainParamOptimizer(torch.optim.SGD([p], lr=0.5), grads)
    grads.main_grad(p).fill_(1.0)
    with count_comm() as stats:
        opt.step()
    assert stats.calls == {}
    assert torch.equal(p, (torch.linspace(-1, 1, 12).bfloat16().float() - 0.5).bfloat16())
