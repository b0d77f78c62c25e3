"""Every (tp, pp, dp) layout and every schedule trains the single-process model: same losses,
same gradients; with dp > 1 also through the distributed optimizer and with gradient
reduction overlapped with backward or after it (rotating over the schedules).

Each rank also trains the single-process reference itself (same seed, same global batch,
pp = tp = dp = 1; computed once per world) and compares its own stages and shards with it
after every step.
"""
from contextlib import nullcontext

import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.parallel.sharding import gather_full
from megalite.pipeline import build_schedule, rank_stages
from megalite.pipeline.actions import Action
from megalite.training.optim import build_optimizer
from megalite.training.step import distributed_optimizer, train_step
from world import run_world

# 8 layers: pp=4 with 2 stages per rank still gives every stage a layer.
CFG = GPTConfig(vocab_size=97, n_layers=8, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch")
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 8, 1, 8, 3
SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "interleaved-zb", "zbv")
# Activation recomputation rotates over the checks (no cross product), so every mode meets
# loop and V placement and the split backward (zb-h1, interleaved-zb, zbv): see _world.
RECOMPUTE = ({}, dict(recompute="selective"), dict(recompute="full"),
             dict(recompute="full", recompute_layers=1))
_REFERENCE = {}


def _batches(global_batch):
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        data = torch.randint(0, CFG.vocab_size, (global_batch, SEQ + 1), generator=g)
        yield data[:, :-1], data[:, 1:]


# How gradients reach the optimizer: "overlap" (the default: dp reduction during the last
# microbatch's backward), "after" (reduced after the schedule), "dist" (distributed optimizer,
# overlapped), "dist-after".
def _train(cfg, state, schedule, global_batch, mode="overlap"):
    torch.manual_seed(0)
    m = global_batch // (MICRO_BATCH * state.dp)
    if isinstance(schedule, str):
        table = build_schedule(schedule, state.pp, m)
    else:
        table = schedule
    stages = rank_stages(table)[state.pp_rank]
    model = GPT(cfg, state=state, stages=stages, num_stages=sum(map(len, rank_stages(table).values())))
    # SGD: Adam would turn float-reassociation noise in tiny gradients into lr-sized steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    if mode.startswith("dist"):
        opt = distributed_optimizer(opt, model)
    per_rank = global_batch // state.dp
    records = []
    for tokens, targets in _batches(global_batch):
        mine = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
        result = train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH,
                            schedule=schedule, max_grad_norm=0.5,
                            overlap_grad_reduce=not mode.endswith("after"))
        # the distributed optimizer reduced only this rank's shard of each gradient; copies,
        # as .grad are views into a buffer the next step reuses
        full = opt.full_grad if mode.startswith("dist") else (lambda p: p.grad)
        grads = {n: gather_full(p, state, full(p)).clone() for n, p in model.named_parameters()}
        records.append((result, grads))
    return table, records


def _most_held(actions) -> int:
    """Most (stage, microbatch) activations held at once in one rank's list: each is held
    from its F up to its last B or W (an I keeps it for the W). Counted as overlapping
    intervals, independently of the executor's and the simulator's running counters."""
    parsed = [Action.parse(a) for a in actions]
    start, end = {}, {}
    for i, a in enumerate(parsed):
        key = (a.stage, a.microbatch)
        if a.kind == "F":
            start[key] = i
        elif a.kind in "BW":
            end[key] = i  # a W comes after its I, so the last B or W wins
    return max(sum(start[k] <= i < end[k] for k in start) for i in range(len(parsed)))


def _reference(cfg, global_batch):
    key = (cfg.tie_embeddings, global_batch)
    if key not in _REFERENCE:
        _REFERENCE[key] = _train(cfg.replace(sequence_parallel=False, recompute="none",
                                             recompute_layers=None),
                                 ParallelState(), "1f1b", global_batch)[1]
    return _REFERENCE[key]


