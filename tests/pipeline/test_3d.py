"""Every (tp, pp, dp) layout trains the single-process model: same losses, same gradients.

Each rank also trains the single-process reference itself (same seed, same global batch,
pp = tp = dp = 1) and compares its own stage and shard with it after every step.
"""
import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.parallel.sharding import gather_full
from megalite.training.step import train_step
from world import run_world

CFG = GPTConfig(vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch")
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 8, 1, 8, 3


def _batches(global_batch):
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        data = torch.randint(0, CFG.vocab_size, (global_batch, SEQ + 1), generator=g)
        yield data[:, :-1], data[:, 1:]


def _train(cfg, state, schedule, global_batch):
    torch.manual_seed(0)
    model = GPT(cfg, state=state)
    # SGD: Adam would turn float-reassociation noise in tiny gradients into lr-sized steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    per_rank = global_batch // state.dp
    records = []
    for tokens, targets in _batches(global_batch):
        mine = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
        result = train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH,
                            schedule=schedule, max_grad_norm=0.5)
        grads = {n: gather_full(p, state, p.grad) for n, p in model.named_parameters()}
        records.append((result, grads))
    return model, records


def check_layout(tp, pp, dp, schedule, cfg, global_batch=GLOBAL_BATCH):
    ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
    _, records = _train(cfg, ps, schedule, global_batch)
    _, ref_records = _train(cfg.replace(sequence_parallel=False), ParallelState(), schedule,
                            global_batch)
    where = f"(tp={tp}, pp={pp}, dp={dp}, {schedule}, tied={cfg.tie_embeddings}, " \
            f"sp={cfg.sequence_parallel})"
    m = global_batch // (MICRO_BATCH * dp)
    for step, ((res, grads), (ref, ref_grads)) in enumerate(zip(records, ref_records)):
        assert abs(res.loss - ref.loss) < 1e-5, f"step {step} loss {res.loss} != {ref.loss} {where}"
        assert abs(res.grad_norm - ref.grad_norm) < 1e-4 * max(1, ref.grad_norm), \
            f"step {step} grad norm {res.grad_norm} != {ref.grad_norm} {where}"
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max().item()
            assert err < 1e-5, f"step {step}: grad of {name} off by {err:.2e} {where}"
        bound = min(pp - ps.pp_rank, m) if schedule == "1f1b" else m
        assert res.peak_live <= bound, f"peak live {res.peak_live} > {bound} {where}"
        if schedule == "gpipe":
            assert res.peak_live == m
    return records[-1][0].loss


def _world(rank, world, layouts):
    for tp, pp, dp in layouts:
        for schedule in ("1f1b", "gpipe"):
            for tied in (False, True):
                check_layout(tp, pp, dp, schedule, CFG.replace(tie_embeddings=tied))
        if tp > 1:
            check_layout(tp, pp, dp, "1f1b", CFG.replace(sequence_parallel=True))
        if pp == 4:  # fewer microbatches than stages: warmup is clipped, still exact
            for schedule in ("1f1b", "gpipe"):
                check_layout(tp, pp, dp, schedule, CFG, global_batch=2)
    return True


@pytest.mark.parametrize("world,layouts", [
    (2, [(1, 2, 1)]),
    (4, [(1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)]),
    (8, [(2, 2, 2)]),
])
def test_layouts_train_like_one_process(world, layouts):
    assert run_world(world, _world, layouts, timeout=400) == [True] * world


def test_executor_rejects_incomplete_or_misordered_actions():
    from megalite.pipeline import run_schedule
    parallel.destroy()
    ps = parallel.initialize()
    stage = torch.nn.Linear(4, 4)
    xs, ys = [torch.randn(2, 4) for _ in range(2)], [torch.randn(2, 4) for _ in range(2)]
    kwargs = dict(num_microbatches=2, activation_shape=(2, 4), inputs=xs, targets=ys,
                  loss_fn=torch.nn.functional.mse_loss)
    for actions, match in ((["0F0", "0B0", "0F1"], "exactly once"),
                           (["0F0", "0B1", "0F1", "0B0"], "before its forward"),
                           (["0F0", "0F0", "0B0", "0B1"], "repeats"),
                           (["0F0", "0F2", "0B0", "0B2"], "microbatches < 2")):
        with pytest.raises(ValueError, match=match):
            run_schedule(actions, stage, ps, **kwargs)
    # A valid list runs and matches the dense mean loss and its gradient.
    result = run_schedule(["0F0", "0F1", "0B0", "0B1"], stage, ps, **kwargs)
    dense = torch.nn.Linear(4, 4)
    dense.load_state_dict(stage.state_dict())
    loss = sum(torch.nn.functional.mse_loss(dense(x), y) for x, y in zip(xs, ys)) / 2
    loss.backward()
    assert torch.allclose(torch.as_tensor(result.loss), loss.detach())
    assert torch.allclose(stage.weight.grad, dense.weight.grad)
    parallel.destroy()
