"""Mixture of Experts: the layer against a token-by-token reference, Hugging Face Mixtral /
Qwen2-MoE / Qwen3-MoE logits and round trips, training parity with HF Mixtral (aux loss
included), and one world of 4 processes checking every expert-parallel layout against one
process: HF logits at (tp, ep) = (1,2), (2,2), (1,4) (Qwen3-MoE at (2,2)); 3 training steps at ep 2 and 4,
tp 2 x ep 2 with sequence parallelism, pp 2 x ep 2 with the distributed optimizer and a
zero-bubble schedule; a checkpoint saved at ep 2 resumed at ep 1 and ep 4.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.models.moe import MoE
from megalite.parallel import ParallelState
from megalite.parallel.sharding import gather_full
from megalite.pipeline import build_schedule, rank_stages
from megalite.training.cli import check_args, parse_args
from megalite.training.errors import UsageError
from megalite.training.step import distributed_optimizer, train_step
from world import run_world

transformers = pytest.importorskip("transformers")

CFG = GPTConfig.preset("tiny-moe", n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                       moe_d_ff=32, max_seq_len=16, kernels="torch", moe_z_loss_coeff=1e-3)
GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 4, 1, 8, 3


# ----------------------------------------------------------------------------- one process
def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definitions (ep = tp = 1)."""
    cfg, out = moe.cfg, torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = moe.router.weight @ x[t]
        if cfg.moe_router == "softmax":
            p = torch.softmax(logits, -1)
            top = torch.topk(p, cfg.moe_top_k).indices
            w = p[top]
        else:
            s = torch.sigmoid(logits)
            top = torch.topk(s + moe.router.score_bias, cfg.moe_top_k).indices
            w = s[top]
        if cfg.moe_norm_topk:
            w = w / w.sum()
        w = w * cfg.moe_routed_scaling
        for e, we in zip(top.tolist(), w):
            gate, up = (moe.experts.up[e] @ x[t]).split(cfg.moe_d_ff)
            out[t] += we * (moe.experts.down[e] @ (F.silu(gate) * up))
    if moe.shared is not None:
        shared = moe.shared(x[None])[0]
        if cfg.moe_shared_gate:
            shared = shared * torch.sigmoid(x @ moe.shared_gate[0])[:, None]
        out = out + shared
    return out


@pytest.mark.parametrize("extra", [
    dict(),
    dict(moe_norm_topk=False, moe_shared_d_ff=48, moe_shared_gate=True),
    dict(moe_router="sigmoid", moe_routed_scaling=2.5, moe_router_bias_update=0.1,
         moe_shared_d_ff=48)])
def test_layer_matches_token_by_token_reference(extra):
    torch.manual_seed(0)
    cfg = CFG.replace(n_layers=1, **extra)
    model = GPT(cfg)
    moe = model.layers["0"].mlp
    if cfg.moe_router == "sigmoid":
        moe.router.score_bias.data = torch.randn(cfg.moe_num_experts)
    x = torch.randn(3, 5, cfg.d_model)
    out = moe(x)
    assert (out - _naive_moe(moe, x.reshape(-1, cfg.d_model)).view_as(out)).abs().max() < 1e-5


