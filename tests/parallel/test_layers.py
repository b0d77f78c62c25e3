"""Tensor-parallel layers, comm ops, cross-entropy and RNG streams against dense torch.

One world of 4 gloo processes checks every layer at tp = 1, 2 and 4 (at tp < 4 the
remaining ranks form data-parallel replicas). References are plain torch computations on
the full weights, built in the same process from the same seed with a single-process state.
"""
import pytest
import torch
import torch.nn.functional as F

from megalite import parallel
from megalite.parallel import ParallelState, comm
from megalite.parallel.sharding import gather_full, shard_full
from world import run_world

ATOL = 1e-5


def close(a, b, what, atol=ATOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_comm_ops(ps):
    """Each conjugate pair's forward and backward against what it should compute."""
    g, tp, r = ps.tp_group, ps.tp, ps.tp_rank
    full = seeded(1, 2, 4 * tp, 8)                        # same on every rank
    mine = seeded(10 + r, 2, 4, 8)                        # differs per TP rank
    everyone = torch.stack([seeded(10 + i, 2, 4, 8) for i in range(tp)])
    dy = seeded(20 + r, 2, 4, 8)
    dy_all = torch.stack([seeded(20 + i, 2, 4, 8) for i in range(tp)])

    x = mine.clone().requires_grad_()
    y = parallel.copy_to_tp_region(x, g)
    y.backward(dy)
    close(y, mine, "f forward"); close(x.grad, dy_all.sum(0), "f backward")

    x = mine.clone().requires_grad_()
    y = parallel.reduce_from_tp_region(x, g)
    y.backward(dy)
    close(y, everyone.sum(0), "g forward"); close(x.grad, dy, "g backward")
    h = x * 1                                             # an intermediate, not a leaf
    parallel.reduce_from_tp_region(h, g)
    assert torch.equal(h, mine), "the public g must not overwrite its input"

    x = full.clone().requires_grad_()
    y = parallel.scatter_to_tp_region(x, g)
    y.backward(torch.ones_like(y) * (r + 1))
    close(y, full.chunk(tp, -1)[r], "scatter forward")
    close(x.grad, torch.cat([torch.full_like(y, i + 1) for i in range(tp)], -1), "scatter bwd")

    x = mine.clone().requires_grad_()
    y = parallel.gather_from_tp_region(x, g)
    grad = seeded(3, *y.shape)
    y.backward(grad)
    close(y, torch.cat(list(everyone), -1), "gather forward")
    close(x.grad, grad.chunk(tp, -1)[r], "gather backward")

    x = mine.clone().requires_grad_()
    y = parallel.gather_from_sequence_parallel_region(x, g)
    dys = torch.stack([seeded(30 + i, 2, 4 * tp, 8) for i in range(tp)])
    y.backward(dys[r])
    close(y, torch.cat(list(everyone), 1), "sp all-gather forward")
    close(x.grad, dys.sum(0).chunk(tp, 1)[r], "sp all-gather backward (reduce-scatter)")

    x = seeded(40 + r, 2, 4 * tp, 8).requires_grad_()
    y = parallel.reduce_scatter_to_sequence_parallel_region(x, g)
    y.backward(dy)
    xs = torch.stack([seeded(40 + i, 2, 4 * tp, 8) for i in range(tp)])
    close(y, xs.sum(0).chunk(tp, 1)[r], "sp reduce-scatter forward")
    close(x.grad, torch.cat(list(dy_all), 1), "sp reduce-scatter backward (all-gather)")

    x = full.clone().requires_grad_()
    y = parallel.scatter_to_sequence_parallel_region(x, g)
    y.backward(torch.ones_like(y))
    close(y, full.chunk(tp, 1)[r], "sp scatter forward")
    close(x.grad, torch.ones_like(full), "sp scatter backward")


def check_linear_layers(ps):
    tp, r, single = ps.tp, ps.tp_rank, ParallelState()
    b, s, n_in, n_out = 2, 4 * tp, 12, 8 * tp
    x = seeded(5, b, s, n_in)
    for bias in (True, False):
        for sizes in (None, [4 * tp, 2 * tp, 2 * tp]):
            torch.manual_seed(0)
            layer = parallel.ColumnParallelLinear(n_in, n_out, bias=bias, partition_sizes=sizes)
            torch.manual_seed(0)
            ref = parallel.ColumnParallelLinear(n_in, n_out, bias=bias, partition_sizes=sizes,
                                                state=single)
            with torch.no_grad():  # nonzero bias so its gradient path is exercised
                for p, q in zip(layer.parameters(), ref.parameters()):
                    if p.dim() == 1:
                        q.copy_(seeded(6, *q.shape)); p.copy_(shard_full(q, p))
            close(gather_full(layer.weight), ref.weight, "column weight == tp=1 weight")
            xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            y, y_ref = layer(xl), ref(xr)
            dy_ref = seeded(7, *y_ref.shape)
            y.backward(shard_full(dy_ref.transpose(0, -1), layer.weight).transpose(0, -1))
            y_ref.backward(dy_ref)
            close(y, shard_full(y_ref.transpose(0, -1), layer.weight).transpose(0, -1),
                  f"column forward bias={bias} sizes={sizes}")
            close(xl.grad, xr.grad, "column input grad")
            close(gather_full(layer.weight, tensor=layer.weight.grad), ref.weight.grad,
                  "column weight grad")
            if bias:
                close(gather_full(layer.bias, tensor=layer.bias.grad), ref.bias.grad,
                      "column bias grad")

    torch.manual_seed(1)
    gathered = parallel.ColumnParallelLinear(n_in, n_out, gather_output=True)
    torch.manual_seed(1)
    ref = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        ref.weight.copy_(gather_full(gathered.weight)); ref.bias.zero_()
    close(gathered(x), ref(x), "column gather_output forward")

    for input_is_parallel in (True, False):
        torch.manual_seed(2)
        layer = parallel.RowParallelLinear(n_out, n_in, input_is_parallel=input_is_parallel)
        torch.manual_seed(2)
        ref = parallel.RowParallelLinear(n_out, n_in, state=single)
        with torch.no_grad():
            ref.bias.copy_(seeded(8, n_in)); layer.bias.copy_(ref.bias)
        close(gather_full(layer.weight), ref.weight, "row weight == tp=1 weight")
        h = seeded(9, b, s, n_out)
        hl = (h.chunk(tp, -1)[r] if input_is_parallel else h).clone().requires_grad_()
        hr = h.clone().requires_grad_()
        y, y_ref = layer(hl), ref(hr)
        dy = seeded(11, *y_ref.shape)
        y.backward(dy); y_ref.backward(dy)
        close(y, y_ref, f"row forward input_is_parallel={input_is_parallel}")
        close(hl.grad, hr.grad.chunk(tp, -1)[r] if input_is_parallel else hr.grad, "row dx")
        close(gather_full(layer.weight, tensor=layer.weight.grad), ref.weight.grad, "row dW")
        close(layer.bias.grad, ref.bias.grad, "row bias grad (bias added once)")

    # skip_bias_add returns the bias for the caller to fuse.
    torch.manual_seed(2)
    layer = parallel.RowParallelLinear(n_out, n_in, skip_bias_add=True)
    out, bias = layer(seeded(9, b, s, n_out).chunk(tp, -1)[r])
    assert bias is layer.bias and out.shape == (b, s, n_in)

    # Sequence parallel: column gathers the sequence, row reduce-scatters it; a column->row
    # pair equals the dense MLP, and each rank keeps its sequence chunk.
    torch.manual_seed(3)
    col = parallel.ColumnParallelLinear(n_in, n_out, sequence_parallel=True)
    row = parallel.RowParallelLinear(n_out, n_in, sequence_parallel=True)
    torch.manual_seed(3)
    col_ref = parallel.ColumnParallelLinear(n_in, n_out, state=single)
    row_ref = parallel.RowParallelLinear(n_out, n_in, state=single)
    with torch.no_grad():
        row_ref.bias.copy_(seeded(12, n_in)); row.bias.copy_(row_ref.bias)
    xs = x.chunk(tp, 1)[r].clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y, y_ref = row(F.gelu(col(xs))), row_ref(F.gelu(col_ref(xr)))
    dy = seeded(13, *y_ref.shape)
    y.backward(dy.chunk(tp, 1)[r]); y_ref.backward(dy)
    close(y, y_ref.chunk(tp, 1)[r], "sequence-parallel column->row forward")
    close(xs.grad, xr.grad.chunk(tp, 1)[r], "sequence-parallel input grad")
    close(gather_full(col.weight, tensor=col.weight.grad), col_ref.weight.grad, "sp col dW")
    close(gather_full(row.weight, tensor=row.weight.grad), row_ref.weight.grad, "sp row dW")
    close(row.bias.grad, row_ref.bias.grad, "sp row bias grad summed over the TP group")


def check_embedding_and_cross_entropy(ps):
    tp, r = ps.tp, ps.tp_rank
    vocab, dim = 13, 6                       # 13 is not divisible by 2 or 4: padding
    tokens = torch.tensor([[0, 12, 5, 7], [3, 3, 11, 1]])
    torch.manual_seed(4)
    emb = parallel.VocabParallelEmbedding(vocab, dim)
    torch.manual_seed(4)
    ref = parallel.VocabParallelEmbedding(vocab, dim, state=ParallelState())
    assert emb.padded_size % tp == 0 and emb.padded_size >= vocab
    table = gather_full(emb.weight)
    close(table, ref.weight, "embedding table == tp=1 table")
    out = emb(tokens)
    close(out, F.embedding(tokens, table), "embedding forward")
    dout = seeded(14, *out.shape)
    out.backward(dout)
    ref_table = table.clone().requires_grad_()
    F.embedding(tokens, ref_table).backward(dout)
    close(gather_full(emb.weight, tensor=emb.weight.grad), ref_table.grad, "embedding grad")
    assert emb.weight.grad[max(0, vocab - emb.vocab_start):].abs().sum() == 0, \
        "padding rows got a gradient"
    with pytest.raises(ValueError, match="token ids must lie"):
        emb(torch.tensor([[vocab]]))

    # Sequence-parallel embedding: reduce-scatter along the sequence.
    sp_emb = parallel.VocabParallelEmbedding(vocab, dim, sequence_parallel=True)
    with torch.no_grad():
        sp_emb.weight.copy_(emb.weight)
    seq_tokens = torch.arange(4 * tp).remainder(vocab).view(1, -1)
    close(sp_emb(seq_tokens), F.embedding(seq_tokens, table).chunk(tp, 1)[r], "sp embedding")

    # Cross-entropy over the vocabulary shards vs F.cross_entropy on gathered logits.
    padded = emb.padded_size
    full_logits = seeded(15, 3, 5, padded)
    target = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(16))
    target[0, 1] = target[2, 4] = -100
    for smoothing in (0.0, 0.1):
        local = full_logits.chunk(tp, -1)[r].clone().requires_grad_()
        loss = parallel.vocab_parallel_cross_entropy(local, target, vocab,
                                                     label_smoothing=smoothing)
        ref_logits = full_logits[..., :vocab].clone().requires_grad_()
        ref_loss = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1),
                                   reduction="none", label_smoothing=smoothing).view(3, 5)
        close(loss, ref_loss, f"vocab-parallel CE forward (smoothing={smoothing})")
        assert loss.dtype == torch.float32 and loss[0, 1] == 0 and loss[2, 4] == 0
        dloss = seeded(17, 3, 5)
        loss.backward(dloss); ref_loss.backward(dloss)
        grad_full = F.pad(ref_logits.grad, (0, padded - vocab))
        close(local.grad, grad_full.chunk(tp, -1)[r], f"vocab-parallel CE grad ({smoothing})")
    # fp16/bf16 logits: fp32 math and a loss in fp32.
    half = full_logits.chunk(tp, -1)[r].to(torch.bfloat16)
    loss = parallel.vocab_parallel_cross_entropy(half, target, vocab)
    ref_loss = F.cross_entropy(full_logits[..., :vocab].to(torch.bfloat16).float()
                               .reshape(-1, vocab), target.reshape(-1), reduction="none")
    close(loss, ref_loss.view(3, 5), "bf16 logits, fp32 loss", atol=1e-4)
    with pytest.raises(ValueError, match="targets must lie"):
        parallel.vocab_parallel_cross_entropy(full_logits.chunk(tp, -1)[r],
                                              torch.full((3, 5), vocab), vocab)


