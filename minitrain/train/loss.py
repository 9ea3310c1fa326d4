"""The loss head: linear + token cross-entropy, summed, without ever holding the (tokens x vocab) logits.

Owns `linear_cross_entropy_sum` (the seam: Liger's fused kernel on GPU when asked, else the chunked path),
`chunked_cross_entropy_sum` (plain PyTorch), `weighted_head_loss` (the preference objectives' head: per-token
log-probabilities first, then a per-token weighted CE sum whose gradient is the objective's) and
`scale_for_fsdp` (the one line of distributed loss math).

Trade-off of the chunked path: like Liger, it computes the gradients *in the forward pass*, chunk by chunk
(one (chunk x vocab) fp32 buffer at a time, reused in place for logits -> softmax -> dlogits), and keeps only
grad_hidden (T x H) and grad_weight (V x H, fp32) for backward. That costs 3 matmuls per chunk instead of the
4 a recompute-in-backward design needs, and its extra memory is the gradients that backward must produce
anyway. All three matmuls run in the compute dtype (bf16 on GPU: tensor cores, fp32 accumulation inside each
matmul); grad_weight sums the chunks' (V x H) products in fp32, as Liger does with accum_dtype=float32, at the
price of one (V x H) bf16 temporary per chunk.
The price: backward may run once (no `retain_graph` double backward), and the gradient work is done even if
the caller never calls backward while grad mode is on (use `torch.no_grad()` for evaluation: then only the
value is computed). Only positions with labels != -100 are gathered and multiplied, so masked prompt tokens
cost nothing in the head.

Preference objectives (`weighted_head_loss`): a pair's loss depends on its sequences only through their
summed log-probabilities, so its gradient is that of sum_t w_t * CE_t for per-token constants w_t that depend
on those sums (`minitrain.train.preference.token_weights`). The head therefore runs twice per chunk: a
no-grad pass for every trained token's CE (= -log p), the caller's `weigh` turns them into w_t, and the
weighted pass computes value and gradients as above with each row of dlogits scaled by its w_t. One more
(C x V) matmul per chunk than SFT (4 instead of 3), never a (T x V) buffer.

Loss convention (see the data contract): `labels` are already shifted; the loss is the SUM over positions with
labels != -100 of CE(hidden[t] @ weight.T, labels[t]). Dividing by the global trained-token count (and undoing
FSDP2's gradient averaging) is `scale_for_fsdp`'s job, so every rank and minibatch adds up to the same loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from minitrain.data.format import IGNORE_INDEX


def _chunk_ce(h: Tensor, weight: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CE of one chunk, in ONE (C x V) fp32 buffer: returns (per-row CE (C,), exp(logits - max), row sums).

    h (C, H), weight (V, H), y (C,). The matmul runs in the parameter dtype, as a plain lm_head would. The
    buffer is reused in place (logits -> exp(logits - max)); torch.logsumexp would allocate a second one.
    Dividing the returned buffer by the row sums gives the softmax.
    """
    logits = h @ weight.T  # (C, V)
    if logits.dtype != torch.float32:
        logits = logits.float()
    target = logits.gather(1, y[:, None]).squeeze(1)  # (C,) logit of the label
    peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    unnorm = logits.sub_(peak).exp_()  # (C, V) in place
    denom = unnorm.sum(dim=-1, keepdim=True)  # (C, 1)
    lse = (peak + denom.log()).squeeze(1)  # (C,)
    return lse - target, unnorm, denom


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of CE (times `row_weights` when given) over `rows` of hidden; gradients computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        rows: Tensor,
        chunk_size: int,
        row_weights: Tensor | None = None,
    ) -> Tensor:
        # hidden (T, H), weight (V, H), labels (T,), rows (N,) = positions with a trained label,
        # row_weights (N,) fp32 or None (all 1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_h else None  # (T, H), rows outside `rows` stay 0
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, H) fp32 accum
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]  # (C,)
            h = hidden.index_select(0, idx)  # (C, H)
            y = labels.index_select(0, idx)  # (C,)
            ce, unnorm, denom = _chunk_ce(h, weight, y)  # unnorm (C, V) fp32: the only vocab-sized buffer
            # dCE/dlogits = softmax - onehot, built in place in the same buffer
            grad_logits = unnorm.div_(denom)
            grad_logits.scatter_add_(1, y[:, None], torch.full_like(denom, -1.0))
            if row_weights is None:
                total += ce.sum()
            else:  # d(sum_t w_t CE_t)/dlogits: each row scaled by its weight
                w = row_weights[start : start + chunk_size]  # (C,)
                total += (w * ce).sum()
                grad_logits.mul_(w[:, None])
            # both gradient matmuls run in the compute dtype (tensor cores in bf16, fp32 accumulation inside
            # the matmul); only the sum over chunks of grad_weight is kept in fp32, as Liger's accum_dtype
            # does
            g = grad_logits.to(weight.dtype)  # (C, V); no copy in fp32
            if need_h:
                grad_hidden.index_copy_(0, idx, (g @ weight).to(hidden.dtype))  # (C, H)
            if need_w:
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.T, h.float())  # (V, C) @ (C, H), no temporary
                else:
                    grad_weight.add_(g.T @ h.to(g.dtype))  # (V, H) bf16 product, added into the fp32 sum
            del g, unnorm, grad_logits
        if need_w and weight.dtype != torch.float32:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked cross-entropy computes its gradients in forward; backward can run only once"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # the loss is a scalar, so the chain rule is one multiplication (in place: these buffers are ours)
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Sum over positions with labels != -100 of CE(hidden @ weight.T, labels); never holds all (T x V)
    logits.

    hidden (..., H), weight (V, H), labels (...) int64 already shifted. Returns a 0-dim fp32 tensor.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
    labels = labels.reshape(-1)  # (T,)
    if labels.numel() != hidden.shape[0]:
        raise ValueError(f"labels has {labels.numel()} positions but hidden has {hidden.shape[0]}")
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (N,) trained positions
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        total += _chunk_ce(hidden.index_select(0, idx), weight, labels.index_select(0, idx))[0].sum()
    return total


