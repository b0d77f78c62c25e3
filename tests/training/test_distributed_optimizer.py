"""The distributed optimizer in one process (dp = 1): it runs, says it shards nothing, and
updates exactly like the plain optimizer; misuse gets a clear error. The dp > 1 checks (all
layouts, AdamW at dp = 2, bytes per parameter, checkpoints) run in the multi-process tests
(tests/pipeline/test_3d.py, tests/training/test_checkpoint.py)."""
import pytest
import torch

from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.training import DynamicLossScaler, build_optimizer, distributed_optimizer
from megalite.training.step import train_step

CFG = GPTConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch", tie_embeddings=True)


def _data(steps=3):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        d = torch.randint(0, CFG.vocab_size, (4, 9), generator=g)
        yield d[:, :-1], d[:, 1:]


def _run(distributed, dtype="fp32"):
    torch.manual_seed(0)
    model = GPT(CFG, state=ParallelState())
    opt = build_optimizer(model, lr=1e-2, distributed=distributed)
    scaler = DynamicLossScaler() if dtype == "fp16" else None
    losses = [train_step(model, opt, x, y, micro_batch_size=2, dtype=dtype,
                         grad_scaler=scaler).loss for x, y in _data()]
    return losses, [p.detach().clone() for p in model.parameters()], opt


def test_dp1_runs_says_it_shards_nothing_and_matches_adamw():
    plain_losses, plain_params, plain = _run(False)
    with pytest.warns(UserWarning, match="dp=1 shards nothing"):
        losses, params, opt = _run(True)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    # the same state, in the same layout (one shard = everything)
    n = sum(p.numel() for p in plain_params)
    state = sum(v.numel() for st in opt.state.values() for v in st.values() if v.dim())
    assert state == 2 * n == sum(v.numel() for st in plain.state.values()
                                 for v in st.values() if v.dim())


def test_fp16_loss_scaling_through_the_distributed_optimizer():
    plain_losses, plain_params, _ = _run(False, "fp16")
    with pytest.warns(UserWarning):
        losses, params, _ = _run(True, "fp16")
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))


def test_misuse_is_a_clear_error():
    model = GPT(CFG, state=ParallelState())
    x, y = next(_data())
    with pytest.warns(UserWarning):
        build_optimizer(model, lr=1e-2, distributed=True)
    with pytest.raises(ValueError, match="sharded for a DistributedOptimizer"):
        train_step(model, build_optimizer(model, lr=1e-2), x, y, micro_batch_size=2)
    other = GPT(CFG, state=ParallelState())
    stepped = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    train_step(other, stepped, x, y, micro_batch_size=2)
    with pytest.raises(ValueError, match="before its first step"):
        distributed_optimizer(stepped, other)
