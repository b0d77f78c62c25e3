"""The planner's precision modes, FSDP, context and expert parallelism: bytes per parameter
against counts written out here from the published shapes, monotonicity in fsdp/cp/ep, and
the command line with the dimensions fixed. In-process, no distributed world."""
import pytest

from megalite.models import GPTConfig
from megalite.plan import Layout, invalid_reason, memory, step_time
from megalite.plan.__main__ import main
from megalite.plan.comm import p2p_time
from megalite.plan.gpus import get_gpu
from megalite.plan.params import model_flops_per_token, model_parameters

LLAMA7B = GPTConfig.preset("llama-7b")
# Mixtral 8x7B and Qwen3-30B-A3B shapes (their config.json on the Hugging Face hub)
MIXTRAL = GPTConfig(vocab_size=32000, n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096,
                    d_ff=14336, max_seq_len=32768, rope_theta=1e6, moe_num_experts=8,
                    moe_top_k=2)
QWEN3_MOE = GPTConfig(vocab_size=151936, n_layers=48, n_heads=32, n_kv_heads=4,
                      d_model=2048, d_ff=6144, head_dim=128, max_seq_len=40960, qk_norm=True,
                      moe_num_experts=128, moe_top_k=8, moe_d_ff=768)
BASE = Layout(micro_batch_size=1, seq_len=4096, global_batch_size=64)


def llama7b_counts():
    """Llama-2 7B by hand: per layer q,k,v,o 4 d^2 + SwiGLU 3 d f + 2 norms (FSDP's block);
    FSDP's root group: the embedding, the head and the final norm."""
    d, f, L, V = 4096, 11008, 32, 32000
    layer = 4 * d * d + 3 * d * f + 2 * d
    root = 2 * V * d + d
    return L * layer + root, layer, root


def test_bytes_per_parameter_in_each_mode_at_dp8():
    n, layer, root = llama7b_counts()
    at = BASE.replace(dp=8)
    matmuls = n - (2 * 32 + 1) * 4096 - 32000 * 4096       # what autocast casts
    expected = {   # (mode, bytes per parameter of parameters + gradients + optimizer)
        "bf16 dist-opt": (at.replace(distributed_optimizer=True), 2 + 4 + 12 / 8),
        "autocast dist-opt": (at.replace(autocast=True, distributed_optimizer=True),
                              4 + 4 + 8 / 8 + 2 * matmuls / n),
        "bf16 plain": (at, 2 + 4 + 12),
        "fp32 plain": (at.replace(dtype="fp32"), 4 + 4 + 8),
        # FSDP: 16/dp, the current + prefetched block and one block's fp32 gradient, and
        # the root group gathered for the step with its fp32 gradients
        "fsdp bf16": (at.replace(fsdp=True),
                      16 / 8 + ((2 * 2 + 4) * layer + (2 + 4) * root) / n),
        "fsdp fp32": (at.replace(fsdp=True, dtype="fp32"),
                      16 / 8 + ((2 * 4 + 4) * layer + (4 + 4) * root) / n),
    }
    for mode, (layout, per_param) in expected.items():
        r = memory(LLAMA7B, layout).worst
        assert r.counts["total"] == n
        assert abs(r.bytes_per_parameter() - per_param) < 1e-6, (mode, r.bytes_per_parameter())
    bf16 = memory(LLAMA7B, at.replace(distributed_optimizer=True)).worst
    assert bf16.weight_casts == 0 and bf16.fsdp_working == 0
    assert (bf16.parameters + bf16.gradients + bf16.optimizer_state) / n <= 7.5
    # autocast's 11 bytes: 4 + 4 + 2 (the cast copies) + 1
    auto = memory(LLAMA7B, at.replace(autocast=True, distributed_optimizer=True)).worst
    assert 10.9 < auto.bytes_per_parameter() <= 11.0