def check_linear_cross_entropy(ps):
    """Fused head + loss on vocab shards vs the dense head and F.cross_entropy, with and
    without sequence parallelism; the vocab (13) needs padding at tp = 2 and 4."""
    tp, r = ps.tp, ps.tp_rank
    vocab, dim, b, s = 13, 6, 2, 4 * tp
    padded = -(-vocab // tp) * tp
    weight_full = seeded(50, padded, dim)
    hidden = seeded(51, b, s, dim)
    target = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(52))
    target[0, 1] = target[1, -1] = -100
    ref_h = hidden.clone().requires_grad_()
    ref_w = weight_full.clone().requires_grad_()
    ref = F.cross_entropy((ref_h @ ref_w[:vocab].t()).reshape(-1, vocab), target.reshape(-1))
    ref.backward()
    for sp in (False, True):
        w = weight_full.chunk(tp, 0)[r].clone().requires_grad_()
        h = (hidden.chunk(tp, 1)[r] if sp else hidden).clone().requires_grad_()
        loss = parallel.vocab_parallel_linear_cross_entropy(
            h, w, target, vocab, sequence_parallel=sp, chunk_size=6)
        loss.backward()
        close(loss, ref, f"fused linear CE loss (sp={sp})")
        close(h.grad, ref_h.grad.chunk(tp, 1)[r] if sp else ref_h.grad,
              f"fused linear CE hidden grad (sp={sp})")
        close(w.grad, ref_w.grad.chunk(tp, 0)[r], f"fused linear CE weight grad (sp={sp})")
        assert w.grad[max(0, vocab - r * w.shape[0]):].abs().sum() == 0, "padding rows"


