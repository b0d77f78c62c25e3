"""GPTConfig: one dataclass describes both the llama-style and the gpt2-style model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megalite.models.rope_scaling import validate_rope_scaling

_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "activation": ("swiglu", "gelu", "gelu_tanh"),
    "position": ("rope", "learned"),
    "kernels": ("auto", "torch", "triton"),
    "recompute": ("none", "selective", "full"),
    "params_dtype": ("fp32", "bf16", "fp16"),
    "moe_router": ("softmax", "sigmoid"),
}
RECOMPUTE_MODES = _CHOICES["recompute"]


@dataclass
class GPTConfig:
    vocab_size: int
    n_layers: int
    n_heads: int
    d_model: int
    n_kv_heads: int | None = None      # None: multi-head attention (= n_heads)
    d_ff: int | None = None            # None: 4*d (gelu) or 8/3*d rounded up to 64 (swiglu)
    max_seq_len: int = 1024
    norm: str = "rmsnorm"
    activation: str = "swiglu"         # "gelu" is exact (erf); GPT-2 uses "gelu_tanh"
    position: str = "rope"
    tie_embeddings: bool = False
    dropout: float = 0.0               # on embeddings and residual branches
    bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # long-context RoPE (models/rope_scaling.py); None: plain
    head_dim: int | None = None        # None: d_model // n_heads (Qwen3 sets it apart)
    qkv_bias: bool = False             # bias on the q/k/v projection only (Qwen2); `bias` is all
    qk_norm: bool = False              # RMSNorm of each q and k head before RoPE (Qwen3)
    sliding_window: int | None = None  # a query at i sees keys i-window < j <= i (Mistral)
    init_std: float = 0.02
    sequence_parallel: bool = False    # needs tp > 1 to matter; seq_len divisible by tp
    kernels: str = "auto"              # "auto": Triton on CUDA, else the torch references
    layers_per_stage: list[int] | None = None   # pipeline split; None: even (see partition)
    master_init: bool = True           # False: init each shard locally (huge models)
    pad_vocab_to: int = 1              # pad the vocab to a multiple of tp * this
    fused_loss: bool = True            # training loss fuses head + cross-entropy (no logits)
    # Activation recomputation (megalite.models.recompute, docs/memory.md): "full" keeps
    # only each layer's input (only the first recompute_layers layers of each stage when
    # set, all when None); "selective" recomputes norms, RoPE + attention core and the MLP
    # activation.
    recompute: str = "none"
    recompute_layers: int | None = None
    # Parameter precision: "bf16"/"fp16" keep the weights 16-bit with fp32 main weights in
    # the optimizer; "fp32" is the full-precision model (mixed precision then by autocast).
    params_dtype: str = "fp32"
    # Mixture of Experts (0 experts: every layer dense). moe_d_ff None: d_ff; layers are MoE
    # from moe_first_k_dense on, every moe_layer_freq-th (Qwen's decoder_sparse_step: layer
    # i when (i + 1) % freq == 0), except moe_dense_layers (Qwen's mlp_only_layers).
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_d_ff: int | None = None
    moe_shared_d_ff: int = 0
    moe_router: str = "softmax"
    moe_norm_topk: bool = True
    moe_first_k_dense: int = 0
    moe_layer_freq: int = 1
    moe_dense_layers: tuple = ()
    moe_capacity_factor: float | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float = 0.0
    moe_router_bias_update: float = 0.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            if self.activation == "swiglu":
                self.d_ff = (int(8 * self.d_model / 3) + 63) // 64 * 64
            else:
                self.d_ff = 4 * self.d_model
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r}; choose one of "
                                 f"{allowed}")
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads="
                                 f"{self.n_heads}; set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 1:
            raise ValueError(f"GPTConfig.head_dim must be >= 1, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"GPTConfig.sliding_window must be None or >= 1, got "
                             f"{self.sliding_window}")
        if self.position != "rope" and self.rope_scaling is not None:
            raise ValueError(f"rope_scaling={self.rope_scaling} needs position='rope'")
        validate_rope_scaling(self.rope_scaling)
        if self.qk_norm and self.norm != "rmsnorm":
            raise ValueError("qk_norm is an RMSNorm of q and k (Qwen3): it needs norm='rmsnorm'")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads="
                             f"{self.n_kv_heads} (grouped-query attention shares each kv head "
                             f"among n_heads/n_kv_heads query heads)")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.recompute_layers is not None:
            if self.recompute != "full":
                raise ValueError(f"recompute_layers={self.recompute_layers} applies to full "
                                 f"recompute only: set recompute='full' (it is "
                                 f"{self.recompute!r}) or drop recompute_layers")
            if not 1 <= self.recompute_layers <= self.n_layers:
                raise ValueError(f"recompute_layers must be in [1, n_layers={self.n_layers}], "
                                 f"got {self.recompute_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (0-based) has a Mixture-of-Experts MLP."""
        return (self.moe_num_experts > 0 and i >= self.moe_first_k_dense
                and (i + 1) % self.moe_layer_freq == 0 and i not in self.moe_dense_layers)

    def replace(self, **changes) -> "GPTConfig":
        """A copy with ``changes``. A head_dim equal to d_model // n_heads counts as derived:
        it follows new d_model / n_heads unless ``changes`` set it."""
        if "head_dim" not in changes and self.head_dim == self.d_model // self.n_heads:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count of the whole (unsharded, unpadded) model."""
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        mlp = d * f * (3 if self.activation == "swiglu" else 2)
        norms = 2 * d * (2 if self.norm == "layernorm" else 1) + (2 * hd if self.qk_norm else 0)
        biases = 0
        if self.qkv_bias and not self.bias:
            biases = (self.n_heads + 2 * self.n_kv_heads) * hd
        if self.bias:
            biases = (self.n_heads + 2 * self.n_kv_heads) * hd + d + \
                (2 * f if self.activation == "swiglu" else f) + d
        per_layer = attn + mlp + norms + biases
        final_norm = d * (2 if self.norm == "layernorm" else 1)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position == "learned":
            emb += self.max_seq_len * d
        return self.n_layers * per_layer + final_norm + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM's formula:
        6 * non-embedding params + 6 * vocab * d (the head) + 12 * layers * heads * head_dim
        * keys (attention, counted without causal savings; keys = seq, or the sliding window
        when shorter)."""
        n = self.num_params(include_embeddings=False)
        keys = seq_len if self.sliding_window is None else min(seq_len, self.sliding_window)
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * keys
        return 6 * n + 6 * self.vocab_size * self.d_model + attention

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_GPT2 = dict(norm="layernorm", activation="gelu_tanh", position="learned", tie_embeddings=True,
             bias=True, norm_eps=1e-5)
_LLAMA = dict(norm="rmsnorm", activation="swiglu", position="rope", bias=False)


def _llama3_rope(factor: float) -> dict:
    return dict(type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5,
               n_kv_heads=8, **_LLAMA)

PRESETS: dict[str, dict] = {
    # Byte-level vocabulary (256): trains on the bundled corpus in minutes on a CPU.
    "tiny": dict(vocab_size=256, n_layers=4, n_heads=4, n_kv_heads=2, d_model=128, d_ff=384,
                 max_seq_len=256, norm_eps=1e-5, **_LLAMA),
    "tiny-gpt2": dict(vocab_size=256, n_layers=4, n_heads=4, d_model=128, max_seq_len=256,
                      **_GPT2),
    "gpt2-124m": dict(vocab_size=50257, n_layers=12, n_heads=12, d_model=768, max_seq_len=1024,
                      **_GPT2),
    "gpt2-350m": dict(vocab_size=50257, n_layers=24, n_heads=16, d_model=1024,
                      max_seq_len=1024, **_GPT2),
    # Llama 3.2 1B (RoPE tables for 2048 positions; llama3.2-1b has the full 131072).
    "llama-1b": dict(vocab_size=128256, n_layers=16, n_heads=32, n_kv_heads=8, d_model=2048,
                     d_ff=8192, max_seq_len=2048, rope_theta=500000.0,
                     rope_scaling=_llama3_rope(32.0), tie_embeddings=True, norm_eps=1e-5,
                     **_LLAMA),
    # Llama 2 7B shapes.
    "llama-7b": dict(vocab_size=32000, n_layers=32, n_heads=32, d_model=4096, d_ff=11008,
                     max_seq_len=4096, norm_eps=1e-5, **_LLAMA),
    # Llama 2 13B and 70B shapes (70B: grouped-query attention, 8 kv heads).
    "llama-13b": dict(vocab_size=32000, n_layers=40, n_heads=40, d_model=5120, d_ff=13824,
                      max_seq_len=4096, norm_eps=1e-5, **_LLAMA),
    "llama-70b": dict(vocab_size=32000, n_layers=80, n_heads=64, n_kv_heads=8, d_model=8192,
                      d_ff=28672, max_seq_len=4096, norm_eps=1e-5, **_LLAMA),
    # The official config.json files' shapes (Hugging Face hub), with their full contexts.
    "llama3.2-1b": dict(n_layers=16, n_heads=32, d_model=2048, d_ff=8192,
                        rope_scaling=_llama3_rope(32.0), tie_embeddings=True, **_LLAMA3),
    "llama3.2-3b": dict(n_layers=28, n_heads=24, d_model=3072, d_ff=8192,
                        rope_scaling=_llama3_rope(32.0), tie_embeddings=True, **_LLAMA3),
    "llama3.1-8b": dict(n_layers=32, n_heads=32, d_model=4096, d_ff=14336,
                        rope_scaling=_llama3_rope(8.0), **_LLAMA3),
    "llama3.1-70b": dict(n_layers=80, n_heads=64, d_model=8192, d_ff=28672,
                         rope_scaling=_llama3_rope(8.0), **_LLAMA3),
    # Qwen2.5 7B: bias on q/k/v only; its sliding window is off (use_sliding_window false).
    "qwen2.5-7b": dict(vocab_size=152064, n_layers=28, n_heads=28, n_kv_heads=4, d_model=3584,
                       d_ff=18944, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
                       qkv_bias=True, **_LLAMA),
    # Qwen3 8B: RMSNorm on each q/k head; head_dim 128 (= d_model / n_heads here).
    "qwen3-8b": dict(vocab_size=151936, n_layers=36, n_heads=32, n_kv_heads=8, d_model=4096,
                     d_ff=12288, head_dim=128, max_seq_len=40960, rope_theta=1000000.0,
                     norm_eps=1e-6, qk_norm=True, **_LLAMA),
    # Mistral 7B v0.1: 4096-token sliding window (v0.3 has none and a 32768 vocabulary).
    "mistral-7b": dict(vocab_size=32000, n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096,
                       d_ff=14336, max_seq_len=32768, rope_theta=10000.0, norm_eps=1e-5,
                       sliding_window=4096, **_LLAMA),
}
