"""The output head and its cross-entropy in one op: the ``[tokens, V]`` logits never exist.

    loss = reduce_n ( logsumexp_c (x[n] . W[c]) - x[n] . W[target[n]] )   (ignored rows: 0)

What is fused and why: an LM head followed by cross-entropy stores the logits ``[N, V]``
for backward (plus, in the unfused path, an equally large gradient). At V = 128256 and
16,384 tokens that is 4 GB in bf16 before any upcast, the largest buffer of a step. Here
(the Liger-Kernel approach) the tokens are processed in chunks of ``chunk_size`` rows; for
each chunk the forward computes its logits, their per-row statistics (the Triton kernels of
``cross_entropy.shard_stats``), the loss, the logits' gradient written into the chunk's own
buffer (``shard_grad_``), and from it the gradient of the hidden states (``grad @ W``) and,
accumulated over chunks, of the weight (``grad^T @ x``). Only ``dx [N, d]`` and
``dW [V, d]`` (fp32) are kept; the backward pass just scales them by the incoming gradient,
which is why the op returns a reduced loss ("mean" over non-ignored tokens, or "sum").

Vocabulary parallelism reuses the same chunk loop: the weight is one rank's shard of rows
[vocab_start, vocab_start + V_local), columns at or beyond ``vocab_size`` are padding
(masked out), and ``combine(lse_local, target_logit_local) -> (lse, target_logit)`` merges
each chunk's statistics across ranks (megalite.parallel passes a collective; this module
knows nothing of distribution).

Chunk size: by default each chunk's logits are about as large as ``x`` itself
(Liger's rule: ``next_pow2(N / ceil(V_local / d))`` rows).
"""
import torch

from ._backend import cdiv, next_pow2, use_triton
from .cross_entropy import shard_grad_, shard_grad_reference, shard_stats

REDUCTIONS = ("mean", "sum")


def default_chunk_size(n_tokens, local_vocab, d_model):
    return max(1, min(next_pow2(cdiv(n_tokens, cdiv(local_vocab, d_model))), n_tokens))


