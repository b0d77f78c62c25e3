"""A training layout: how a model is split over GPUs and batched, as the planner sees it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megalite.models.config import RECOMPUTE_MODES as RECOMPUTE, GPTConfig
from megalite.pipeline import layers_per_stage, schedule_info

DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("torch", "triton")   # the kernels that run: references (CPU) or Triton (GPU)
CP_COMMS = ("ring", "all-to-all")


def compute_bytes(dtype: str) -> int:
    """Bytes of an activation element: 2 under bf16/fp16 (either mode), else 4."""
    return 2 if dtype in ("bf16", "fp16") else 4


@dataclass(frozen=True)
class Layout:
    """One candidate run. ``dp`` replicas of a ``tp`` x ``pp`` model; each optimizer step
    takes ``global_batch_size`` sequences of ``seq_len`` tokens, in ``num_microbatches``
    microbatches of ``micro_batch_size`` per dp rank.

    ``virtual_stages``: stages per pipeline rank (None: the schedule's default).
    ``recompute_layers``: with recompute="full", how many layers of each stage are
    recomputed (None: all). ``kernels``: "triton" (GPU) or "torch" (the references, as on
    CPU). ``fused_loss``: the output head and cross-entropy fused, never storing the logits
    (``GPTConfig.fused_loss``, on by default).
    ``distributed_optimizer``: AdamW moments sharded over dp (ZeRO-1).
    ``overlap_grad_reduce``: dp gradient reduction overlapped with the last backward.

    ``dtype`` with ``autocast=False`` (the default): 16-bit parameters with fp32 main
    weights in the optimizer (``GPTConfig.params_dtype``, the trainer's ``--dtype bf16``);
    ``autocast=True``: fp32 parameters under ``torch.autocast`` (``--autocast``).
    ``cp``: context parallelism, each sequence split over ``cp`` ranks (``cp_comm``: the
    K/V "ring" or "all-to-all", Ulysses). ``ep``: expert parallelism, experts split over
    ``ep`` ranks folded over the tp x cp x dp ranks of a stage (MoE configs only).
    ``fsdp``: parameters, gradients and optimizer state sharded over dp x cp (ZeRO-3,
    torch's ``fully_shard`` per transformer block)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    global_batch_size: int = 1
    schedule: str = "1f1b"
    virtual_stages: int | None = None
    sequence_parallel: bool = False
    dtype: str = "bf16"
    recompute: str = "none"
    recompute_layers: int | None = None
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    kernels: str = "triton"
    fused_loss: bool = True
    autocast: bool = False
    cp: int = 1
    cp_comm: str = "ring"
    ep: int = 1
    fsdp: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def params_dtype(self) -> str:
        """The dtype the weights are held in: ``dtype``, or fp32 under autocast."""
        return "fp32" if self.autocast else self.dtype

    @property
    def shard_group(self) -> int:
        """Ranks dense gradients reduce over and the optimizer / FSDP shard over: dp x cp."""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Ranks an expert's gradient reduces over: the stage's tp x cp x dp ranks / ep."""
        return self.tp * self.cp * self.dp // self.ep

    @property
    def virtual(self) -> int:
        return schedule_info(self.schedule, self.virtual_stages)[1]

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        v = f" v={self.virtual}" if self.virtual > 1 else ""
        extras = [name for name, on in (("sp", self.sequence_parallel),
                                        ("dist-opt", self.distributed_optimizer),
                                        ("fsdp", self.fsdp),
                                        ("autocast", self.autocast),
                                        ("unfused-loss", not self.fused_loss)) if on]
        rec = self.recompute if self.recompute_layers is None or self.recompute != "full" \
            else f"full:{self.recompute_layers}"
        cp = "" if self.cp == 1 else f" cp={self.cp}" + (
            " a2a" if self.cp_comm == "all-to-all" else "")
        ep = "" if self.ep == 1 else f" ep={self.ep}"
        return (f"tp={self.tp} pp={self.pp} dp={self.dp}{cp}{ep}{v} "
                f"mbs={self.micro_batch_size} {self.schedule} recompute={rec}"
                + "".join(f" {x}" for x in extras))


def invalid_reason(cfg: GPTConfig, layout: Layout) -> str | None:
    """Why ``layout`` cannot run ``cfg`` at all (None if it can): the checks megalite makes
    when it builds the model and the schedule, made here without building anything."""
    L = layout
    for name in ("tp", "pp", "dp", "cp", "ep", "micro_batch_size", "seq_len",
                 "global_batch_size"):
        if getattr(L, name) < 1:
            return f"{name} must be >= 1"
    if cfg.n_heads % L.tp or cfg.n_kv_heads % L.tp:
        return f"tp={L.tp} does not divide n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}"
    if cfg.d_ff % L.tp:
        return f"tp={L.tp} does not divide d_ff={cfg.d_ff}"
    if L.global_batch_size % (L.micro_batch_size * L.dp):
        return (f"global batch {L.global_batch_size} is not a multiple of micro-batch "
                f"{L.micro_batch_size} x dp {L.dp}")
    if L.dtype not in DTYPES:
        return f"dtype {L.dtype!r} is not one of {DTYPES}"
    if L.kernels not in BACKENDS:
        return f"kernels {L.kernels!r} is not one of {BACKENDS}"
    if L.recompute not in RECOMPUTE:
        return f"recompute {L.recompute!r} is not one of {RECOMPUTE}"
    try:
        v = L.virtual
    except ValueError as e:
        return str(e)
    if v > 1 and L.schedule.startswith("interleaved") and L.num_microbatches % L.pp:
        return (f"{L.schedule} needs the microbatches ({L.num_microbatches}) to be a multiple "
                f"of pp={L.pp}")
    try:
        counts = layers_per_stage(cfg.n_layers, L.pp * v, cfg.layers_per_stage)
    except ValueError as e:
        return str(e)
    if L.recompute_layers is not None:
        if L.recompute != "full":
            return "recompute_layers needs recompute='full'"
        if not 1 <= L.recompute_layers <= min(counts):
            return (f"recompute_layers={L.recompute_layers} exceeds the {min(counts)} layers "
                    f"of the smallest stage")
    if L.seq_len > cfg.max_seq_len:
        return f"seq_len {L.seq_len} exceeds max_seq_len {cfg.max_seq_len}"
    rows = L.seq_len // L.cp      # the tokens of a sequence one cp rank holds
    if L.sequence_parallel and rows % L.tp:
        return f"sequence parallelism needs seq_len/cp {rows} divisible by tp={L.tp}"
    return _cp_ep_fsdp_reason(cfg, L)


def _cp_ep_fsdp_reason(cfg: GPTConfig, L: Layout) -> str | None:
    """The checks of context and expert parallelism, FSDP and the precision mode."""
    if L.cp_comm not in CP_COMMS:
        return f"cp_comm {L.cp_comm!r} is not one of {CP_COMMS}"
    if L.cp > 1 and L.seq_len % (2 * L.cp):
        return (f"cp={L.cp} needs seq_len {L.seq_len} divisible by 2*cp={2 * L.cp} (the "
                f"load-balanced chunks)")
    if L.cp > 1 and L.cp_comm == "all-to-all" and (cfg.n_heads // L.tp % L.cp
                                                     or cfg.n_kv_heads // L.tp % L.cp):
        return (f"all-to-all context parallelism needs the heads per tp rank "
                f"({cfg.n_heads // L.tp} q, {cfg.n_kv_heads // L.tp} kv) divisible by "
                f"cp={L.cp}")
    if cfg.moe_num_experts:
        if L.cp > 1:   # the runtime refuses it (cli_checks.check_moe): never plan it
            return "MoE layers do not run with context parallelism yet"
        if cfg.moe_top_k > cfg.moe_num_experts:
            return f"moe_top_k={cfg.moe_top_k} exceeds the {cfg.moe_num_experts} experts"
        if L.tp > 1 and not L.sequence_parallel:
            return ("MoE layers with tp > 1 need sequence parallelism (each tp rank routes "
                    "its shard of the tokens)")
        if cfg.moe_shared_d_ff % L.tp:
            return f"tp={L.tp} does not divide moe_shared_d_ff={cfg.moe_shared_d_ff}"
    if L.ep > 1:
        if cfg.moe_num_experts == 0:
            return f"ep={L.ep} needs a Mixture-of-Experts model (moe_num_experts > 0)"
        if cfg.moe_num_experts % L.ep:
            return f"ep={L.ep} does not divide the {cfg.moe_num_experts} experts"
        if (L.tp * L.cp * L.dp) % L.ep:
            return (f"ep={L.ep} does not divide the tp*cp*dp={L.tp * L.cp * L.dp} ranks of "
                    f"a stage it folds over")
    if L.autocast and L.dtype == "fp32":
        return "autocast needs dtype bf16 or fp16"
    if L.fsdp:
        if L.distributed_optimizer:
            return "FSDP shards the optimizer state already: drop distributed_optimizer"
        if L.dtype == "fp16":   # loss scaling over FSDP's DTensor gradients: not supported
            return "FSDP runs in bf16 or fp32, not fp16"
    return None
