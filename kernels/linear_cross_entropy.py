"""Cross-entropy of a linear head computed chunk by chunk, so the (tokens, vocab) logits never exist whole.

At a 50k vocabulary the full fp32 logits of a 32 x 2048 micro-batch take 13 GB, and their gradient as much
again. Here the logits of one chunk of rows at a time are formed, reduced to their loss, and turned at once
into that chunk's gradients for the hidden states and the weight (the softmax minus the one-hot target is
all the backward needs), after which the chunk is freed. Backward only scales the stored gradients by the
incoming one. The cost over a plain head: a (tokens, d_model) and a (vocab, d_model) gradient held from
forward to backward, and no recomputation.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 26
"""Logit entries per chunk (64 Mi fp32 numbers, 256 MiB): large enough that the matmuls stay efficient."""


def chunk_rows(vocab: int) -> int:
    """Rows (tokens) per chunk at this vocabulary size."""
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, rows, with_grad):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        for start in range(0, h.shape[0], rows):
            h_chunk, target = h[start:start + rows], targets[start:start + rows]
            logits = (h_chunk @ w.T).float()  # (rows, vocab), the one chunk alive
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            # log-sum-exp in place: no second chunk-sized buffer (torch.logsumexp would hold one)
            row_max = logits.amax(dim=1, keepdim=True)
            unnormalized = logits.sub_(row_max).exp_()
            row_sum = unnormalized.sum(dim=1, keepdim=True)
            loss += (row_max + row_sum.log()).squeeze(1).sub_(target_logit).sum()
            if with_grad:
                probs = unnormalized.div_(row_sum)
                probs[torch.arange(len(target), device=probs.device), target] -= 1.0  # d loss / d logits
                grad_logits = probs.to(compute_dtype)
                if compute_dtype == torch.float32 == hidden.dtype:  # straight into the outputs, no temporaries
                    torch.mm(grad_logits, w, out=grad_hidden[start:start + rows])
                    grad_weight.addmm_(grad_logits.T, h_chunk)
                else:
                    grad_hidden[start:start + rows] = grad_logits @ w
                    grad_weight += (grad_logits.T @ h_chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("linear_cross_entropy was called without gradients (torch.no_grad) and cannot "
                               "be differentiated")
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T against targets, without materialising the logits.

    hidden (tokens, d_model), weight (vocab, d_model), targets (tokens,) int64 -> scalar fp32 loss, the sum or
    the mean over tokens. The matmuls run in the autocast dtype when autocast is on (as nn.Linear would),
    the softmax and the loss in fp32; equal to F.cross_entropy(F.linear(hidden, weight).float(), targets) and
    its gradients up to summation order.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type=device_type, enabled=False):
        loss = _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk_rows(weight.shape[0]), with_grad)
    return loss / hidden.shape[0] if reduction == "mean" else loss