def weighted_head_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    weigh: Callable[[Tensor, Tensor], Tensor],
    chunk_size: int = 1024,
) -> Tensor:
    """sum_t w_t * CE(hidden[t] @ weight.T, labels[t]) over labels != -100, with w = weigh(rows, ce).

    hidden (..., H), weight (V, H), labels (...) shifted. `weigh(rows (N,), ce (N,) fp32)` sees the trained
    positions and their cross-entropies (= -log p, computed without gradients) and returns the weights (N,)
    fp32; gradients then flow as for `chunked_cross_entropy_sum`, each token's scaled by its weight. Under
    `torch.no_grad()` only the value is formed (and `weigh` still sees every CE: a log-prob pass).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
    labels = labels.reshape(-1)  # (T,)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    with torch.no_grad():
        parts = [
            _chunk_ce(hidden.index_select(0, idx), weight, labels.index_select(0, idx))[0]
            for idx in rows.split(chunk_size)
        ]
        ce = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32, device=hidden.device)
    weights = weigh(rows, ce).to(torch.float32).detach()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows, chunk_size, weights)
    return (weights * ce).sum()


def liger_available(device: torch.device | str) -> bool:
    """True when Liger's fused linear cross-entropy can run on `device` (a CUDA device with liger-kernel)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a driver
        return False
    return True


def linear_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, use_liger: bool, chunk_size: int = 1024
) -> Tensor:
    """The loss-head seam: Liger's fused kernel when asked and available, else `chunked_cross_entropy_sum`.

    Same convention either way: the SUM of token CE over labels != -100, as a 0-dim fp32 tensor.
    """
    if use_liger:
        if liger_available(hidden.device):
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            h = hidden.reshape(-1, hidden.shape[-1])
            y = labels.reshape(-1)
            loss = liger_fused_linear_cross_entropy(
                h, weight, y, ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
            )
            return loss.float()
        warnings.warn(
            "Liger kernels need a CUDA GPU with liger-kernel installed; "
            f"using the chunked loss on {hidden.device}",
            stacklevel=2,
        )
    return chunked_cross_entropy_sum(hidden, weight, labels, chunk_size)


def scale_for_fsdp(loss_sum: Tensor, global_loss_tokens: int, world_size: int) -> Tensor:
    """loss_sum / global_loss_tokens * world_size: FSDP2 averages gradients over ranks; this undoes it.

    With `global_loss_tokens` the trained tokens of the whole global batch (all ranks, all minibatches), the
    per-minibatch pieces add up to the global token-mean loss, whatever the split. A batch with no trained
    token gives 0 (not NaN).
    """
    return loss_sum * (world_size / max(global_loss_tokens, 1))