def test_losses_capacity_and_bias_update():
    torch.manual_seed(0)
    cfg = CFG.replace(n_layers=1, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    moe = GPT(cfg).layers["0"].mlp
    x = torch.randn(40, cfg.d_model)
    logits, chosen, _, probs = moe.route(x)
    counts = torch.bincount(chosen.reshape(-1), minlength=cfg.moe_num_experts).float()
    balance = cfg.moe_num_experts * (counts / 40 * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    _, aux = moe._routed(x)
    assert abs(aux.item() - (0.1 * balance + 0.01 * z).item()) < 1e-6
    # The aux loss reaches the router's gradient through the output (loss scale 1).
    moe.zero_grad()
    moe(x[None]).sum().backward()
    with_aux = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.cfg = cfg.replace(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)
    moe(x[None]).sum().backward()
    assert (with_aux - moe.router.weight.grad).abs().max() > 1e-4
    # Capacity 1 token copy per expert: at most E of the 80 copies survive.
    moe.cfg = cfg.replace(moe_capacity_factor=cfg.moe_num_experts / 80)
    y, _ = moe._routed(x)
    kept = (y.abs().sum(-1) > 0).sum().item()
    assert 1 <= kept <= cfg.moe_num_experts
    # DeepSeek's bias: the most loaded expert's bias goes down, the least loaded one's up.
    sig = GPTConfig.preset("tiny-moe", n_layers=1, moe_router="sigmoid",
                           moe_router_bias_update=0.5)
    model = GPT(sig).train()
    model(torch.randint(0, 256, (2, 16)))
    load = model.layers["0"].mlp.step_counts.clone()
    metrics = model.finish_step()
    bias = model.layers["0"].mlp.router.score_bias
    assert bias[load.argmax()] == -0.5 and bias[load.argmin()] == 0.5
    assert metrics["expert_load"]["0"] == pytest.approx((load.max() / load.mean()).item(),
                                                       rel=1e-3)


def test_full_recompute_counts_each_token_once():
    losses, metrics = [], []
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = GPT(CFG.replace(n_layers=2, recompute=mode))
        tokens = torch.randint(0, 256, (2, 9))
        res = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), tokens[:, :-1],
                         tokens[:, 1:], micro_batch_size=1)
        losses.append(res.loss)
        metrics.append(res.moe)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and metrics[0] == metrics[1]


def test_config_layers_and_params():
    cfg = GPTConfig.preset("tiny-moe", n_layers=8, moe_first_k_dense=1, moe_layer_freq=2,
                           moe_dense_layers=(5,))
    assert cfg.moe_layers == [1, 3, 7]
    with pytest.raises(ValueError, match="moe_top_k=9"):
        GPTConfig.preset("tiny-moe", moe_top_k=9)
    mixtral = GPTConfig.preset("mixtral-8x7b")
    assert round(mixtral.num_params() / 1e9, 1) == 46.7
    assert round(mixtral.num_params(active=True) / 1e9, 1) == 12.9
    assert round(GPTConfig.preset("deepseek-v3").num_params() / 1e9) == 671
    from megalite.models.hf_config import family_of
    assert family_of(GPTConfig.preset("tiny-moe")) == "mixtral"
    assert family_of(GPTConfig.preset("qwen3-30b-a3b")) == "qwen3_moe"
    with pytest.raises(ValueError, match="no Hugging Face MoE architecture"):
        family_of(GPTConfig.preset("deepseek-v3"))


@pytest.mark.parametrize("flags, world, message", [
    (["--ep", "3"], 4, "--ep 3 must divide the 4 ranks"),
    (["--ep", "4", "--tp", "1"], 4, None),
    (["--ep", "16"], 16, "--ep 16 must divide the model's 8 experts"),
    (["--ep", "2", "--model", "tiny"], 2, "this model is dense"),
])
def test_ep_flag_checks(flags, world, message):
    args = parse_args(["--model", "tiny-moe", "--global-batch-size", "32", *flags])
    if message is None:
        assert check_args(args, world).cfg.moe_num_experts == 8
        return
    with pytest.raises(UsageError, match=message):
        check_args(args, world)


def test_top_k_above_experts_is_one_line(tmp_path):
    hf_moe("Mixtral", num_experts_per_tok=5).config.save_pretrained(str(tmp_path))
    with pytest.raises(UsageError, match="moe_top_k=5 must be in .1, moe_num_experts=4"):
        check_args(parse_args(["--init-from-hf", str(tmp_path)]), 1)


# ----------------------------------------------------------------------------- Hugging Face
def hf_moe(family, layers=2, **extra):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, initializer_range=0.1)
    if family == "Mixtral":
        kw = dict(intermediate_size=48, num_local_experts=4)
    else:
        kw = dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                  norm_topk_prob=True)
        if family == "Qwen2Moe":
            kw.update(shared_expert_intermediate_size=40, mlp_only_layers=[0])
        else:
            kw.update(head_dim=16)
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**common, **kw, **extra})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # transformers 5 leaves the fused experts uninitialized
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("family", ["Mixtral", "Qwen3Moe", "Qwen2Moe"])
def test_hf_logits_and_round_trip(family, tmp_path):
    from megalite.models import from_hf, save_hf
    hf = hf_moe(family)
    x = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        ref = hf(x).logits
        model = from_hf(hf).eval()          # in memory: transformers 5's fused experts
        assert (model(x)[..., :64] - ref).abs().max() < 1e-4
        save_hf(model, str(tmp_path))       # per-expert tensors, as save_pretrained writes
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        assert type(back) is type(hf)
        assert (back(x).logits - ref).abs().max() < 1e-5
        assert (from_hf(str(tmp_path)).eval()(x)[..., :64] - ref).abs().max() < 1e-4


