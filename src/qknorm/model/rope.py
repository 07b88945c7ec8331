"""Rotary position embedding in the rotate-half convention (GPT-NeoX, Llama, Qwen3, OLMo 2).

On a CPU in eager mode `rope` is one autograd node: the rotation is written half by half into one
output, and its backward is the rotation by the opposite angle (the rotation is orthogonal), instead
of eager PyTorch's negate, concatenate, two multiplies and an add, each kept for the backward. On a
GPU and under torch.compile it is those composite ops, which the compiler fuses into the
surrounding kernels (`kernels.norm_rope_kernel` decides).
"""

from __future__ import annotations

import torch

from . import kernels


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [seq_len, head_dim], in float64 (callers cast to their dtype)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """[x1, x2] -> [x1 c - x2 s, x2 c + x1 s] (or by -angle), written half by half into one new tensor."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    sign = 1.0 if inverse else -1.0
    if is_batched(x):  # under vmap (a stack of runs, model/stack.py): the same ops, without out=
        return torch.cat([torch.addcmul(x1.mul(cos_half), x2, sin_half, value=sign),
                          torch.addcmul(x2.mul(cos_half), x1, sin_half, value=-sign)], dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos_half, out=out1).addcmul_(x2, sin_half, value=sign)
    torch.mul(x2, cos_half, out=out2).addcmul_(x1, sin_half, value=-sign)
    return out


def half_tables(cos: torch.Tensor, sin: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # the tables repeat each angle in both halves ([angles, angles]), so one half carries all of them
    half = cos.shape[-1] // 2
    return cos[:, None, :half].to(dtype), sin[:, None, :half].to(dtype)


def is_batched(x: torch.Tensor) -> bool:
    """Whether x is a tensor inside torch.func.vmap (one member's view of a stacked tensor)."""
    return torch._C._functorch.is_batchedtensor(x)


class _Rope(torch.autograd.Function):
    # forward and setup_context apart, and generate_vmap_rule: vmap runs this node per member as it is
    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin):
        return rotate(x, *half_tables(cos, sin, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad.contiguous(), *half_tables(cos, sin, grad.dtype), inverse=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by position (rotate-half convention); cos/sin are [T, D]."""
    if kernels.norm_rope_kernel(x.device) == "fused":
        return _Rope.apply(x.contiguous(), cos, sin)
    half = x.shape[-1] // 2
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s
