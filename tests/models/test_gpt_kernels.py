"""GPTConfig(kernels=...) switches the model between the Triton kernels and the torch
references; both compute the same model (Triton under the interpreter on CPU)."""
import pytest
import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig


@pytest.mark.parametrize("variant", [
    dict(),                                                    # llama: rmsnorm, rope, swiglu
    dict(norm="layernorm", activation="gelu_tanh", position="learned", bias=True,
         tie_embeddings=True),                                 # gpt2
])
def test_triton_and_torch_kernels_train_the_same_gpt(variant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    parallel.destroy()
    cfg = GPTConfig(vocab_size=37, n_layers=1, n_heads=2, n_kv_heads=1 if not variant else 2,
                    d_model=32, d_ff=48, max_seq_len=8, **variant)
    data = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = GPT(cfg.replace(kernels=backend))
        logits = model(data[:, :-1])
        kept = logits.detach().clone()
        model.loss(logits, data[:, 1:]).backward()
        results[backend] = (kept, {n: p.grad for n, p in model.named_parameters()})
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
