"""RMS QK-norm followed by RoPE as a single autograd node with a hand-written backward.

Eager PyTorch evaluates `rms_norm(x) * gain` and then the rotate-half RoPE as about a dozen separate
elementwise kernels (F.rms_norm is itself composite on CPU: pow, mean, add, rsqrt, mul), each a full
pass over q and k, and autograd keeps most of their outputs for the backward. Here the forward is
one reduction and a few passes written into one output, the backward is the same formulas by hand, and
only the input and the per-row inverse RMS are saved. Same arithmetic as the composite version;
`tests/test_attention.py` checks values and gradients against the float64 formulas.

Rows are laid out [B, T, R, D] (R = query heads then key heads). An RMS statistic covers `group`
consecutive heads: 1 for per-head scope, H for per-layer scope (OLMo 2), where the statistic runs over
the whole projection but the rotation is still per head.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rope import half_tables, rotate


class _RMSNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gain: Optional[torch.Tensor], cos, sin, eps: float, group: int):
        b, t, r, d = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        grouped = x.reshape(b, t, r // group, group * d)
        norm = torch.linalg.vector_norm(grouped, dim=-1, keepdim=True, dtype=acc)  # one pass, no x^2 temporary
        inv_rms = norm.square_().div_(group * d).add_(eps).rsqrt_()
        y = (grouped * inv_rms).to(x.dtype).view(b, t, r, d)
        if gain is not None:
            y.mul_(gain.to(x.dtype))
        c, s = half_tables(cos, sin, x.dtype)
        ctx.save_for_backward(x, gain, inv_rms, c, s)
        ctx.group = group
        return rotate(y, c, s)

    @staticmethod
    def backward(ctx, grad):
        x, gain, inv_rms, c, s = ctx.saved_tensors
        b, t, r, d = x.shape
        group = ctx.group
        acc = inv_rms.dtype
        grad_y = rotate(grad.contiguous(), c, s, inverse=True).to(acc)  # the rotation is orthogonal
        x_hat = (x.reshape(b, t, r // group, group * d).to(acc) * inv_rms).view(b, t, r, d)
        grad_gain = None
        if gain is not None:
            if ctx.needs_input_grad[1]:
                grad_gain = (grad_y * x_hat).sum(dim=(0, 1)).to(gain.dtype)
            grad_y.mul_(gain.to(acc))
        # d/dx of x * inv_rms(x): inv_rms * (g - x_hat * mean(g * x_hat)) over each statistic's elements
        grad_y = grad_y.view(b, t, r // group, group * d)
        x_hat = x_hat.view(b, t, r // group, group * d)
        dot = (grad_y * x_hat).mean(dim=-1, keepdim=True)
        grad_x = grad_y.sub_(x_hat.mul_(dot)).mul_(inv_rms)
        return grad_x.view(b, t, r, d).to(x.dtype), grad_gain, None, None, None, None


def rms_norm_rope(x: torch.Tensor, gain: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, group: int = 1) -> torch.Tensor:
    """rope(x / rms(x) * gain): x [B, T, R, D]; gain [R, D] or None; statistics over `group` heads."""
    return _RMSNormRope.apply(x.contiguous(), gain, cos, sin, eps, group)