# ----------------------------------------------------------------------------- reference
def linear_cross_entropy_reference(x, weight, target, ignore_index=-100, reduction="mean"):
    """The unfused computation: the whole logits, then cross-entropy (fp32 math)."""
    logits = (x.reshape(-1, x.shape[-1]) @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, target.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------- chunk loop
def chunked_loss_and_grads(x, weight, target, *, vocab_start=0, vocab_size=None,
                           ignore_index=-100, chunk_size=None, combine=None,
                           weight_grad=True, backend="auto"):
    """Per-token loss and the gradients of ``loss.sum()``, without autograd.

    x [N, d], weight [V_local, d] (rows = vocabulary ids vocab_start...), target [N].
    Returns ``(loss [N] fp32, dx [N, d] like x, dw [V_local, d] fp32 or None)``. The matmuls
    run in whatever dtype autocast (if on) chooses, as ``F.linear`` would in the unfused
    head; the softmax statistics are fp32.
    """
    n, d = x.shape
    chunk = chunk_size or default_chunk_size(n, weight.shape[0], d)
    dx = torch.empty_like(x)
    # Under autocast, cast x and the weight once, not once per chunk (autocast would).
    if torch.is_autocast_enabled(x.device.type):
        compute = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(compute), weight.to(compute)
    triton = use_triton(backend, x, target)
    losses = []
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if weight_grad else None
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n, chunk):
            xc, tc = x[start:start + chunk], target[start:start + chunk]
            logits = xc @ weight.t()  # [chunk, V_local]: the only vocabulary-sized buffer
            lse, xt, _ = shard_stats(logits, tc, vocab_start, vocab_size, ignore_index,
                                     backend=backend)
            if combine is not None:
                lse, xt = combine(lse, xt)
            losses.append(torch.where(tc == ignore_index, 0.0, lse - xt))
            ones = torch.ones_like(lse)  # d(sum of losses)/d(loss[n]); ignored rows: 0
            if triton:  # the gradient overwrites the logits in their own buffer
                grad = shard_grad_(logits, tc, lse, ones, vocab_start, vocab_size,
                                   ignore_index, backend=backend)
            else:
                grad = shard_grad_reference(logits, tc, lse, ones, vocab_start, vocab_size,
                                            ignore_index)
            if grad.dtype == dx.dtype:
                torch.mm(grad, weight, out=dx[start:start + chunk])
            else:
                dx[start:start + chunk] = grad @ weight
            if weight_grad and dw.dtype == grad.dtype:
                dw.addmm_(grad.t(), xc)
            elif weight_grad:  # 16-bit matmul, accumulated in fp32
                dw.add_(grad.t() @ xc)
    return torch.cat(losses), dx, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the chunk loop: forward does all the work, backward scales.

    ``combine``/``vocab_start``/``vocab_size`` as in :func:`chunked_loss_and_grads` (the
    vocab-parallel caller passes them). Returns the reduced fp32 loss.
    """

    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, reduction, chunk_size, backend,
                vocab_start, vocab_size, combine):
        x2, t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
        loss, dx, dw = chunked_loss_and_grads(
            x2, weight, t, vocab_start=vocab_start, vocab_size=vocab_size,
            ignore_index=ignore_index, chunk_size=chunk_size, combine=combine,
            weight_grad=ctx.needs_input_grad[1], backend=backend)
        total = loss.sum()
        scale = 1.0
        if reduction == "mean":
            scale = 1.0 / (t != ignore_index).sum().clamp(min=1)
            total = total * scale
        ctx.grads, ctx.scale, ctx.scaled_by = (dx.view_as(x), dw), scale, None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dx, dw = ctx.grads
        # Scaled in place (no second [V, d] buffer). A split backward (the pipeline's I then
        # W) re-enters with the same gradient object; anything else would scale twice.
        if ctx.scaled_by is None:
            s = grad_total * ctx.scale
            dx.mul_(s.to(dx.dtype))
            if dw is not None:
                dw.mul_(s)
            ctx.scaled_by = grad_total
        elif ctx.scaled_by is not grad_total:
            raise RuntimeError("linear_cross_entropy: backward ran twice with different "
                               "gradients; its gradients are computed once in forward, so "
                               "call the op again instead of retaining its graph")
        dw = None if dw is None else dw.to(ctx.weight_dtype)
        return dx, dw, None, None, None, None, None, None, None, None


def check_inputs(x, weight, target, reduction, name="linear_cross_entropy"):
    if x.shape[:-1] != target.shape:
        raise ValueError(f"{name}: target {tuple(target.shape)} must be x's shape without "
                         f"the hidden dim {tuple(x.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: weight must be [vocab, {x.shape[-1]}] (nn.Linear's "
                         f"layout), got {tuple(weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r} "
                         f"(per-token losses need the logits: use kernels.cross_entropy)")


# ----------------------------------------------------------------------------- public op
def linear_cross_entropy(x, weight, target, ignore_index=-100, *, reduction="mean",
                         chunk_size=None, backend="auto"):
    """Cross-entropy of the logits ``x @ weight.T`` without storing them.

    x [..., d] hidden states, weight [V, d] (an ``nn.Linear``/embedding weight), target [...]
    class ids. Returns the fp32 loss: the mean over tokens whose target is not
    ``ignore_index`` (``reduction="mean"``, as ``F.cross_entropy``) or their sum. Gradients
    flow to x and weight. ``chunk_size`` tokens are processed at a time (default: chunks whose
    logits are about the size of x). ``backend`` picks the per-chunk softmax kernels as in
    every op ("torch": the chunk loop with torch statistics, the CPU path);
    ``linear_cross_entropy_reference`` is the unfused specification.
    """
    check_inputs(x, weight, target, reduction)
    use_triton(backend, x, weight, target)  # validates the request; "auto" picks per chunk
    return LinearCrossEntropyFunction.apply(x, weight, target, ignore_index, reduction,
                                            chunk_size, backend, 0, None, None)
