"""Token cross-entropy for the language model, plain and fused with the output projection.

The fused version computes logits = x @ W^T and the loss chunk by chunk over the tokens and works out
the loss's gradients with respect to x and W right away, while each chunk of logits is still in cache:
one exponential per logit instead of three passes (log-softmax, its backward and a zero-filled
gradient), better-shaped matrix products, and no (N, V) log-probabilities or logit gradients kept for
the backward pass. The full logits are still returned, and gradients flowing into them (a loss built
on the logits as well) are handled exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = {"cpu": 16 * 2**20}  # float32 logits per chunk; other devices: 1 GiB
DEFAULT_CHUNK_BYTES = 2**30


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100 (0, with zero gradient, when there are none).

    Low-precision logits are upcast for the softmax; float32 ones are used as they are (no copy).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk: int, keep_logits: bool):
        # x (N, D), weight (V, D), labels (N,) -> loss (), logits (N, V) or (0, V)
        N, V = x.shape[0], weight.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # softmax and accumulation precision
        valid = labels != IGNORE_INDEX  # (N,)
        scale = 1.0 / valid.sum().clamp(min=1).to(acc)
        targets = labels.clamp(min=0)
        logits = x.new_empty(N if keep_logits else 0, V)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        # Chunk buffers, reused (no fresh memory per chunk). Without kept logits the softmax is
        # computed in place over the chunk's logits.
        scratch = x.new_empty(0 if keep_logits else min(chunk, N), V)
        work = torch.empty(min(chunk, N) if keep_logits else 0, V, dtype=acc, device=x.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            xc, tc = x[s:e], targets[s:e, None]
            out = logits[s:e] if keep_logits else scratch[: e - s]
            lc = torch.mm(xc, weight.t(), out=out).to(acc)  # (c, V)
            w = valid[s:e, None] * scale  # each token's weight in the mean, (c, 1)
            total -= (lc.gather(1, tc) * w).sum()
            top = lc.amax(-1, keepdim=True)
            p = torch.sub(lc, top, out=work[: e - s]) if keep_logits else lc.sub_(top)
            p = p.exp_()  # unnormalised softmax, (c, V)
            norm = p.sum(-1, keepdim=True)
            total += ((top + norm.log()) * w).sum()  # log-sum-exp
            # d loss / d logits = w * (softmax - one_hot(target))
            p.mul_(w / norm).scatter_add_(1, tc, -w)
            p = p.to(x.dtype)
            torch.mm(p, weight, out=grad_x[s:e])
            if grad_w.dtype == p.dtype:
                grad_w.addmm_(p.t(), xc)
            else:
                grad_w.add_(torch.mm(p.t(), xc))
        ctx.save_for_backward(x, weight, grad_x, grad_w)
        ctx.set_materialize_grads(False)
        if not keep_logits:
            ctx.mark_non_differentiable(logits)
        return total, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        x, weight, grad_x, grad_w = ctx.saved_tensors
        gx = gw = None
        if grad_loss is not None:
            gx, gw = grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss
        if grad_logits is not None and grad_logits.numel():  # a loss was built on the logits too
            gl = grad_logits.to(x.dtype)
            gx = gl @ weight if gx is None else gx.addmm_(gl, weight)
            gw = (gl.t() @ x).to(grad_w.dtype) if gw is None else gw.add_(gl.t() @ x)
        return gx, None if gw is None else gw.to(weight.dtype), None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_bytes: int | None = None,
    keep_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, D) hidden states, (V, D) output weights, (B, T) labels -> (mean loss, (B, T, V) logits).

    Same values and gradients as ``cross_entropy(x @ weight.T, labels)``, computed in chunks of about
    ``chunk_bytes`` of logits (a cache-sized default on CPU, large on accelerators). With
    ``keep_logits=False`` the full logits are never materialised and None is returned for them.
    """
    B, T, D = x.shape
    if torch.is_autocast_enabled(x.device.type):  # products in the autocast dtype, as F.linear would be
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(x.device.type, DEFAULT_CHUNK_BYTES)
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    with torch.autocast(x.device.type, enabled=False):
        loss, logits = _LinearCrossEntropy.apply(x.reshape(B * T, D), weight, labels.reshape(-1), chunk,
                                                 keep_logits)
    return loss, logits.view(B, T, -1) if keep_logits else None
