"""Training parity with Hugging Face: from identical weights, with the same optimizer and
the same batches, megalite's GPT and HF's own model follow the same loss curve for every
imported family (Llama 3 with llama3 RoPE and tied embeddings, Qwen2 with q/k/v biases and
linear RoPE, Qwen3 with q/k norms, a separate head_dim and YaRN, Mistral with a sliding
window shorter than the sequence)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from megalite import parallel  # noqa: E402
from megalite.models.hf import from_hf  # noqa: E402
from test_hf import NEW_FAMILIES, VOCAB  # noqa: E402

STEPS, BATCH, SEQ = 10, 4, 12


def batches():
    """Two fixed batches in turn: random tokens the models can memorize, so the loss falls."""
    data = torch.randint(0, VOCAB, (2, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    for step in range(STEPS):
        x = data[step % 2]
        yield x[:, :-1], x[:, 1:]


def train(step_loss, params):
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    for x, y in batches():
        loss = step_loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(NEW_FAMILIES))
def test_training_follows_hugging_face(name):
    parallel.destroy()
    hf = NEW_FAMILIES[name]().train()
    model = from_hf(hf, kernels="torch").train()     # copies: the two train independently

    def hf_loss(x, y):
        return F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())

    ours = train(lambda x, y: model.loss(model(x), y), model.parameters())
    theirs = train(hf_loss, hf.parameters())
    assert theirs[-1] < theirs[0] - 1.0, f"{name}: HF's loss barely moved: {theirs}"
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-4 * abs(b), f"{name} step {step}: {a} vs HF {b}\n{ours}\n{theirs}"