def test_training_parity_with_hf_mixtral():
    """10 AdamW steps from the same weights: megalite's train_step against HF Mixtral's
    forward with the load-balancing loss (HF's own function, per layer: HF sums it over
    all layers' router logits at once, megalite per layer as Megatron does; for one layer
    they are equal, and per layer each is HF's definition)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from megalite.models import from_hf
    coeff = 0.05
    hf = hf_moe("Mixtral").train()
    model = from_hf(hf, moe_aux_loss_coeff=coeff).train()
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=3e-3, weight_decay=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    for step in range(10):
        data = torch.randint(0, 64, (4, 13), generator=g)
        tokens, targets = data[:, :-1], data[:, 1:]
        res = train_step(model, opt, tokens, targets, micro_batch_size=4, max_grad_norm=1.0)
        opt_hf.zero_grad()
        out = hf(tokens, output_router_logits=True)
        ce = F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1))
        aux = sum(load_balancing_loss_func((r,), 4, 2) for r in out.router_logits)
        (ce + coeff * aux).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        assert abs(res.loss - ce.item()) < 1e-4, (step, res.loss, ce.item())
        assert abs(res.moe["aux_loss"] - coeff * aux.item()) < 1e-5, step
    with torch.no_grad():
        x = torch.randint(0, 64, (2, 12), generator=g)
        assert (model.eval()(x)[..., :64] - hf.eval()(x).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------- one world
def _batches():
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        data = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
        yield data[:, :-1], data[:, 1:]


def _train(cfg, ps, schedule="1f1b", dist_opt=False, load=None, save=None):
    """Train the fixed batches (from ``load``'s step on; ``save`` a checkpoint after the
    next-to-last); returns the losses and every parameter's full tensor after each step."""
    from megalite.training.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    m = GLOBAL_BATCH // (MICRO_BATCH * ps.dp)
    table = build_schedule(schedule, ps.pp, m)
    stages = rank_stages(table)[ps.pp_rank]
    model = GPT(cfg, ps, stages=stages, num_stages=sum(map(len, rank_stages(table).values())))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    if dist_opt:
        opt = distributed_optimizer(opt, model)
    start = 0
    if load:
        start = load_checkpoint(load, model, opt)
    per_rank, records = GLOBAL_BATCH // ps.dp, []
    for step, (tokens, targets) in enumerate(_batches()):
        if step < start:
            continue
        mine = slice(ps.dp_rank * per_rank, (ps.dp_rank + 1) * per_rank)
        res = train_step(model, opt, tokens[mine], targets[mine], micro_batch_size=MICRO_BATCH,
                         schedule=schedule, max_grad_norm=0.5)
        params = {n: gather_full(p, ps).clone() for n, p in model.named_parameters()}
        records.append((step, res.loss, res.moe.get("aux_loss"), params))
        if save and step == STEPS - 2:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            sampler = type("S", (), {"state_dict": lambda self: {}})()
            save_checkpoint(save, step + 1, model, opt, sched, sampler)
    return records


def _compare(records, reference, where):
    ref = {step: rest for step, *rest in reference}
    for step, loss, aux, params in records:
        ref_loss, ref_aux, ref_params = ref[step]
        assert abs(loss - ref_loss) < 1e-5, f"{where} step {step}: loss {loss} != {ref_loss}"
        assert abs(aux - ref_aux) < 1e-6, f"{where} step {step}: aux {aux} != {ref_aux}"
        for name, p in params.items():
            err = (p - ref_params[name]).abs().max().item()
            assert err < 1e-5, f"{where} step {step}: {name} off by {err:.2e}"