def check_rng_tracker(ps):
    torch.manual_seed(0)
    tracker = parallel.model_parallel_seed(1234)
    outside = F.dropout(torch.ones(64), 0.5)
    with tracker.fork():
        inside = F.dropout(torch.ones(64), 0.5)
    after = F.dropout(torch.ones(64), 0.5)
    masks = comm.all_gather(torch.stack([outside, inside, after]).unsqueeze(0), ps.tp_group, 0)
    for i in range(1, ps.tp):
        assert torch.equal(masks[i, 0], masks[0, 0]), "dropout outside TP regions must agree"
        assert torch.equal(masks[i, 2], masks[0, 2]), "fork must not advance the default stream"
        assert not torch.equal(masks[i, 1], masks[0, 1]), "TP-region dropout must differ"
    # Against fresh generators seeded by the documented formula (parallel/random.py): the
    # default stream from the seed itself, the TP stream from seed + 2718 + 100 pp + tp.
    def dropout_mask(gen):
        return torch.empty(64).bernoulli_(0.5, generator=gen) * 2.0  # as F.dropout draws
    default = torch.Generator().manual_seed(1234)
    assert torch.equal(outside, dropout_mask(default)), "default stream: seed"
    assert torch.equal(after, dropout_mask(default)), "default stream after the fork"
    tp_stream = torch.Generator().manual_seed(1234 + 2718 + 100 * ps.pp_rank + ps.tp_rank)
    assert torch.equal(inside, dropout_mask(tp_stream)), "TP stream: seed + 2718 + tp_rank"


