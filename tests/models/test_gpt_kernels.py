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
    dict(n_kv_heads=1, head_dim=32, qk_norm=True, qkv_bias=True, sliding_window=3,
         rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4)),
])
def test_triton_and_torch_kernels_train_the_same_gpt(variant, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    parallel.destroy()
    cfg = GPTConfig(**{"vocab_size": 37, "n_layers": 1, "n_heads": 2, "d_model": 32, "d_ff": 48,
                       "max_seq_len": 8, "n_kv_heads": 1 if not variant else 2, **variant})
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_split_backward_through_two_stages_matches_full_backward(backend, monkeypatch):
    """One process holding two stages (pp=1, v=2) trained with a zero-bubble schedule (I and
    W split, W re-entering the kernels' autograd Functions) gives the one-stage gradients."""
    from megalite.training.step import train_step
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    parallel.destroy()
    cfg = GPTConfig(vocab_size=37, n_layers=2, n_heads=2, n_kv_heads=1, d_model=32, d_ff=48,
                    max_seq_len=8, kernels=backend, tie_embeddings=True)
    data = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = {}
    for schedule, stages in (("1f1b", 1), ("interleaved-zb", 2)):
        torch.manual_seed(0)
        model = GPT(cfg, num_stages=stages)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        result = train_step(model, opt, data[:, :-1], data[:, 1:], micro_batch_size=1,
                            schedule=schedule, max_grad_norm=0.0)
        grads[schedule] = (result.loss, {n: p.grad for n, p in model.named_parameters()})
    (ref_loss, ref), (loss, split) = grads["1f1b"], grads["interleaved-zb"]
    assert abs(loss - ref_loss) < 1e-6
    assert ref.keys() == split.keys()
    for name, grad in split.items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)
