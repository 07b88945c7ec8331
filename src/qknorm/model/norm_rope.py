"""QK-norm (RMS, LayerNorm or L2, with gain and bias) followed by RoPE as one autograd node with a
hand-written backward.

Eager PyTorch evaluates `norm(x) * gain (+ bias)` and then the rotate-half RoPE as about a dozen
separate elementwise kernels (F.rms_norm is itself composite on CPU: pow, mean, add, rsqrt, mul), each
a full pass over q and k, and autograd keeps most of their outputs for the backward. Here the forward
is one or two reductions and a few passes written into one output, the backward is the same formulas
by hand, and only the input and the per-row statistics are saved. Same arithmetic as the composite
version; `tests/test_attention.py` checks values and gradients against the float64 formulas.

This is the CPU path (`kernels.norm_rope_kernel`): on a GPU and under torch.compile, attention.py
takes the composite norm (norms.py) and RoPE instead, which the compiler fuses.

Rows are laid out [B, T, R, D] (R = query heads then key heads). A statistic covers `group`
consecutive heads: 1 for per-head scope, H for per-layer scope (OLMo 2), where the statistic runs over
the whole projection but the rotation is still per head.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rope import half_tables, rotate

KINDS = ("rms", "layernorm", "l2")


class _NormRope(torch.autograd.Function):
    # forward and setup_context apart, and generate_vmap_rule: vmap runs this node per member as it is
    # (a stack of runs, model/stack.py); the per-row statistics leave forward as extra outputs to be saved
    generate_vmap_rule = True

    @staticmethod
    def forward(x, gain: Optional[torch.Tensor], bias: Optional[torch.Tensor], cos, sin, kind: str, eps: float, group: int):
        b, t, r, d = x.shape
        n = group * d
        acc = torch.promote_types(x.dtype, torch.float32)
        grouped = x.reshape(b, t, r // group, n).to(acc)
        mean = grouped.mean(dim=-1, keepdim=True) if kind == "layernorm" else None
        centered = grouped - mean if mean is not None else grouped
        norm = torch.linalg.vector_norm(centered, dim=-1, keepdim=True)  # one pass, no x^2 temporary
        if kind == "l2":  # x / max(||x||, eps), as F.normalize
            inv = norm.clamp_(min=eps).reciprocal_()
        else:
            inv = norm.square_().div_(n).add_(eps).rsqrt_()
        y = (centered * inv).to(x.dtype).view(b, t, r, d)
        if gain is not None:
            y.mul_(gain.to(x.dtype))
        if bias is not None:
            y.add_(bias.to(x.dtype))
        c, s = half_tables(cos, sin, x.dtype)
        return rotate(y, c, s), inv, (mean if mean is not None else inv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gain, bias, cos, sin, kind, eps, group = inputs
        _, inv, mean = output
        ctx.mark_non_differentiable(inv, mean)
        ctx.save_for_backward(x, gain, mean if kind == "layernorm" else None, inv, cos, sin)
        ctx.kind, ctx.eps, ctx.group = kind, eps, group
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad, _grad_inv, _grad_mean):
        x, gain, mean, inv, cos, sin = ctx.saved_tensors
        c, s = half_tables(cos, sin, x.dtype)
        b, t, r, d = x.shape
        kind, group = ctx.kind, ctx.group
        acc = inv.dtype
        grad_y = rotate(grad.contiguous(), c, s, inverse=True).to(acc)  # the rotation is orthogonal
        grouped = x.reshape(b, t, r // group, group * d).to(acc)
        x_hat = ((grouped - mean).mul_(inv) if mean is not None else grouped * inv).view(b, t, r, d)
        grad_bias = grad_y.sum(dim=(0, 1)).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        grad_gain = None
        if gain is not None:
            if ctx.needs_input_grad[1]:
                grad_gain = (grad_y * x_hat).sum(dim=(0, 1)).to(gain.dtype)
            grad_y.mul_(gain.to(acc))
        # the Jacobian of each normalization, applied to g = dL/dx_hat over one statistic's elements:
        #   rms:       inv * (g - x_hat * mean(g x_hat))
        #   layernorm: inv * (g - mean(g) - x_hat * mean(g x_hat))
        #   l2:        inv * (g - x_hat * sum(g x_hat)), and g * inv where the norm was clamped to eps
        grad_y = grad_y.view(b, t, r // group, group * d)
        x_hat = x_hat.view(b, t, r // group, group * d)
        dot = (grad_y * x_hat).sum(dim=-1, keepdim=True)
        if kind == "l2":
            dot.mul_(inv < 1 / ctx.eps)
        else:
            dot.div_(group * d)
        grad_x = grad_y.sub_(x_hat.mul_(dot))
        if kind == "layernorm":
            grad_x.sub_(grad_x.mean(dim=-1, keepdim=True))
        grad_x.mul_(inv)
        return grad_x.view(b, t, r, d).to(x.dtype), grad_gain, grad_bias, None, None, None, None, None


def norm_rope(x: torch.Tensor, kind: str, gain: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              cos: torch.Tensor, sin: torch.Tensor, eps: float, group: int = 1) -> torch.Tensor:
    """rope(norm(x) * gain + bias): x [B, T, R, D]; gain and bias [R, D] or None; statistics over `group` heads."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _NormRope.apply(x.contiguous(), gain, bias, cos, sin, kind, eps, group)[0]