def check_agree(rank, world):
    """comm.agree, the collective error check: every rank's payload in rank order; one
    rank's error raises there and, as a PeerFailure naming it, on every other rank."""
    assert comm.agree(None, "sharing", payload=rank * 10) == [10 * r for r in range(world)]
    error = ValueError("disk full") if rank == 1 else None
    with pytest.raises(ValueError if rank == 1 else comm.PeerFailure) as raised:
        comm.agree(error, "saving")
    if rank != 1:
        assert str(raised.value) == "saving failed on rank(s) [1]: {1: 'ValueError: disk full'}"


def _coordinates(rank, tp, cp, dp):
    """(pp, dp, cp, tp) ranks of a global rank by DESIGN.md's formula, read backwards."""
    return rank // (dp * cp * tp), rank // (cp * tp) % dp, rank // tp % cp, rank % tp


def check_context_and_expert_groups(rank, world):
    """Every group of a layout with cp and ep is the set of ranks DESIGN.md's formula puts in
    it, and a sum over each group adds exactly its members."""
    for tp, cp, pp, ep in ((1, 2, 1, 4), (1, 2, 2, 2), (2, 2, 1, 2), (1, 1, 1, 2)):
        ps = parallel.initialize(tp=tp, cp=cp, pp=pp, ep=ep)
        dp = world // (tp * cp * pp)
        assert (ps.dp, ps.world_size, ps.rank) == (dp, world, rank)
        me = _coordinates(rank, tp, cp, dp)
        assert (ps.pp_rank, ps.dp_rank, ps.cp_rank, ps.tp_rank) == me
        same = lambda *keep: [r for r in range(world) if all(  # noqa: E731
            _coordinates(r, tp, cp, dp)[i] == me[i] for i in keep)]
        stage = same(0)
        local = stage.index(rank)
        expected = {"tp": same(0, 1, 2), "cp": same(0, 1, 3), "dp": same(0, 2, 3),
                    "dp_cp": same(0, 3), "pp": same(1, 2, 3),
                    "ep": [r for r in stage if stage.index(r) // ep == local // ep],
                    "expert_dp": [r for r in stage if stage.index(r) % ep == local % ep]}
        for kind, ranks in expected.items():
            assert getattr(ps, f"{kind}_ranks") == ranks, (kind, tp, cp, pp, ep)
            total = comm.all_reduce(torch.tensor([float(rank)]), getattr(ps, f"{kind}_group"))
            assert total.item() == sum(ranks), (kind, tp, cp, pp, ep)
        assert (ps.ep_rank, ps.expert_dp_rank) == (local % ep, local // ep)
        assert ps.dp_cp_rank == ps.dp_cp_ranks.index(rank)
        assert ps.expert_dp == len(ps.expert_dp_ranks)
        parallel.destroy()


def _layers_world(rank, world):
    check_agree(rank, world)
    check_context_and_expert_groups(rank, world)
    for tp in (1, 2, 4):
        ps = parallel.initialize(tp=tp)
        check_comm_ops(ps)
        check_linear_layers(ps)
        check_embedding_and_cross_entropy(ps)
        check_linear_cross_entropy(ps)
        check_rng_tracker(ps)
    # The bytes a column->row pair sends per step: one all-reduce of b*s*h each way.
    ps = parallel.initialize(tp=4)
    col = parallel.ColumnParallelLinear(16, 32, bias=False)
    row = parallel.RowParallelLinear(32, 16, bias=False)
    x = torch.randn(2, 8, 16, requires_grad=True)
    with parallel.count_comm() as stats:
        row(col(x)).sum().backward()
    assert stats.bytes == {"all_reduce": 2 * x.numel() * 4}, stats
    # Shard-local init: each rank draws its own shard, reproducibly, with the right spread.
    for layer_cls in (parallel.ColumnParallelLinear, parallel.RowParallelLinear):
        weights = []
        for _ in range(2):
            torch.manual_seed(5)
            weights.append(layer_cls(64, 64, bias=False, master_init=False).weight.detach())
        assert torch.equal(*weights), "local init must be reproducible from the seed"
        shards = comm.all_gather(weights[0].unsqueeze(0), ps.tp_group, 0)
        assert all(not torch.equal(shards[i], shards[0]) for i in range(1, ps.tp)), \
            f"{layer_cls.__name__}: local init must differ per TP rank"
        assert abs(weights[0].std().item() - 1 / (3 * 64) ** 0.5) < 0.02
    return True


def test_layers_match_dense_at_tp_1_2_4():
    assert run_world(4, _layers_world) == [True] * 4


def test_layers_single_process_without_distributed():
    parallel.destroy()
    ps = parallel.initialize()
    assert (ps.tp, ps.pp, ps.dp, ps.tp_group) == (1, 1, 1, None)
    check_comm_ops(ps)
    check_linear_layers(ps)
    check_embedding_and_cross_entropy(ps)
    check_linear_cross_entropy(ps)
    parallel.destroy()


def test_bad_sizes_raise_before_any_collective():
    parallel.destroy()
    with pytest.raises(ValueError, match="not divisible by tp"):
        parallel.initialize(tp=2)   # one process cannot hold tp=2
    with pytest.raises(ValueError, match="tp must be"):
        parallel.initialize(tp=0)
    with pytest.raises(ValueError, match="dp must be"):
        parallel.initialize(dp=0)
    with pytest.raises(ValueError, match="does not equal the world size"):
        parallel.initialize(dp=2)
    from megalite.parallel.state import check_layout
    with pytest.raises(ValueError, match="not divisible"):
        check_layout(2, 2, None, 6)
    assert check_layout(2, 2, None, 8) == 2
    assert check_layout(1, 1, None, 8, cp=2, ep=4) == 4
    with pytest.raises(ValueError, match=r"tp\*cp\*pp = 1\*4\*1 = 4.*--cp"):
        check_layout(1, 1, None, 6, cp=4)
    with pytest.raises(ValueError, match=r"ep = 3 does not divide the tp\*cp\*dp = 4 .*\[1, 2, 4\]"):
        check_layout(1, 2, None, 8, ep=3)
    with pytest.raises(ValueError, match="cp must be"):
        parallel.initialize(cp=0)
    with pytest.raises(ValueError, match="divisible by tp"):
        parallel.ColumnParallelLinear(4, 6, state=ParallelState(tp=4))
    with pytest.raises(ValueError, match="partition_sizes"):
        parallel.ColumnParallelLinear(4, 8, partition_sizes=[4, 2])
    with pytest.raises(ValueError, match="input_is_parallel"):
        parallel.RowParallelLinear(4, 4, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError, match="gather_output would interleave"):
        parallel.ColumnParallelLinear(4, 8, gather_output=True, partition_sizes=[4, 4])
    # vocab_size beyond the logits' (padded) columns, or 0: refused, never read past them
    ps, logits, target = parallel.initialize(), torch.zeros(3, 10), torch.zeros(3).long()
    for vocab in (11, 0):
        with pytest.raises(ValueError, match=r"must be in \(0, 10\]"):
            parallel.vocab_parallel_cross_entropy(logits, target, vocab_size=vocab, state=ps)
        with pytest.raises(ValueError, match=r"must be in \(0, 10\]"):
            parallel.vocab_parallel_linear_cross_entropy(torch.zeros(3, 4), torch.zeros(10, 4),
                                                         target, vocab_size=vocab, state=ps)


def test_defaults_and_padding_rows_of_a_locally_initialized_embedding():
    """The design's defaults (bias on), and a vocabulary of 10 over tp = 4 (padded to 12, 3
    rows per rank) initialized per shard: exactly the rows past the vocabulary are zero."""
    parallel.destroy()
    assert parallel.ColumnParallelLinear(4, 8).bias is not None
    assert parallel.RowParallelLinear(8, 4).bias is not None
    for r in range(4):
        emb = parallel.VocabParallelEmbedding(10, 4, master_init=False,
                                              state=ParallelState(tp=4, tp_rank=r))
        real = max(0, min(3, 10 - 3 * r))
        assert emb.weight.shape == (3, 4)
        assert (emb.weight[real:] == 0).all() and (emb.weight[:real] != 0).all(), r


def test_rank_layout_matches_design():
    groups = parallel.group_ranks(tp=2, pp=2, dp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["dp_cp"] == groups["dp"]  # cp = 1: data x context is data
    # DESIGN.md with cp: tp innermost, then cp, then dp, then pp
    groups = parallel.group_ranks(tp=2, pp=1, dp=2, cp=2, ep=4)
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
