"""QK-Clip (Kimi K2, arXiv:2507.20534) as part of a training step, with any optimizer: after the optimizer's
update, every attention layer rescales W_q and W_k where its max logit on the step's batch exceeded tau
(model/attention.py, `Attention.apply_qk_clip`: per head, or per layer with attention.qk_clip_scope=layer).
A solo run (LMModule.optimizer_step) and a stack's member (stack_trainer._member_step) call it at the same
point, before the callbacks, so the stability monitor and the checkpoint see the clipped weights."""

from __future__ import annotations

from ..config import AttentionConfig


def apply_qk_clip(model, attention: AttentionConfig) -> int:
    """Clip every attention layer of `model`; returns how many heads were clipped (gamma < 1) this step."""
    tau = attention.qk_clip_tau
    if tau is None:
        raise ValueError("apply_qk_clip without attention.qk_clip_tau")
    return sum(int((layer.apply_qk_clip(tau, attention.qk_clip_scope) < 1.0).sum()) for layer in model.attention_layers())


def qk_clip_metrics(model) -> dict[str, float]:
    """What a run logs of the last clip (metrics.csv, TensorBoard): each layer's smallest gamma and largest max logit
    S_h as the clip measured it (signed, on the step's batch, before the clip), and the count of clipped heads over
    all layers."""
    out = {}
    clipped = 0
    for layer in model.attention_layers():
        if layer.qk_clip_gamma is None:
            continue
        out[f"qk_clip/layer{layer.layer_idx}_min_gamma"] = float(layer.qk_clip_gamma.min())
        if layer.qk_clip_max_logit is not None:
            out[f"qk_clip/layer{layer.layer_idx}_max_logit"] = float(layer.qk_clip_max_logit.max())
        clipped += int((layer.qk_clip_gamma < 1.0).sum())
    if out:
        out["qk_clip/clipped_heads"] = float(clipped)
    return out
