"""Context parallelism trains the single-process model: same losses and gradients (fp32,
<= 1e-5 over 3 steps) at cp 2 and 4, with tp + sequence parallelism, pipeline schedules
(1F1B, zero-bubble), recompute, the distributed optimizer, the GPT-2 family, all-to-all
attention, and across a checkpoint resumed at another cp.

Each rank trains the single-process reference itself (``ParallelState()``: no groups) on the
same global batch and compares its full (tp-gathered) gradients with it every step. The
targets ignore some tokens unevenly, so the cp ranks hold different numbers of counted
tokens and the loss weighting over cp is exercised. Two worlds (2 and 4 processes) run all
the layouts in sequence.
"""
import os

import pytest
import torch
import torch.distributed as dist

from megalite import parallel
from megalite.kernels import HAS_TRITON
from megalite.kernels.attention import attention_reference
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState, comm
from megalite.parallel.context import (context_attention, positions, shard_sequence,
                                       unshard_sequence, _pairs, _Transfer, _TAG_DKV)
from megalite.parallel.sharding import gather_full
from megalite.pipeline import build_schedule, rank_stages
from megalite.plan import Layout
from megalite.plan.comm import cp_ring_bytes
from megalite.training.checkpoint import load_checkpoint, save_checkpoint
from megalite.training.cli import check_args, parse_args
from megalite.training.errors import UsageError
from megalite.training.evaluate import forward_loss
from megalite.training.sampler import ShardedSampler
from megalite.training.step import distributed_optimizer, train_step
from megalite.training.trainable import check_trainable
from world import run_world

LLAMA = GPTConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                  max_seq_len=16, kernels="torch")
GPT2 = GPTConfig(vocab_size=97, n_layers=2, n_heads=4, d_model=32, d_ff=64, max_seq_len=16,
                 norm="layernorm", activation="gelu_tanh", position="learned", bias=True,
                 tie_embeddings=True, kernels="torch")
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 4, 1, 16, 3
_REFERENCE = {}


def _batches():
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        data = torch.randint(0, 97, (GLOBAL_BATCH, SEQ + 1), generator=g)
        tokens, targets = data[:, :-1], data[:, 1:].clone()
        targets[0, :5] = -100    # ignored tokens, unevenly over the chunks
        targets[1, 11:] = -100
        yield tokens, targets


def _model(cfg, state, schedule, m):
    table = build_schedule(schedule, state.pp, m)
    stages = rank_stages(table)[state.pp_rank]
    num_stages = sum(map(len, rank_stages(table).values()))
    return GPT(cfg, state=state, stages=stages, num_stages=num_stages)


def _step(model, opt, state, schedule, tokens, targets):
    per_rank = GLOBAL_BATCH // state.dp
    mine = slice(state.dp_rank * per_rank, (state.dp_rank + 1) * per_rank)
    result = train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH,
                        schedule=schedule, max_grad_norm=0.5)
    full = opt.full_grad if hasattr(opt, "full_grad") else (lambda p: p.grad)
    return result, {n: gather_full(p, state, full(p)).clone() for n, p in model.named_parameters()}


