"""Soft-capped causal attention for CPU training: softmax(c * tanh(s * q k^T / c) + mask) v.

SDPA cannot cap logits and FlexAttention has no CPU backward (torch 2.13), so without this a
soft-cap on CPU materialises the whole [B, H, T, T] logit matrix several times over (scores,
tanh, cap, mask, softmax, each kept for autograd). Here the heads are processed a few at a
time so each chunk's T x T matrices stay in cache, nothing of size T x T is saved, and the
backward recomputes the scores from q and k (as FlashAttention does, at the granularity of
whole heads). Gradients are exact; `tests/test_attention.py` checks them against the float64
formula.
"""

from __future__ import annotations

import torch

# about 2 MB of fp32 logits per chunk: the chunk's score, probability and gradient
# matrices then live in the L2/L3 caches of a typical CPU core
_CHUNK_ELEMENTS = 1 << 19


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """True where query i may attend to key j (the last query sees every key)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def _additive_causal_mask(t_q: int, t_k: int, dtype, device) -> torch.Tensor:
    return torch.zeros(t_q, t_k, dtype=dtype, device=device).masked_fill_(~causal_mask(t_q, t_k, device), float("-inf"))


class _CappedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, cap: float):
        # the accumulation dtype is chosen here, so autocast must not recast the matmuls' operands
        with torch.autocast(q.device.type, enabled=False):
            return _CappedCausalAttention._forward(ctx, q, k, v, scale, cap)

    @staticmethod
    def _forward(ctx, q, k, v, scale: float, cap: float):
        b, h, t_q, d = q.shape
        t_k = k.shape[-2]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 logits and softmax, fp64 when asked
        qf, kf, vf = (x.reshape(b * h, x.shape[-2], d) for x in (q, k, v))
        out = torch.empty(b * h, t_q, d, dtype=acc, device=q.device)
        mask = _additive_causal_mask(t_q, t_k, acc, q.device)
        chunk = max(1, _CHUNK_ELEMENTS // (t_q * t_k))
        for i in range(0, b * h, chunk):
            part = slice(i, i + chunk)
            logits = torch.bmm(qf[part].to(acc), kf[part].to(acc).transpose(1, 2))
            logits.mul_(scale / cap).tanh_().mul_(cap).add_(mask)
            torch.bmm(logits.softmax(dim=-1), vf[part].to(acc), out=out[part])
        ctx.save_for_backward(qf, kf, vf, out)
        ctx.scale, ctx.cap, ctx.shape = scale, cap, (b, h, t_q, t_k, d)
        return out.to(q.dtype).view(b, h, t_q, d)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _CappedCausalAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        qf, kf, vf, out = ctx.saved_tensors
        scale, cap = ctx.scale, ctx.cap
        b, h, t_q, t_k, d = ctx.shape
        acc = out.dtype
        grad_out = grad_out.reshape(b * h, t_q, d).to(acc)
        # sum_j P_ij dP_ij = <dO_i, O_i>: the softmax backward without keeping P (FlashAttention-2)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)
        dq = torch.empty(b * h, t_q, d, dtype=acc, device=qf.device)
        dk = torch.empty(b * h, t_k, d, dtype=acc, device=qf.device)
        dv = torch.empty_like(dk)
        mask = _additive_causal_mask(t_q, t_k, acc, qf.device)
        chunk = max(1, _CHUNK_ELEMENTS // (t_q * t_k))
        for i in range(0, b * h, chunk):
            part = slice(i, i + chunk)
            q_c, k_c, v_c, do_c = qf[part].to(acc), kf[part].to(acc), vf[part].to(acc), grad_out[part]
            tanh = torch.bmm(q_c, k_c.transpose(1, 2)).mul_(scale / cap).tanh_()
            probs = (tanh * cap).add_(mask).softmax(dim=-1)
            torch.bmm(probs.transpose(1, 2), do_c, out=dv[part])
            grad_logits = torch.bmm(do_c, v_c.transpose(1, 2)).sub_(delta[part]).mul_(probs)
            # d/ds of c * tanh(s / c) is 1 - tanh^2; the scale comes from s = scale * q k^T
            grad_scores = grad_logits.mul_(tanh.square_().neg_().add_(1)).mul_(scale)
            torch.bmm(grad_scores, k_c, out=dq[part])
            torch.bmm(grad_scores.transpose(1, 2), q_c, out=dk[part])
        shape_q, shape_k = (b, h, t_q, d), (b, h, t_k, d)
        return (dq.to(qf.dtype).view(shape_q), dk.to(kf.dtype).view(shape_k),
                dv.to(vf.dtype).view(shape_k), None, None)


# opaque to torch.compile: the kernel is fused by hand already, and tracing its loops (unrolled per
# chunk, forward and backward) doubled the compile time of a soft-capped model for nothing
@torch.compiler.disable
def capped_causal_attention(q, k, v, scale, softcap: float) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, T, D]; scale a float or a learned 0-dim tensor."""
    if isinstance(scale, torch.Tensor):  # fold a learned scale into q so its gradient flows
        q, scale = q * scale.to(q.dtype), 1.0
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return _CappedCausalAttention.apply(q, k, v, float(scale), float(softcap))
