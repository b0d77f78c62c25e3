"""Validation loss through the pipeline, forward only: every (tp, pp, dp) layout and schedule
gives the loss of the plain single-process forward + cross-entropy on the same held-out
samples, and evaluating leaves no gradient and no changed parameter behind."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.pipeline import build_schedule, forward_schedule, rank_stages, validate_schedule
from megalite.training.data import get_batch, open_data
from megalite.training.evaluate import evaluate
from megalite.training.sampler import heldout_batches
from world import run_world

CFG = GPTConfig(vocab_size=97, n_layers=8, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch")
SEQ, GLOBAL_BATCH, MICRO_BATCH, ITERS = 8, 8, 1, 2
# (tp, pp, dp, schedule, config changes): tp, pp and dp; loop and V placement, a
# split-backward schedule, sequence parallelism, recompute, and an unfused head
LAYOUTS = [(2, 2, 1, "1f1b", dict(sequence_parallel=True)),
           (1, 2, 2, "zbv", dict(recompute="full")),
           (1, 4, 1, "interleaved-1f1b", dict(fused_loss=False))]


def _token_files(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = []
    for name, n in (("a", 700), ("b", 500)):
        meta = {"format": "megalite-tokens", "version": 1, "dtype": "uint16",
                "num_tokens": n, "num_documents": 1, "tokenizer": "test", "vocab_size": 97,
                "eos_id": None}
        rng.integers(0, 97, n).astype(np.uint16).tofile(tmp_path / f"{name}.bin")
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        prefixes.append(str(tmp_path / name))
    return ["2", prefixes[0], "1", prefixes[1]]


def _reference_loss(held, batches):
    """The single-process model's plain forward and torch's cross-entropy."""
    torch.manual_seed(0)
    model = GPT(CFG, state=ParallelState())
    with torch.no_grad():
        losses = []
        for batch in batches:
            tokens, targets = get_batch(held, batch)
            logits = model(tokens)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          targets.reshape(-1)))
    return torch.stack(losses).mean().item()


def _world(rank, world, data_spec):
    _, held = open_data(data_spec, SEQ, eval_split=0.2)
    batches = heldout_batches(held.sizes, held.weights, GLOBAL_BATCH, ITERS)
    reference = _reference_loss(held, batches)
    results = []
    for tp, pp, dp, schedule, changes in LAYOUTS:
        ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
        m = GLOBAL_BATCH // (MICRO_BATCH * dp)
        table = build_schedule(schedule, pp, m)
        torch.manual_seed(0)
        model = GPT(CFG.replace(**changes), state=ps, stages=rank_stages(table)[ps.pp_rank],
                    num_stages=sum(map(len, rank_stages(table).values())))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = evaluate(model, held, batches, micro_batch_size=MICRO_BATCH, schedule=table)
        assert model.training  # eval mode only while evaluating
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        results.append((tp, pp, dp, schedule, loss))
        parallel.destroy()
    return reference, results


def test_validation_loss_is_the_plain_forward_at_every_layout(tmp_path):
    spec = _token_files(tmp_path)
    for reference, results in run_world(4, _world, spec):
        for tp, pp, dp, schedule, loss in results:
            assert abs(loss - reference) <= 1e-5, (tp, pp, dp, schedule, loss, reference)
        assert 4.0 < reference < 5.5  # about log(97) for an untrained model


def test_forward_schedule_drops_every_backward():
    for name, pp, m in (("1f1b", 4, 6), ("zbv", 2, 4), ("interleaved-zb", 2, 4)):
        table = build_schedule(name, pp, m)
        forward = forward_schedule(table)
        for r in table:
            assert forward[r] == [a for a in table[r] if "F" in a]
        validate_schedule(forward, forward_only=True)
        with pytest.raises(ValueError, match="no B for microbatches"):
            validate_schedule(forward)
        with pytest.raises(ValueError, match="F actions only"):
            validate_schedule(table, forward_only=True)
