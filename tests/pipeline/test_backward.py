"""The split backward (I, then W) against torch's own full backward, on stage modules of
every shape the executor may meet."""
import pytest
import torch

from megalite.pipeline.backward import backward_input


class Stage(torch.nn.Module):
    def __init__(self, d=8, view_output=False):
        super().__init__()
        self.a, self.norm, self.b = torch.nn.Linear(d, 2 * d), torch.nn.LayerNorm(2 * d), \
            torch.nn.Linear(2 * d, d)
        self.view_output = view_output

    def forward(self, x):
        y = x + self.b(torch.relu(self.norm(self.a(x))))
        return y.view(-1, y.shape[-1]) if self.view_output else y


class ScalesItsGradInPlace(torch.autograd.Function):
    """A backward that reuses its incoming gradient's buffer (a fused-op memory trick)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        grad_w = (g * x).sum(0)
        return g.mul_(w), grad_w


def _reference(module, x, g):
    ref = Stage(view_output=module.view_output)
    ref.load_state_dict(module.state_dict())
    xr = x.detach().clone().requires_grad_(x.requires_grad)
    out = ref(xr)
    out.backward(g)
    return xr.grad, {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("view_output", [False, True])
def test_split_equals_full_backward_and_defers_the_weights(view_output):
    torch.manual_seed(0)
    stage = Stage(view_output=view_output)
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = stage(x)
    g = torch.randn_like(y)
    ref_x, ref_p = _reference(stage, x, g)
    (gx,), w = backward_input(y, g, [x])
    assert all(p.grad is None for p in stage.parameters()), "I must not touch the weights"
    torch.testing.assert_close(gx, ref_x, rtol=0, atol=0)
    w.run()
    for n, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_p[n], rtol=0, atol=0, msg=n)


def test_first_stage_defers_everything_and_shared_weight_falls_back():
    torch.manual_seed(0)
    # No input needs a gradient (tokens on the first stage): I does nothing, W everything.
    stage = Stage()
    x = torch.randn(2, 8)
    y = stage(x)
    g = torch.randn_like(y)
    _, ref_p = _reference(stage, x, g)
    grads, w = backward_input(y, g, [x])
    assert grads == [None] and all(p.grad is None for p in stage.parameters())
    w.run()
    for n, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_p[n], rtol=0, atol=0, msg=n)
    # A weight used twice in one stage sits below two split nodes: the whole backward runs
    # in I, exactly, and W has nothing left.
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8, requires_grad=True)
    (gx,), w = backward_input(lin(lin(x)), g, [x])
    xr = x.detach().clone().requires_grad_()
    twin = torch.nn.Linear(8, 8)
    twin.load_state_dict(lin.state_dict())
    twin(twin(xr)).backward(g)
    w.run()
    torch.testing.assert_close(gx, xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(lin.weight.grad, twin.weight.grad, rtol=0, atol=0)


def test_a_backward_that_edits_its_gradient_in_place_is_refused():
    w_param = torch.nn.Parameter(torch.randn(8))
    x = torch.randn(4, 8, requires_grad=True)
    y = ScalesItsGradInPlace.apply(x, w_param) * 2.0
    (gx,), w = backward_input(y, torch.ones(4, 8), [x])
    with pytest.raises(RuntimeError, match="changed the gradient it received in place"):
        w.run()


def test_full_backward_of_a_freed_output_uses_only_public_autograd(monkeypatch):
    """B of a stage whose sent output the executor freed (its storage replaced by one
    element) gives torch's gradients, through public autograd alone: megalite calling
    torch's private engine entry point itself fails the test (torch's own calls pass)."""
    import sys

    from torch.autograd.variable import Variable

    from megalite.pipeline import backward as backward_module
    from megalite.pipeline.executor import _free_storage

    engine = Variable._execution_engine

    class OnlyTorchMayCallTheEngine:
        def run_backward(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            assert "/torch/" in caller, f"{caller} calls the private run_backward"
            return engine.run_backward(*args, **kwargs)

    monkeypatch.setattr(Variable, "_execution_engine", OnlyTorchMayCallTheEngine())
    torch.manual_seed(0)
    stage = Stage()
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = stage(x)
    g = torch.randn_like(y)
    ref_x, ref_p = _reference(stage, x, g)
    _free_storage(y)
    backward_module.backward(y, g)
    torch.testing.assert_close(x.grad, ref_x, rtol=0, atol=0)
    for n, p in stage.named_parameters():
        torch.testing.assert_close(p.grad, ref_p[n], rtol=0, atol=0, msg=n)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):  # a mismatched gradient
        backward_module.backward(stage(x), torch.randn(3, 4, 9))