def _hf_logits(directory, x, ref, tp, ep, save_dir=None):
    from megalite.models import from_hf, save_hf
    from megalite.parallel.comm import gather_from_tp_region
    ps = parallel.initialize(tp=tp, ep=ep)
    model = from_hf(directory, ps).eval()
    with torch.no_grad():
        out = gather_from_tp_region(model(x), ps.tp_group)[..., :ref.shape[-1]]
    err = (out - ref).abs().max().item()
    assert err < 1e-4, f"{directory} at tp={tp} ep={ep}: logits off by {err:.2e}"
    if save_dir:
        save_hf(model, save_dir)
    parallel.destroy()


def _world(rank, world, hf_dirs, hf_refs, x, ckpt, round_trip):
    for i, (directory, ref) in enumerate(zip(hf_dirs, hf_refs)):
        for tp, ep in ((1, 2), (2, 2), (1, 4)) if i == 0 else ((2, 2),):
            _hf_logits(directory, x, ref, tp, ep,
                       save_dir=round_trip if (tp, ep) == (2, 2) and i == 0 else None)
    reference = _train(CFG, ParallelState())
    # (tp, pp, ep, sequence parallel, schedule, distributed optimizer); ep 2 saves with the
    # distributed optimizer a checkpoint that plain SGD resumes at ep 1 and 4
    layouts = [
        (1, 1, 2, False, "1f1b", True), (1, 1, 4, False, "1f1b", False),
        (2, 1, 2, True, "1f1b", False), (2, 1, 2, False, "1f1b", False),
        (1, 2, 2, False, "1f1b", True),
        (1, 2, 2, False, "zb-h1", False)]
    for tp, pp, ep, sp, schedule, dist_opt in layouts:
        ps = parallel.initialize(tp=tp, pp=pp, ep=ep)
        where = f"tp={tp} pp={pp} ep={ep} sp={sp} {schedule} dist_opt={dist_opt}"
        save = ckpt if (tp, pp, ep) == (1, 1, 2) else None  # resumed below at ep 1 and 4
        _compare(_train(CFG.replace(sequence_parallel=sp), ps, schedule, dist_opt, save=save),
                 reference, where)
        parallel.destroy()
    for ep in (1, 4):
        ps = parallel.initialize(ep=ep)
        _compare(_train(CFG, ps, load=ckpt), reference, f"resumed at ep={ep}")
        parallel.destroy()
    _idle_experts(rank)
    return True


def _idle_experts(rank):
    """Every token picks experts 0 and 1 (ep rank 0's): ranks 1-3 receive no rows, join the
    all-to-alls with nothing, and their experts' (zero) gradients do not hold up the step."""
    cfg = CFG.replace(n_layers=2, moe_router="sigmoid")
    losses = []
    for ep in (4, 1):
        ps = parallel.initialize(ep=ep) if ep > 1 else ParallelState()
        torch.manual_seed(0)
        model = GPT(cfg, ps)
        for layer in model.layers.values():
            layer.mlp.router.score_bias.data[:2] = 100.0
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tokens, targets = next(_batches())
        mine = slice(ps.dp_rank * 4 // ps.dp, (ps.dp_rank + 1) * 4 // ps.dp)
        losses.append(train_step(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                 tokens[:4][mine], targets[:4][mine], micro_batch_size=1).loss)
        if ep > 1:
            for name, p in model.named_parameters():
                if ".experts." in name:
                    assert torch.equal(p, before[name]) == (rank > 0), (rank, name)
            parallel.destroy()
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_expert_parallel_layouts_match_one_process(tmp_path):
    dirs, refs = [], []
    x = torch.randint(0, 64, (2, 8))
    for family in ("Mixtral", "Qwen3Moe"):
        hf = hf_moe(family)
        hf.save_pretrained(str(tmp_path / family))
        dirs.append(str(tmp_path / family))
        with torch.no_grad():
            refs.append(hf(x).logits)
    round_trip = str(tmp_path / "round_trip")
    assert run_world(4, _world, dirs, refs, x, str(tmp_path / "ckpt"), round_trip,
                     timeout=400) == [True] * 4
    back = transformers.AutoModelForCausalLM.from_pretrained(round_trip).eval()
    with torch.no_grad():
        assert (back(x).logits - refs[0]).abs().max() < 1e-5
