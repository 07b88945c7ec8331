"""Output head + cross-entropy (+ z-loss, + final-logit soft-cap): chunk by chunk, or composite.

The full [tokens, vocab] logit matrix is the largest tensor of a small LM's step, and on a CPU every
pass over it (log-softmax, its backward, the zero-filled one-hot gradient) is bound by memory
bandwidth. The fused loss computes, differentiates and drops each chunk of rows while it is still in
cache: the gradients of the hidden states and of the head weight are produced in the forward pass and
only scaled in the backward pass (the approach of Liger-Kernel's fused linear cross-entropy). The
composite loss is the same formula as plain PyTorch ops, for torch.compile to fuse. `kernels.py`
chooses the path and the chunk size per device.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, z_coef: float, softcap: Optional[float], step: int):
        n = hidden.shape[0]
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 logits, fp64 when asked
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            nats = torch.empty(n, dtype=acc, device=hidden.device)
            z_sq = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_grad else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
            for s in range(0, n, step):
                h, tgt = h_all[s:s + step], targets[s:s + step]
                logits = (h @ w.t()).to(acc)
                if softcap is not None:
                    capped_tanh = torch.tanh(logits / softcap)
                    logits = softcap * capped_tanh
                lse = torch.logsumexp(logits, dim=-1)
                nats[s:s + step] = lse - logits.gather(1, tgt[:, None]).squeeze(1)
                z_sq += (lse * lse).sum()
                if not need_grad:
                    continue
                # d/dlogits of mean(nats) + z * mean(lse^2) = (softmax * (1 + 2 z lse) - onehot) / n
                grad = logits.sub_(lse[:, None]).exp_().mul_(((1.0 + 2.0 * z_coef * lse) / n)[:, None])
                grad[torch.arange(len(tgt), device=grad.device), tgt] -= 1.0 / n
                if softcap is not None:
                    grad.mul_(1.0 - capped_tanh * capped_tanh)
                g = grad.to(compute_dtype)
                grad_h[s:s + step] = (g @ w).to(hidden.dtype)
                grad_w += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ce = nats.mean()
        z_mean = z_sq / n
        total = ce + z_coef * z_mean
        ctx.mark_non_differentiable(nats, z_mean)
        return total, nats, z_mean

    @staticmethod
    def backward(ctx, grad_total, _grad_nats, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_total).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
            softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [..., d], weight [V, d], targets [...] -> (mean CE + z_loss * mean log^2 Z, per-token
    CE in nats (no grad), mean log^2 Z (no grad)), on the path `kernels.lm_loss_chunk_rows` picks."""
    rows = kernels.lm_loss_chunk_rows(hidden.device, weight.shape[0])
    if rows is None:  # composite: the whole logit matrix, as a user would write it
        logits = head_logits(hidden, weight, softcap)
        log_z = torch.logsumexp(logits, dim=-1)
        nats = log_z - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        z_sq = (log_z * log_z).mean()
        return nats.mean() + z_loss * z_sq, nats.detach(), z_sq.detach()
    d = hidden.shape[-1]
    total, nats, z_sq = _FusedHeadLoss.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), float(z_loss),
                                             softcap, rows)
    return total, nats.view(targets.shape), z_sq


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """The output logits in fp32 or wider (the matmul in the autocast dtype), soft-capped when configured."""
    logits = torch.nn.functional.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)