def _train(cfg, state, schedule="1f1b", dist_opt=False, steps=range(STEPS), model_opt=None):
    torch.manual_seed(0)
    if model_opt is None:
        model = _model(cfg, state, schedule, GLOBAL_BATCH // (MICRO_BATCH * state.dp))
        # SGD: Adam would turn float-reassociation noise in tiny gradients into lr-sized steps
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        if dist_opt:
            opt = distributed_optimizer(opt, model)
    else:
        model, opt = model_opt
    batches = list(_batches())
    records = [_step(model, opt, state, schedule, *batches[i]) for i in steps]
    return records, model, opt


def _reference(cfg):
    key = repr(cfg.replace(sequence_parallel=False, recompute="none", cp_comm="ring"))
    if key not in _REFERENCE:
        _REFERENCE[key] = _train(cfg.replace(sequence_parallel=False, recompute="none",
                                             cp_comm="ring"), ParallelState())[0]
    return _REFERENCE[key]


def _compare(records, reference, where, first_step=0):
    for i, ((res, grads), (ref, ref_grads)) in enumerate(zip(records, reference[first_step:])):
        step = first_step + i
        assert abs(res.loss - ref.loss) <= 1e-5 * max(1, ref.loss), \
            f"{where}: step {step} loss {res.loss} != {ref.loss}"
        assert abs(res.grad_norm - ref.grad_norm) <= 1e-5 * max(1, ref.grad_norm), \
            f"{where}: step {step} grad norm {res.grad_norm} != {ref.grad_norm}"
        for name, g in grads.items():
            err = (g - ref_grads[name]).abs().max().item()
            assert err <= 1e-5, f"{where}: step {step} grad of {name} off by {err:.2e}"


def _check(cfg, where, schedule="1f1b", dist_opt=False, **layout):
    ps = parallel.initialize(**layout)
    _compare(_train(cfg, ps, schedule, dist_opt)[0], _reference(cfg), where)
    parallel.destroy()


def _check_attention(world, cases):
    """The ring and all-to-all attention against the dense reference, outputs and the three
    gradients, at the function level. ``cases``: (heads, kv heads, seq, window, comm,
    backend); "triton" runs the ring's blocks on the Triton kernels in the interpreter."""
    group = dist.new_group(list(range(world)))
    rank = dist.get_rank()
    for h, hkv, s, window, comm, backend in cases:
        if backend == "triton" and not HAS_TRITON:
            continue
        os.environ["TRITON_INTERPRET"] = "1" if backend == "triton" else "0"
        torch.manual_seed(0)
        q = torch.randn(2, h, s, 16, requires_grad=True)
        k, v = (torch.randn(2, hkv, s, 16, requires_grad=True) for _ in range(2))
        do = torch.randn(2, h, s, 16)
        attention_reference(q, k, v, True, None, window).backward(do)
        ref = attention_reference(q, k, v, True, None, window).detach()
        local = [shard_sequence(t.detach(), world, rank, 2).requires_grad_() for t in (q, k, v)]
        out = context_attention(*local, group, window=window, comm=comm, backend=backend)
        out.backward(shard_sequence(do, world, rank, 2))
        where = f"{comm} h={h} kv={hkv} window={window} cp={world} {backend}"
        torch.testing.assert_close(out, shard_sequence(ref, world, rank, 2), atol=1e-5,
                                   rtol=1e-5, msg=where)
        for mine, full in zip(local, (q, k, v)):
            torch.testing.assert_close(mine.grad, shard_sequence(full.grad, world, rank, 2),
                                       atol=1e-5, rtol=1e-5, msg=where)


def _save_and_resume(tmp, cfg, save_layout, load_layout, where):
    """2 steps at ``save_layout``, a checkpoint, step 3 at ``load_layout`` from it."""
    ps = parallel.initialize(**save_layout)
    records, model, opt = _train(cfg, ps, steps=range(2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sampler = ShardedSampler(100, GLOBAL_BATCH, ps.dp_rank, ps.dp)
    save_checkpoint(tmp, 2, model, opt, sched, sampler)
    parallel.destroy()
    ps = parallel.initialize(**load_layout)
    torch.manual_seed(1)  # another init: the checkpoint must replace it
    model = _model(cfg, ps, "1f1b", GLOBAL_BATCH // (MICRO_BATCH * ps.dp))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    load_checkpoint(tmp, model, opt, sched, ShardedSampler(100, GLOBAL_BATCH, ps.dp_rank, ps.dp))
    resumed = _train(cfg, ps, steps=range(2, 3), model_opt=(model, opt))[0]
    _compare(records + resumed, _reference(cfg), where)
    parallel.destroy()


def _check_validation_loss(cfg, **layout):
    """The forward-only validation loss (its own cp split and reduction) at cp = 2."""
    tokens, targets = next(_batches())
    torch.manual_seed(0)
    ref = forward_loss(GPT(cfg, ParallelState()), tokens, targets, micro_batch_size=2)
    ps = parallel.initialize(**layout)
    torch.manual_seed(0)
    got = forward_loss(GPT(cfg, ps), tokens, targets, micro_batch_size=2)
    assert abs(got.item() - ref.item()) <= 1e-5, f"validation loss {got} != {ref}"
    parallel.destroy()


def _check_recompute_traffic():
    """Selective recompute does not repeat the ring's communication; full recompute runs
    the forward ring once more (its (cp-1) K/V shards per layer)."""
    ps = parallel.initialize(cp=2)
    tokens, targets = (shard_sequence(t[:1], 2, ps.cp_rank) for t in next(_batches()))
    sent = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        model = GPT(LLAMA.replace(recompute=mode), ps)
        with comm.count_comm() as stats:
            model.loss(model(tokens), targets).backward()
        sent[mode] = stats.bytes["cp_ring_p2p"]
    kv_shard = 2 * 1 * LLAMA.n_kv_heads * (SEQ // 2) * LLAMA.head_dim * 4
    assert sent["selective"] == sent["none"], sent
    assert sent["full"] == sent["none"] + LLAMA.n_layers * kv_shard, sent
    # the planner books what the ring sends: (cp-1) K/V forward, (cp-1) backward (+ (cp-1)
    # in full recompute's forward), cp fp32 dK/dV hops, per layer
    for mode, measured in sent.items():
        at = Layout(micro_batch_size=1, seq_len=SEQ, cp=2, dtype="fp32", recompute=mode)
        assert LLAMA.n_layers * cp_ring_bytes(LLAMA, at) == measured, (mode, sent)
    parallel.destroy()


def _world2(rank, world, tmp):
    _check_attention(world, [(4, 2, 48, 7, "ring", "torch"), (2, 1, 40, 7, "ring", "triton"),
                             (4, 4, 32, 5, "all-to-all", "torch")])
    _check(LLAMA, "cp=2 llama", cp=2)
    _check_validation_loss(LLAMA, cp=2)
    _check_recompute_traffic()
    _check(GPT2, "cp=2 gpt2 (learned positions, tied)", cp=2)
    _save_and_resume(tmp, LLAMA, dict(cp=2), dict(cp=1), "saved at cp=2, resumed at cp=1")
    return True


def _world4(rank, world, tmp):
    _check_attention(world, [(4, 2, 32, None, "ring", "torch"), (4, 4, 48, 13, "ring", "torch"),
                             (4, 4, 32, None, "all-to-all", "torch")])
    _check(LLAMA, "cp=4", cp=4)
    _check(LLAMA.replace(n_kv_heads=4, cp_comm="all-to-all"), "cp=4 all-to-all", cp=4)
    _check(LLAMA.replace(sequence_parallel=True), "cp=2 x tp=2 + SP", cp=2, tp=2)
    _check(LLAMA.replace(recompute="selective"), "cp=2 x pp=2 1f1b, selective recompute",
           cp=2, pp=2)
    _check(LLAMA.replace(recompute="full", sliding_window=5),
           "cp=2 x pp=2 zb-h1, full recompute, window 5", "zb-h1", cp=2, pp=2)
    _check(GPT2, "cp=2 x dp=2 gpt2, distributed optimizer", dist_opt=True, cp=2, dp=2)
    _save_and_resume(tmp, LLAMA, dict(cp=2, dp=2), dict(cp=4), "saved at cp=2 x dp=2, "
                     "resumed at cp=4")
    return True


def test_context_parallel_world_of_2(tmp_path):
    assert all(run_world(2, _world2, str(tmp_path / "ckpt"), timeout=240))


def test_context_parallel_world_of_4(tmp_path):
    assert all(run_world(4, _world4, str(tmp_path / "ckpt"), timeout=300))


# ------------------------------------------------------------------ in-process
def test_sharding_is_load_balanced_and_invertible():
    x = torch.arange(16).view(1, 16)
    shards = [shard_sequence(x, 4, r) for r in range(4)]
    assert shards[0].tolist() == [[0, 1, 14, 15]] and shards[3].tolist() == [[6, 7, 8, 9]]
    assert torch.equal(unshard_sequence(shards), x)
    for r in range(4):
        assert torch.equal(positions(4, 4, r), shards[r][0])
    # causal work per rank (visible key-query pairs) is equal with the balanced chunks
    work = [sum(int(q >= k) for q in shards[r][0] for k in range(16)) for r in range(4)]
    assert len(set(work)) == 1, work
    # every (query chunk, key chunk) pair of the sequence is computed exactly once
    c, seen = 2, set()
    for r in range(4):
        for i in range(4):
            src = (r - i) % 4
            for qa, ka, offset, causal in _pairs(4, r, src, c, None):
                qchunk, kchunk = (r, 7 - r)[qa], (src, 7 - src)[ka]
                assert (qchunk, kchunk) not in seen
                assert causal == (qchunk == kchunk) and offset == (qchunk - kchunk) * c
                seen.add((qchunk, kchunk))
    assert seen == {(q, k) for q in range(8) for k in range(8) if k <= q}


@pytest.mark.parametrize("argv, world, message, gpt", [
    (["--cp", "3"], 4, "world size 4 is not divisible by tp*cp*pp", True),
    (["--cp", "2", "--seq-len", "30"], 2, "--seq-len 30 must be divisible by 4", True),
    (["--cp", "4", "--cp-comm", "all-to-all"], 4, "4 query and 2 kv heads per tp rank must "
                                                  "be divisible by --cp 4", True),
    # each cp rank holds seq_len/cp = 6 tokens, which sequence parallelism splits over tp 4
    (["--model", "tiny-gpt2", "--cp", "2", "--tp", "4", "--sequence-parallel", "--seq-len",
      "12"], 8, "--seq-len 12 / --cp 2 = 6 tokens a cp rank holds must be divisible by --tp 4",
     True),
    # a model of the caller's own knows nothing of cp: it would attend to its chunks only
    (["--cp", "2"], 2, "--cp: these flags build the trainer's GPT", False),
    (["--cp-comm", "all-to-all"], 2, "--cp-comm: these flags build the trainer's GPT", False),
])
def test_bad_context_parallel_flags_fail_in_one_line(argv, world, message, gpt):
    with pytest.raises(UsageError) as e:
        check_args(parse_args(argv), world, gpt=gpt)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).count("divisible") <= 1   # one message for one error


def test_a_model_without_context_parallel_support_is_refused_at_cp_2():
    class OwnModel(torch.nn.Module):   # everything the trainer needs, nothing of cp
        ps, stages, num_stages = ParallelState(cp=2), [0], 1
        stage_modules = activation_shape = loss = shared_embedding_params = None
        checkpoint_config = check_checkpoint_config = None

    with pytest.raises(ValueError, match="supports_context_parallel"):
        check_trainable(OwnModel())
    from megalite.training.step import context_shard   # train_step / forward_loss called directly
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="supports_context_parallel"):
        context_shard(tokens, tokens, OwnModel())
    OwnModel.ps = ParallelState()
    check_trainable(OwnModel())            # cp = 1: any model
    OwnModel.ps, OwnModel.supports_context_parallel = ParallelState(cp=2), True
    check_trainable(OwnModel())
    assert GPT.supports_context_parallel


def test_ring_transfer_failure_names_rank_step_peer_and_message():
    class Stuck:
        def wait(self):
            raise RuntimeError("Timed out waiting 1800000ms for recv operation to complete")

    t = object.__new__(_Transfer)
    t.reqs, t.recv, t.nxt, t.prv, t.tag, t.step = [Stuck()], torch.empty(2, 1, 2, 8, 4), 3, \
        1, _TAG_DKV, 1
    with pytest.raises(RuntimeError) as e:
        t.wait()
    text = str(e.value)
    for words in ("rank 0", "ring step 1", "dK/dV (2, 1, 2, 8, 4)", "to rank 3",
                  "from rank 1", "Timed out"):
        assert words in text, text