def check_layout(tp, pp, dp, schedule, cfg, global_batch=None, mode="overlap"):
    # m = 4 microbatches per dp rank at pp <= 2 (2 at dp = 2), 8 at pp = 4 (4 at dp = 2)
    global_batch = global_batch or (GLOBAL_BATCH if pp == 4 else GLOBAL_BATCH // 2)
    ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
    table, records = _train(cfg, ps, schedule, global_batch, mode)
    ref_records = _reference(cfg, global_batch)
    name = schedule if isinstance(schedule, str) else "file"
    where = f"(tp={tp}, pp={pp}, dp={dp}, {name}, tied={cfg.tie_embeddings}, " \
            f"sp={cfg.sequence_parallel}, {mode}, recompute={cfg.recompute}:{cfg.recompute_layers})"
    for step, ((res, grads), (ref, ref_grads)) in enumerate(zip(records, ref_records)):
        assert abs(res.loss - ref.loss) < 1e-5 * max(1, ref.loss), \
            f"step {step} loss {res.loss} != {ref.loss} {where}"
        assert abs(res.grad_norm - ref.grad_norm) < 1e-4 * max(1, ref.grad_norm), \
            f"step {step} grad norm {res.grad_norm} != {ref.grad_norm} {where}"
        for pname, g in grads.items():
            err = (g - ref_grads[pname]).abs().max().item()
            assert err < 1e-5, f"step {step}: grad of {pname} off by {err:.2e} {where}"
        # the executor holds exactly what the schedule says (F until B or W), counted here
        # by intervals, and for 1F1B the published bound (Narayanan et al. 2021: p - rank)
        held = _most_held(table[ps.pp_rank])
        if name == "1f1b":
            assert held == min(pp - ps.pp_rank, global_batch // (MICRO_BATCH * dp)), where
        assert res.peak_live == held, where
    parallel.destroy()
    return records[-1][0].loss


def _world(rank, world, layouts):
    for index, (tp, pp, dp) in enumerate(layouts):
        # pp = 1: the schedule is plain accumulation (two stages on one rank for v = 2)
        schedules = SCHEDULES if pp > 1 else ("1f1b", "zbv")
        if world == 8:  # every schedule ran at world 4; here each at one or two 8-rank layouts
            schedules = schedules[index % 2::2]
        for i, schedule in enumerate(schedules):
            # untied and tied at (1, 2, 1) and pp = 1; elsewhere alternate between schedules
            ties = (False, True) if tp == dp == 1 and pp < 4 else ((False, True)[(i + tp) % 2],)
            # dp > 1: every other schedule (fused B and split I/W alike) through the
            # distributed optimizer; the reduction after the schedule with sequence parallel
            mode = ("dist", "overlap")[(i + pp // 2) % 2] if dp > 1 else "overlap"
            recompute = RECOMPUTE[(i + tp + pp) % len(RECOMPUTE)]
            for tied in ties:
                check_layout(tp, pp, dp, schedule, CFG.replace(tie_embeddings=tied, **recompute),
                             mode=mode)
            if tp > 1 and (world == 8 or i % 2 == 0):  # SP: each schedule somewhere
                check_layout(tp, pp, dp, schedule,
                             CFG.replace(sequence_parallel=True, tie_embeddings=i % 2 == 1,
                                         **recompute),
                             mode=("dist-after", "after")[(i + pp // 2) % 2] if dp > 1
                             else "overlap")
        if pp == 4 and world <= 4:  # fewer microbatches than stages: warmup clipped, exact
            for schedule in ("1f1b", "gpipe", "zb-h1", "zbv"):
                check_layout(tp, pp, dp, schedule, CFG, global_batch=2)
    if world == 4:
        check_adamw_distributed(1, 2, 2)
        return optimizer_state_bytes(world)
    return True


def check_adamw_distributed(tp, pp, dp):
    """AdamW through the distributed optimizer makes the same updates as the plain one."""
    ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
    cfg, per_rank = CFG.replace(tie_embeddings=True), GLOBAL_BATCH // dp
    runs = []
    for distributed in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg, state=ps)
        opt = build_optimizer(model, lr=1e-3, distributed=distributed)
        losses = []
        for tokens, targets in _batches(GLOBAL_BATCH):
            mine = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
            losses.append(train_step(model, opt, tokens[mine], targets[mine],
                                     micro_batch_size=MICRO_BATCH).loss)
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (plain, plain_params), (dist, dist_params) = runs
    assert all(abs(a - b) < 1e-5 * a for a, b in zip(plain, dist)), (plain, dist)
    for name, p in plain_params.items():
        err = (p - dist_params[name]).abs().max().item()
        assert err < 1e-5, f"AdamW, distributed vs not: {name} off by {err:.2e}"
    parallel.destroy()


def optimizer_state_bytes(world):
    """Bytes per parameter of this rank's optimizer state and gradient buffer, with AdamW
    through the distributed optimizer at dp = 1, 2, 4 (pp = the rest), checked against
    4 + 8/dp (gradient + sharded moments; buckets are padded to a multiple of dp)."""
    table = {}
    for dp in (1, 2, 4):
        ps = parallel.initialize(tp=1, pp=world // dp, dp=dp)
        torch.manual_seed(0)
        model = GPT(CFG, state=ps)
        says = dp == 1 and ps.rank == 0  # rank 0 warns that dp=1 shards nothing
        with pytest.warns(UserWarning, match="dp=1 shards nothing") if says else nullcontext():
            opt = build_optimizer(model, lr=1e-3, distributed=True)
        tokens, targets = next(_batches(GLOBAL_BATCH))
        per_rank = GLOBAL_BATCH // dp
        mine = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
        train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH)
        n = sum(p.numel() for p in model.parameters())
        state = sum(v.numel() * v.element_size() for st in opt.state.values()
                    for v in st.values() if torch.is_tensor(v) and v.dim())
        buffers = model.main_grads.buffers
        padding = dp * sum(len(b.buckets) for b in buffers)  # < dp elements per bucket
        grad_elems = sum(b.data.numel() for b in buffers)
        # the dp ranks' shards are disjoint and cover every parameter exactly once
        assert parallel.comm.all_reduce(torch.tensor([state]), ps.dp_group).item() == 8 * n
        assert abs(state - 8 * n / dp) <= 8 * padding, (dp, state, n)
        assert n * 4 <= grad_elems * 4 <= (n + padding) * 4
        table[dp] = {"params": n, "optimizer_state_bytes": state,
                     "grad_bytes": grad_elems * 4, "weight_bytes": 4 * n}
        parallel.destroy()
    return table


@pytest.mark.parametrize("world,layouts", [
    (2, [(1, 2, 1)]),
    (4, [(1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)]),
    (8, [(2, 2, 2), (2, 4, 1), (1, 4, 2)]),
])
def test_layouts_and_schedules_train_like_one_process(world, layouts):
    results = run_world(world, _world, layouts, timeout=600)
    if world == 4:  # also: AdamW distributed vs not, and the optimizer-state bytes per rank
        for rank, table in enumerate(results):
            for dp, row in table.items():
                per_param = row["optimizer_state_bytes"] / row["params"]
                assert abs(per_param - 8 / dp) < 0.01, (rank, dp, per_param)
    else:
        assert results == [True] * world


# A user's table: V placement with split backward, rank 1 consuming its activations in the
# reverse of the order rank 0 sends them (the executor posts receives in send order).
USER_SCHEDULE = {
    0: ["0F0", "0F1", "3F0", "3I0", "3F1", "3I1", "0I1", "0I0", "3W0", "3W1", "0W0", "0W1"],
    1: ["1F1", "1F0", "2F0", "2F1", "2I1", "1I1", "2I0", "1I0", "1W1", "2W0", "2W1", "1W0"],
}


def random_schedule(owner, m, seed):
    """A random runnable table: replay a pipeline where, at each step, a random rank runs a
    random action whose inputs exist (random B or I+W, random microbatch order)."""
    import random
    rng = random.Random(seed)
    n, ranks = len(owner), sorted(set(owner.values()))
    done, table = set(), {r: [] for r in ranks}
    split = {(s, i): rng.random() < 0.5 for s in range(n) for i in range(m)}
    while len(done) < n * m * 2 + sum(split.values()):
        r = rng.choice(ranks)
        ready = []
        for s in (s for s in range(n) if owner[s] == r):
            for i in range(m):
                back = "I" if split[(s, i)] else "B"
                if (s, "F", i) not in done and (s == 0 or (s - 1, "F", i) in done):
                    ready.append((s, "F", i))
                if (s, "F", i) in done and (s, back, i) not in done and \
                        (s == n - 1 or {(s + 1, "B", i), (s + 1, "I", i)} & done):
                    ready.append((s, back, i))
                if (s, "I", i) in done and (s, "W", i) not in done:
                    ready.append((s, "W", i))
        if ready:
            a = rng.choice(ready)
            done.add(a)
            table[r].append(f"{a[0]}{a[1]}{a[2]}")
    return table


def _user_schedule_world(rank, world):
    for tied in (False, True):
        check_layout(1, 2, 1, USER_SCHEDULE, CFG.replace(tie_embeddings=tied), global_batch=2)
    # Random runnable tables, loop and V placement: whatever validates runs, exactly.
    for seed, owner in enumerate(({0: 0, 1: 1, 2: 0, 3: 1}, {0: 0, 1: 1, 2: 1, 3: 0},
                                  {0: 0, 1: 1})):
        table = random_schedule(owner, 3, seed)
        check_layout(1, 2, 1, table, CFG.replace(tie_embeddings=seed == 1), global_batch=3)
    return True


def test_user_and_random_schedules_train_like_one_process():
    assert run_world(2, _user_schedule_world, timeout=300) == [True, True]


def test_executor_rejects_bad_actions_and_matches_dense():
    from megalite.pipeline import run_schedule
    parallel.destroy()
    ps = parallel.initialize()
    stage = torch.nn.Linear(4, 4)
    xs, ys = [torch.randn(2, 4) for _ in range(2)], [torch.randn(2, 4) for _ in range(2)]
    kwargs = dict(num_microbatches=2, activation_shape=(2, 4), inputs=xs, targets=ys,
                  loss_fn=torch.nn.functional.mse_loss)
    for actions, match in ((["0F0", "0B0", "0F1"], r"stage 0 has no B for microbatches \[1\]"),
                           (["0F0", "0B1", "0F1", "0B0"], r"B before its F \(0F1\)"),
                           (["0F0", "0F0", "0B0", "0B1"], "duplicate"),
                           (["0F0", "0F2", "0B0", "0B2"], "microbatch 2 out of range")):
        with pytest.raises(ValueError, match=match):
            run_schedule(actions, stage, ps, **kwargs)
    for missing, match in (("inputs", "the first stage needs 2 microbatch inputs"),
                           ("targets", "the last stage needs 2 targets and a loss_fn"),
                           ("loss_fn", "the last stage needs 2 targets and a loss_fn")):
        with pytest.raises(ValueError, match=match):
            run_schedule(["0F0", "0B0", "0F1", "0B1"], stage, ps, **{**kwargs, missing: None})
    # Valid lists, full and split backward, match the dense mean loss and its gradient.
    dense = torch.nn.Linear(4, 4)
    dense.load_state_dict(stage.state_dict())
    loss = sum(torch.nn.functional.mse_loss(dense(x), y) for x, y in zip(xs, ys)) / 2
    loss.backward()
    for actions in (["0F0", "0F1", "0B0", "0B1"], ["0F0", "0I0", "0F1", "0I1", "0W1", "0W0"]):
        stage.zero_grad()
        result = run_schedule(actions, stage, ps, **kwargs)
        assert torch.allclose(torch.as_tensor(result.loss), loss.detach())
        assert torch.allclose(stage.weight.grad, dense.weight.grad)
        assert torch.allclose(stage.bias.grad, dense.bias.grad)
    parallel.destroy()
