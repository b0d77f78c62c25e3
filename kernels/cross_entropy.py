"""Cross-entropy that never stores the softmax, and its vocab-parallel building blocks.

    loss[n] = logsumexp(x[n, :]) - x[n, target[n]]     (0 where target == ignore_index)
    with label smoothing eps over V classes (PyTorch's definition):
    loss[n] = lse[n] - (1 - eps) * x[n, t] - eps / V * sum_c x[n, c]

What is fused and why: ``F.cross_entropy`` writes log_softmax ([N, V] in the logits dtype),
then the backward writes a one-hot gradient and another [N, V] buffer. At a 128k vocabulary
those buffers dominate a step's peak memory. Here the forward is one streaming read of each
row with an online logsumexp (a running max and rescaled sum per lane), producing only
per-row numbers; the backward is one read and one write of each row,
    grad = (exp(x - lse) - (1 - eps) * onehot(t) - eps / V) * grad_loss,
written *in place into the logits buffer* (as Megatron and Liger do), so no [N, V] buffer
is ever allocated. After backward the logits tensor holds its own gradient; pass
``inplace_backward=False`` if you still need the logits (leaf tensors are never overwritten).

Vocab parallelism uses the same two kernels on each rank's shard of columns:
  1. ``lse_r, xt_r, sum_r = shard_stats(shard, target, vocab_start, vocab_size)``
  2. all-gather lse_r -> lse = logsumexp over ranks; all-reduce (sum) of xt_r (and sum_r)
  3. loss = lse - xt (smoothing: lse - (1 - eps) * xt - eps / vocab_size * sum)
  4. backward: ``shard_grad_(shard, target, lse, grad_loss, vocab_start, vocab_size)``
Columns whose global index is >= vocab_size (padding to a multiple of tp) are masked out:
they contribute nothing to lse or sum and get gradient 0.
"""
import torch
import torch.nn.functional as F

from ._backend import jit, next_pow2, tl, upcast, use_triton


# ----------------------------------------------------------------------------- reference
def _limit(V, vocab_start, vocab_size):
    """Number of leading columns of this shard that are real vocabulary (may be <= 0)."""
    return V if vocab_size is None else max(0, min(V, vocab_size - vocab_start))


def _in_shard(target, vocab_start, limit, ignore_index):
    local = target - vocab_start
    return local, (target != ignore_index) & (local >= 0) & (local < limit)


