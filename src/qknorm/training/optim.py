"""The optimizer (AdamW with decay/no-decay parameter groups, or Muon with AdamW beside it: muon.py) and
its linear-warmup, cosine-to-floor schedule, which drives every group of either."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import AttentionConfig, OptimConfig
from ..model.roles import roles
from .muon import build_muon


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier on the peak LR: linear warmup from 0, then cosine from 1 down to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, attention: AttentionConfig, embedding_decay: bool = True) -> tuple[list, list]:
    """(decayed, not decayed) by each parameter's declared role (model/roles.py): matrices and the embedding
    decay (the embedding unless `embedding_decay` is off: optim.embedding_weight_decay, OLMo 2's change); block
    norm gains, biases and scalars (temperatures, LayerScale, sigma-reparam's gamma) do not; QK-norm gains decay
    only when attention.gain_weight_decay is set (Qwen3-Next's fix for growing gains)."""
    decayed = {"matrix", *(("embedding",) if embedding_decay else ()), *(("qk_gain",) if attention.gain_weight_decay else ())}
    role = roles(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if role[name] in decayed else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, attention: AttentionConfig, on_cuda: bool) -> torch.optim.Optimizer:
    decay, no_decay = parameter_groups(model, attention, cfg.embedding_weight_decay)
    # Independent decay (Wortsman et al. 2023): theta -= s_t * lambda * theta, not lr_t * lambda * theta.
    # AdamW (and Muon) multiply weight_decay by the group's current lr = peak * s_t, so divide by the peak.
    wd = cfg.weight_decay / cfg.lr if cfg.independent_weight_decay else cfg.weight_decay
    fused = {"on": True, "off": False, "auto": on_cuda}[cfg.fused]
    kwargs = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "muon":
        return build_muon(model, decay, no_decay, wd, cfg, **kwargs)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    beta1, beta2 = cfg.betas
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, **kwargs)


def optimizer_and_schedule(model: nn.Module, cfg, on_cuda: bool):
    """The run's optimizer and its per-step LR scheduler (warmup + cosine): what a solo run trains with
    (LMModule.configure_optimizers), and each member of a stack with its own config (training/stack.py)."""
    opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=on_cuda)
    o, total = cfg.optim, cfg.trainer.max_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, o.warmup_steps, total, o.floor_ratio()))
