"""What one transformer layer keeps for backward, tensor by tensor, per token.

Read off megalite's own code (models/gpt.py, parallel/layers.py, kernels/*) and checked
against saved-tensor hooks (tests/plan): every entry is a tensor autograd holds from a
layer's forward until its backward, in bytes per token of one microbatch on one TP rank.
Notation: d = d_model, f = d_ff, h / g = query / kv heads, e = head_dim, t = tp, a = bytes
of the compute dtype (2 under bf16/fp16 autocast, else 4). The residual stream is always
fp32 (4 bytes; train_step keeps fp32 activations between stages), and with sequence
parallelism it holds 1/t of the tokens.

Backends differ where the kernels differ:

* ``torch`` (the references; what runs on CPU): RMSNorm saves its input, the normalized
  rows before the weight and 1/rms; attention is torch's SDPA, which on CPU (and with flash
  on GPU) saves q, k, v, the output and the log-sum-exp, and returns the output already in
  [b, s, h, e] order (so the output projection's input is the same storage); SwiGLU upcasts
  gate and up, saving gate, up and silu(gate) (in fp32 under autocast; in fp32 training
  gate and up are views of the up-projection's output, saving that).
* ``triton`` (the GPU path): RMSNorm saves its input and 1/rms only; flash attention saves
  q, k (rope outputs), v (a view: it keeps the whole qkv output alive), o and the
  log-sum-exp, and o is copied into [b, s, h*e] for the output projection; SwiGLU saves
  contiguous copies of gate and up.

Under autocast every linear saves the 16-bit copy of its input (the fp32 normalized rows
are freed) and the 16-bit copy of its weight, which autocast caches for the whole step:
that copy is counted once per step with the parameters (``memory.weight_casts``), not here.

Recomputation (``recompute``): "full" keeps only each recomputed layer's input and re-runs
the layer in backward; "selective" drops the attention core (rope'd q and k, the attention
output and log-sum-exp), keeping the linears' inputs, as Korthikanti et al. (arXiv
2205.05198) recompute the core attention. TODO(merge with issue 10's recompute branch): use
the models package's saved-bytes function once it exists, and check "selective" against it.
"""
from __future__ import annotations

from megalite.models.config import GPTConfig

BACKENDS = ("torch", "triton")
RECOMPUTE = ("none", "selective", "full")


def compute_bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


def layer_saved_tensors(cfg: GPTConfig, tp: int = 1, dtype: str = "fp32",
                        backend: str = "torch", sequence_parallel: bool = False,
                        recompute: str = "none") -> dict[str, float]:
    """{tensor name: bytes per token} one layer keeps for backward on one TP rank, averaged
    over the microbatch's tokens (so multiply by micro_batch_size * seq_len)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.bias:
        raise ValueError("the planner models the llama-style layer (rmsnorm, swiglu, no bias); "
                         f"got norm={cfg.norm}, activation={cfg.activation}, bias={cfg.bias}")
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    h, g = cfg.n_heads / tp, cfg.n_kv_heads / tp
    f_local = f / tp
    a = compute_bytes(dtype)
    sp = 1 / tp if sequence_parallel and tp > 1 else 1   # residual-stream token share
    if recompute == "full":
        return {"layer input": 4 * d * sp}
    torch_ref = backend == "torch"
    out: dict[str, float] = {}
    for where in ("attn", "mlp"):
        out[f"{where} norm input"] = 4 * d * sp
        out[f"{where} norm 1/rms"] = 4 * sp
        if torch_ref:
            out[f"{where} norm rows before weight"] = 4 * d * sp
        out[f"{where} linear input"] = a * d   # all-gathered (whole sequence) under SP
    out["qkv output (v keeps it)"] = a * (h + 2 * g) * e
    if recompute == "none":
        out["q after rope"] = a * h * e
        out["k after rope"] = a * g * e
        out["attention output"] = a * h * e
        out["attention log-sum-exp"] = 4 * h
    if not torch_ref or recompute == "selective":
        # Triton's o is [b, h, s, e]: the projection gets an [b, s, h*e] copy (and with the
        # core recomputed, that copy is what the projection keeps).
        out["output projection input"] = a * h * e
    if torch_ref and a == 2:
        out["swiglu gate, up, silu (fp32 upcasts)"] = 3 * 4 * f_local
    elif torch_ref:
        out["up-projection output (gate, up)"] = 4 * 2 * f_local
        out["silu(gate)"] = 4 * f_local
    else:
        out["swiglu gate, up copies"] = a * 2 * f_local
    out["down-projection input"] = a * f_local
    return out


def layer_bytes_per_token(cfg: GPTConfig, **kw) -> float:
    return sum(layer_saved_tensors(cfg, **kw).values())


def head_saved_tensors(cfg: GPTConfig, tp: int = 1, dtype: str = "fp32",
                       backend: str = "torch", sequence_parallel: bool = False,
                       fused_loss: bool = False, padded_vocab: int | None = None
                       ) -> dict[str, float]:
    """The last stage's final norm, output head and loss, bytes per token. The logits
    [tokens, V_padded/t] are saved by the cross-entropy (its backward writes the gradient
    into them in place, so there is no second buffer); a fused linear + cross-entropy keeps
    only the head's input and the log-sum-exp."""
    d, a = cfg.d_model, compute_bytes(dtype)
    sp = 1 / tp if sequence_parallel and tp > 1 else 1
    vp = padded_vocab or cfg.vocab_size
    out = {"final norm input": 4 * d * sp, "final norm 1/rms": 4 * sp}
    if backend == "torch":
        out["final norm rows before weight"] = 4 * d * sp
    out["head input"] = a * d
    if fused_loss:
        out["loss log-sum-exp"] = 4
    else:
        out["logits"] = a * vp / tp
        out["loss log-sum-exp, targets"] = 4 + 8
    return out


def embedding_saved_tensors(cfg: GPTConfig) -> dict[str, float]:
    """The first stage's lookup: the (masked) token ids and the out-of-shard mask."""
    return {"token ids": 8, "out-of-shard mask": 1}