def shard_stats_reference(logits, target, vocab_start=0, vocab_size=None, ignore_index=-100,
                          with_sum=False):
    x = upcast(logits)
    V = x.shape[-1]
    limit = _limit(V, vocab_start, vocab_size)
    valid = torch.arange(V, device=x.device) < limit
    if limit < V:  # padding columns (else no copy)
        x = x.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)  # -inf for a shard made only of padding
    local, hit = _in_shard(target, vocab_start, limit, ignore_index)
    xt = x.gather(-1, local.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    xt = torch.where(hit, xt, torch.zeros_like(xt))
    total = torch.where(valid, x, torch.zeros_like(x)).sum(-1) if with_sum else None
    return lse, xt, total


def shard_grad_reference(logits, target, lse, grad_output, vocab_start=0, vocab_size=None,
                         ignore_index=-100, label_smoothing=0.0):
    x = upcast(logits)
    V = x.shape[-1]
    limit = _limit(V, vocab_start, vocab_size)
    n_classes = vocab_size if vocab_size is not None else vocab_start + V
    grad = torch.exp(x - lse.to(x.dtype).unsqueeze(-1)) - label_smoothing / n_classes
    local, hit = _in_shard(target, vocab_start, limit, ignore_index)
    rows = torch.arange(x.shape[0], device=x.device)
    grad[rows[hit], local[hit]] -= 1.0 - label_smoothing
    grad = grad * torch.where(target == ignore_index, 0.0, grad_output.to(x.dtype)).unsqueeze(-1)
    grad[:, limit:] = 0.0
    return grad.to(logits.dtype)


def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(upcast(logits), target, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- kernels
@jit
def _stats_kernel(x_ptr, stride, t_ptr, lse_ptr, xt_ptr, sum_ptr, V, limit, vocab_start,
                  ignore_index, WITH_SUM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    # Per-lane running max and rescaled sum: the loop body is elementwise, and the lanes are
    # combined once at the end. The max starts finite so that -inf (padding) never meets
    # -inf in a subtraction; exp(-inf - m) is then simply 0.
    m = tl.full((BLOCK,), -1e30, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    tot = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < limit, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        if WITH_SUM:
            tot += tl.where(c < limit, x, 0.0)
    mx = tl.max(m, axis=0)
    total_s = tl.sum(s * tl.exp(m - mx), axis=0)
    # A shard made only of padding has total_s = 0: its logsumexp is -inf.
    lse = tl.where(total_s > 0, mx + tl.log(tl.maximum(total_s, 1e-30)), float("-inf"))
    t = tl.load(t_ptr + row)
    local = t - vocab_start
    hit = (t != ignore_index) & (local >= 0) & (local < limit)
    xt = tl.load(x_row + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(xt_ptr + row, xt)
    if WITH_SUM:
        tl.store(sum_ptr + row, tl.sum(tot, axis=0))


@jit
def _grad_kernel(x_ptr, stride, out_ptr, out_stride, t_ptr, lse_ptr, g_ptr, V, limit,
                 vocab_start, ignore_index, on_target, uniform, BLOCK: tl.constexpr):
    # on_target = 1 - eps and uniform = eps / vocab_size: the smoothed one-hot target.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    g = tl.load(g_ptr + row).to(tl.float32)
    g = tl.where(t == ignore_index, 0.0, g)
    local = t - vocab_start
    for start in tl.range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_ptr + row * stride + c, mask=c < limit, other=float("-inf"))
        p = tl.exp(x.to(tl.float32) - lse)
        grad = (p - uniform - tl.where(c == local, on_target, 0.0)) * g
        grad = tl.where(c < limit, grad, 0.0)  # padding columns: exactly zero
        # Each chunk is read before it is written, so out may alias x (in-place gradient).
        tl.store(out_ptr + row * out_stride + c, grad.to(out_ptr.dtype.element_ty),
                 mask=c < V)


def _block(V, device):
    # Interpreted launches use small chunks so that tests exercise the chunk loop.
    return min(max(16, next_pow2(V)), 4096 if device.type == "cuda" else 256)


def _check_2d(logits, target, name):
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"{name}: logits must be [N, V] and target [N], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: target must be int64 class indices, got {target.dtype}")


def _row_major(logits):
    return logits if logits.stride(-1) == 1 else logits.contiguous()


# ----------------------------------------------------------------------------- building blocks
def shard_stats(logits, target, vocab_start=0, vocab_size=None, ignore_index=-100,
                with_sum=False, *, backend="auto"):
    """Per-row statistics of one vocab shard, in fp32 (no autograd).

    logits [N, V_local] holds global columns [vocab_start, vocab_start + V_local); columns
    with global index >= vocab_size (None: no padding) are masked out. Returns
    ``(lse, target_logit, sum_logits)``, each [N] fp32: the shard's logsumexp (-inf if it
    holds only padding), the logit at the target (0 if the target is not in this shard or
    is ignore_index), and the sum of valid logits when ``with_sum`` (label smoothing),
    else None. Combine over ranks: lse = logsumexp of the lse's, the others by sum.
    """
    _check_2d(logits, target, "shard_stats")
    if not use_triton(backend, logits, target):
        return shard_stats_reference(logits, target, vocab_start, vocab_size, ignore_index,
                                     with_sum)
    logits = _row_major(logits)
    N, V = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    xt = torch.empty_like(lse)
    total = torch.empty_like(lse) if with_sum else lse
    _stats_kernel[(N,)](logits, logits.stride(0), target, lse, xt, total, V,
                        _limit(V, vocab_start, vocab_size), vocab_start, ignore_index,
                        WITH_SUM=with_sum, BLOCK=_block(V, logits.device), num_warps=8)
    return lse, xt, (total if with_sum else None)


def shard_grad_(logits, target, lse, grad_output, vocab_start=0, vocab_size=None,
                ignore_index=-100, label_smoothing=0.0, *, out=None, backend="auto"):
    """Write d(loss)/d(logits) for one vocab shard into ``out`` (default: ``logits``
    itself, in place) and return it.

    grad[n, c] = (exp(x[n, c] - lse[n]) - (1 - eps) * [c is the target] - eps / vocab_size)
                 * grad_output[n]
    with lse the *global* logsumexp [N] (fp32), grad_output [N] the gradient of the
    per-token loss, eps = label_smoothing. Rows whose target is ignore_index and padding
    columns (global index >= vocab_size) get 0. vocab_size defaults to
    vocab_start + V_local, which is only right for an unsharded, unpadded vocabulary.
    """
    _check_2d(logits, target, "shard_grad_")
    if lse.shape != target.shape or grad_output.shape != target.shape:
        raise ValueError("shard_grad_: lse and grad_output must be [N] like target, got "
                         f"{tuple(lse.shape)} and {tuple(grad_output.shape)}")
    out = logits if out is None else out
    if out.shape != logits.shape:
        raise ValueError(f"shard_grad_: out {tuple(out.shape)} must match logits")
    if not use_triton(backend, logits, target, lse, grad_output, out):
        grad = shard_grad_reference(logits, target, lse, grad_output, vocab_start, vocab_size,
                                    ignore_index, label_smoothing)
        return out.copy_(grad)
    if out.stride(-1) != 1 or logits.stride(-1) != 1:
        raise ValueError("shard_grad_: logits and out need a contiguous last dim (the "
                         "gradient is written in place); pass logits.contiguous()")
    N, V = logits.shape
    n_classes = vocab_size if vocab_size is not None else vocab_start + V
    _grad_kernel[(N,)](logits, logits.stride(0), out, out.stride(0), target,
                       lse.contiguous(), grad_output.contiguous(), V,
                       _limit(V, vocab_start, vocab_size), vocab_start, ignore_index,
                       1.0 - label_smoothing, label_smoothing / n_classes,
                       BLOCK=_block(V, logits.device), num_warps=8)
    return out


# ----------------------------------------------------------------------------- public op
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2, target, ignore_index, smoothing, inplace):
        lse, xt, total = shard_stats(logits2, target, 0, None, ignore_index,
                                     with_sum=smoothing > 0, backend="triton")
        loss = lse - (1.0 - smoothing) * xt
        if smoothing > 0:
            loss = loss - smoothing / logits2.shape[-1] * total
        loss = torch.where(target == ignore_index, 0.0, loss)
        ctx.save_for_backward(logits2, target, lse)
        ctx.args = (ignore_index, smoothing, inplace)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits2, target, lse = ctx.saved_tensors
        ignore_index, smoothing, inplace = ctx.args
        out = logits2 if inplace else torch.empty_like(logits2)
        grad = shard_grad_(logits2, target, lse, grad_loss.contiguous(), 0, None,
                           ignore_index, smoothing, out=out, backend="triton")
        return grad, None, None, None, None


def cross_entropy(logits, target, ignore_index=-100, *, label_smoothing=0.0,
                  inplace_backward=True, backend="auto"):
    """Per-token cross-entropy: logits [..., V], target [...] -> fp32 loss shaped like
    target (0 where target == ignore_index). The backward writes the gradient into the
    logits buffer unless ``inplace_backward=False`` or logits is a leaf tensor."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross_entropy: target shape {tuple(target.shape)} must equal "
                         f"logits shape without the vocab dim {tuple(logits.shape[:-1])}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits2 = logits.reshape(-1, logits.shape[-1])
    target1 = target.reshape(-1)
    if not use_triton(backend, logits, target):
        loss = cross_entropy_reference(logits2, target1, ignore_index, label_smoothing)
        return loss.view(target.shape)
    inplace = inplace_backward and not logits.is_leaf
    loss = _CrossEntropy.apply(_row_major(logits2), target1, ignore_index,
                               float(label_smoothing), inplace)
    return loss.view(target.shape)
