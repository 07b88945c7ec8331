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
    # forward and setup_context apart, and generate_vmap_rule: vmap runs this node per member as it is
    # (a stack of runs, model/stack.py), so the chunks are gathered, not written into preallocated
    # tensors, and the gradients leave forward as extra outputs to be saved
    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, targets, z_coef, softcap: Optional[float], step: int, need_grad: bool):
        n = hidden.shape[0]
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 logits, fp64 when asked
        nats, grad_h, z_sq, grad_w = [], [], None, None
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            for s in range(0, n, step):
                h, tgt = h_all[s:s + step], targets[s:s + step]
                logits = (h @ w.t()).to(acc)
                if softcap is not None:
                    capped_tanh = torch.tanh(logits / softcap)
                    logits = softcap * capped_tanh
                lse = torch.logsumexp(logits, dim=-1)
                nats.append(lse - logits.gather(1, tgt[:, None]).squeeze(1))
                chunk_z = (lse * lse).sum()
                z_sq = chunk_z if z_sq is None else z_sq + chunk_z
                if not need_grad:
                    continue
                # d/dlogits of mean(nats) + z * mean(lse^2) = (softmax * (1 + 2 z lse) - onehot) / n
                grad = logits.sub_(lse[:, None]).exp_().mul_(((1.0 + 2.0 * z_coef * lse) / n)[:, None])
                grad.scatter_add_(1, tgt[:, None], torch.full_like(lse[:, None], -1.0 / n))
                if softcap is not None:
                    grad.mul_(1.0 - capped_tanh * capped_tanh)
                g = grad.to(compute_dtype)
                grad_h.append((g @ w).to(hidden.dtype))
                chunk_w = (g.t() @ h).to(acc)
                grad_w = chunk_w if grad_w is None else grad_w + chunk_w
        all_nats = torch.cat(nats)
        z_mean = z_sq / n
        total = all_nats.mean() + z_coef * z_mean
        none = all_nats[:0]  # a placeholder output where no gradient was asked for
        return total, all_nats, z_mean, torch.cat(grad_h) if need_grad else none, grad_w if need_grad else none

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, nats, z_mean, grad_h, grad_w = output
        ctx.mark_non_differentiable(nats, z_mean, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = inputs[1].dtype

    @staticmethod
    def backward(ctx, grad_total, _grad_nats, _grad_z, _grad_h, _grad_w):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_total).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss=0.0,
            softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [..., d], weight [V, d], targets [...] -> (mean CE + z_loss * mean log^2 Z, per-token
    CE in nats (no grad), mean log^2 Z (no grad)), on the path `kernels.lm_loss_chunk_rows` picks.
    z_loss: a number, or a 0-d tensor (one per member of a stack of runs)."""
    on = torch.is_autocast_enabled(hidden.device.type)
    rows = kernels.lm_loss_chunk_rows(hidden.device, weight.shape[0],
                                      torch.get_autocast_dtype(hidden.device.type) if on else hidden.dtype)
    if rows is None:  # composite: the whole logit matrix, as a user would write it
        logits = head_logits(hidden, weight, softcap)
        log_z = torch.logsumexp(logits, dim=-1)
        nats = log_z - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        z_sq = (log_z * log_z).mean()
        return nats.mean() + z_loss * z_sq, nats.detach(), z_sq.detach()
    d = hidden.shape[-1]
    # (requires_grad is not visible on a tensor inside vmap; grad mode is: validation runs without it)
    need_grad = torch.is_grad_enabled()
    z = z_loss if isinstance(z_loss, torch.Tensor) else float(z_loss)
    total, nats, z_sq, _, _ = _FusedHeadLoss.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), z, softcap, rows,
                                                   need_grad)
    return total, nats.view(targets.shape), z_sq


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """The output logits in fp32 or wider (the matmul in the autocast dtype), soft-capped when configured."""
    logits = torch.nn.functional.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)