def test_fsdp_root_group_lives_on_the_end_stages():
    _, layer, root = llama7b_counts()
    ranks = memory(LLAMA7B, BASE.replace(pp=4, dp=2, fsdp=True, global_batch_size=8)).ranks
    table = 32000 * 4096
    assert [r.counts["root"] for r in ranks] == [table, 0, 0, table + 4096]
    for r in ranks:   # every stage: two gathered bf16 blocks and one fp32 block gradient
        assert r.fsdp_working == (2 * 2 + 4) * layer + (2 + 4) * r.counts["root"]
        assert r.parameters == 4 * -(-r.counts["total"] // 2)


def test_sharding_shrinks_with_dp_and_cp_and_activations_with_cp():
    fsdp = [memory(LLAMA7B, BASE.replace(dp=dp, fsdp=True)).worst.static for dp in (2, 4, 8)]
    assert fsdp[0] > fsdp[1] > fsdp[2]
    # the distributed optimizer shards over dp x cp: dp=2 cp=4 holds what dp=8 holds
    dist = BASE.replace(distributed_optimizer=True)
    assert memory(LLAMA7B, dist.replace(dp=2, cp=4)).worst.optimizer_state == \
        memory(LLAMA7B, dist.replace(dp=8)).worst.optimizer_state
    # activations per rank / cp: the first stage of a pipeline (layers + embedding ids)
    acts = [memory(GPTConfig.preset("llama3.1-8b"), BASE.replace(pp=2, cp=cp, seq_len=16384)
                   ).ranks[0].activations for cp in (1, 2, 4)]
    assert acts[0] == 2 * acts[1] == 4 * acts[2]


def test_cp_time_ring_against_all_to_all_and_one_rank():
    cfg = GPTConfig.preset("llama3.1-8b")
    at = Layout(micro_batch_size=1, seq_len=32768, global_batch_size=8, dp=1)
    one = step_time(cfg, at, "h100")
    ring = {cp: step_time(cfg, at.replace(cp=cp), "h100") for cp in (2, 8)}
    a2a = step_time(cfg, at.replace(cp=8, cp_comm="all-to-all"), "h100")
    # each rank does 1/cp of the matmuls and the (load-balanced) attention
    for cp, t in ring.items():
        assert abs(t.parts["matmul"] * cp - one.parts["matmul"]) < 1e-9 * one.step
        assert abs(t.parts["attention"] * cp - one.parts["attention"]) < 1e-9 * one.step
        assert t.step < one.step
    assert ring[8].parts["cp merge"] > ring[2].parts["cp merge"] > 0
    assert a2a.parts["cp comm (exposed)"] > 0 and "cp merge" not in a2a.parts
    # at 32k the ring hides under the attention; the all-to-all cannot
    assert ring[8].parts["cp comm (exposed)"] == 0


def test_bf16_halves_pipeline_bytes_and_books_no_casts():
    at = BASE.replace(pp=4, global_batch_size=8)
    gpu = get_gpu("h100")
    assert p2p_time(LLAMA7B, at, gpu) * 2 == p2p_time(LLAMA7B, at.replace(autocast=True), gpu)
    bf16, auto = (step_time(LLAMA7B, at.replace(autocast=a), gpu) for a in (False, True))
    assert bf16.parts["grad accumulation casts"] == 0 < auto.parts["grad accumulation casts"]
    assert bf16.step < auto.step


def test_moe_parameters_active_flops_and_experts_per_rank():
    # published: Mixtral 46.7B total / 12.9B active; Qwen3-30B-A3B 30.5B / 3.3B
    for cfg, total, active in ((MIXTRAL, 46.70, 12.88), (QWEN3_MOE, 30.53, 3.35)):
        assert abs(model_parameters(cfg) / 1e9 - total) < 0.01
        assert abs(model_parameters(cfg, active=True) / 1e9 - active) < 0.01
    assert model_parameters(LLAMA7B) == LLAMA7B.num_params()
    assert model_flops_per_token(LLAMA7B, 4096) == LLAMA7B.flops_per_token(4096)
    # experts whole per rank, E/ep of them: one expert = 3 d f_e, per MoE layer
    expert = 3 * 4096 * 14336
    layout = BASE.replace(dp=8, global_batch_size=64)
    for ep in (1, 2, 4, 8):
        r = memory(MIXTRAL, layout.replace(ep=ep)).worst
        assert r.counts["expert"] == 32 * 8 // ep * expert
    # expert parallelism adds the all-to-all; MFU counts the active parameters only
    t1, t8 = (step_time(MIXTRAL, layout.replace(ep=ep), "h100") for ep in (1, 8))
    assert "ep all-to-all" not in t1.parts and t8.parts["ep all-to-all"] > 0
    tokens = layout.global_batch_size * layout.seq_len
    assert abs(t1.mfu * t1.step * 8 * 989e12 - model_flops_per_token(MIXTRAL, 4096) * tokens) \
        < 1e-6 * tokens * 1e9
    # the distributed optimizer shards experts over tp*cp*dp/ep: all 8 experts over 8
    # ranks at ep=1, one whole expert per rank at ep=8: the same optimizer state, and
    # 1/8 of the experts' weights and gradients
    d1, d8 = (memory(MIXTRAL, layout.replace(ep=ep, distributed_optimizer=True)).worst
              for ep in (1, 8))
    assert d8.optimizer_state == d1.optimizer_state
    dense = d1.counts["total"] - d1.counts["expert"]
    assert d1.gradients - 4 * dense == 8 * (d8.gradients - 4 * dense) == 4 * 32 * 8 * expert


def test_invalid_cp_ep_fsdp_layouts_say_why():
    cases = [(LLAMA7B, BASE.replace(cp=3, seq_len=4095), "divisible by 2*cp=6"),
             (LLAMA7B, BASE.replace(cp=8, tp=8, cp_comm="all-to-all"), "heads per tp rank"),
             (LLAMA7B, BASE.replace(ep=2, dp=2), "Mixture-of-Experts"),
             (MIXTRAL, BASE.replace(ep=16, dp=16), "does not divide the 8 experts"),
             (MIXTRAL, BASE.replace(ep=4, dp=2), "tp*cp*dp=2 ranks"),
             (MIXTRAL, BASE.replace(tp=2), "sequence parallelism"),
             (MIXTRAL, BASE.replace(cp=2), "MoE layers do not run with context parallelism"),
             (MIXTRAL, BASE.replace(cp=2, cp_comm="all-to-all"), "context parallelism yet"),
             (LLAMA7B, BASE.replace(dp=2, fsdp=True, distributed_optimizer=True),
              "drop distributed_optimizer"),
             (LLAMA7B, BASE.replace(dp=2, fsdp=True, dtype="fp16"), "FSDP runs in bf16"),
             (LLAMA7B, BASE.replace(dtype="fp32", autocast=True), "autocast needs")]
    for cfg, layout, words in cases:
        assert words in (invalid_reason(cfg, layout) or ""), (layout, words)


def test_mixtral_search_at_32k_plans_no_context_parallelism():
    """The runtime refuses MoE with cp (cli_checks.check_moe): the planner must not rank it."""
    from megalite.plan.gpus import get_gpu
    from megalite.plan.search import search

    fits, rejected = search(MIXTRAL, 16, get_gpu("h100"), 32768, 32, micro_batch_sizes=(1,))
    assert fits and all(c.layout.cp == 1 for c in fits)
    with_cp = [c.rejected for c in rejected if c.layout.cp > 1]
    assert with_cp and all(r.startswith("invalid: ") for r in with_cp)   # none "does not fit"
    assert any("do not run with context parallelism" in r for r in with_cp)


def test_planner_ring_bytes_are_what_the_ring_sends():
    """K/V (cp-1) times forward and backward in the compute dtype, (cp-1) more under full
    recompute, dK/dV cp hops in fp32; per rank and layer (the measured count:
    tests/parallel/test_context_parallel.py)."""
    from megalite.plan.comm import cp_ring_bytes

    at = BASE.replace(cp=4, tp=2, dtype="bf16")
    kv = 2 * 4096 // 4 * (8 // 2) * 128      # K and V: tokens/cp x kv heads/tp x head dim
    cfg = LLAMA7B.replace(n_kv_heads=8)
    assert cp_ring_bytes(cfg, at) == kv * (2 * 3 * 2 + 4 * 4)
    assert cp_ring_bytes(cfg, at.replace(recompute="full")) == kv * (3 * 3 * 2 + 4 * 4)
    assert cp_ring_bytes(cfg, at.replace(cp_comm="all-to-all")) == 0


def test_cli_fixes_cp_fsdp_and_precision_and_prints_their_flags(capsys):
    args = ["--model", "llama-7b", "--gpus", "8", "--gpu-memory", "80GB", "--seq-len",
            "4096", "--global-batch-size", "16", "--top", "2", "--rejected", "0"]
    assert main(args + ["--cp", "2", "--cp-comm", "ring", "--fsdp"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert " cp=2 " in rows[0] and "fsdp" in rows[0]
    line = out.split("layout flags):\n")[1].splitlines()[0]
    assert "--dtype bf16" in line and "--cp 2" in line and line.endswith(" --fsdp"), line
    assert "--autocast" not in line
    assert main(args + ["--cp", "1", "--no-fsdp", "--autocast"]) == 0
    out = capsys.readouterr().out
    line = out.split("layout flags):\n")[1].splitlines()[0]
    assert "--autocast" in line and "--cp" not in line and "--fsdp" not in line
    with pytest.raises(SystemExit):
        main(args + ["--ep", "2"])
    assert "is dense" in capsys.readouterr().err


def test_search_covers_cp_ep_fsdp_unless_fixed():
    from argparse import Namespace

    from megalite.plan.search import MIN_CP_TOKENS, candidate_layouts
    from megalite.training.layout_auto import plan_extras

    every = candidate_layouts(MIXTRAL, 16, seq_len=8 * MIN_CP_TOKENS, global_batch_size=32)
    assert {L.cp for L in every} == {1, 2, 4, 8}
    assert {L.cp_comm for L in every if L.cp > 1} == {"ring", "all-to-all"}
    assert {L.ep for L in every} == {1, 2, 4, 8}
    assert {(L.distributed_optimizer, L.fsdp) for L in every if L.dp > 1} == \
        {(False, False), (True, False), (False, True)}
    fixed = candidate_layouts(MIXTRAL, 16, seq_len=8192, global_batch_size=32, cp=1, ep=2,
                              fsdp=False)
    assert fixed and all(L.cp == 1 and L.ep == 2 and not L.fsdp for L in fixed)
    assert {L.ep for L in candidate_layouts(LLAMA7B, 8, 4096, 32)} == {1}   # dense
    # a trainer without the --cp/--ep/--fsdp/--autocast flags: none of them, and autocast
    old = Namespace(dtype="bf16")
    assert plan_extras(old) == dict(autocast=True, cp=1, ep=1, cp_comm="ring", fsdp=False)
    new = Namespace(dtype="bf16", autocast=False, cp=2, ep=4, cp_comm="all-to-all", fsdp=True)
    assert plan_extras(new) == dict(autocast=False, cp=2, ep=4, cp_comm="all-to-all",
                                    fsdp=True)
    assert plan_extras(Namespace(dtype="fp32"))["autocast"] is False
