"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for the blocks'
weight matrices, AdamW for every other parameter, as one optimizer (`optim=muon`).

Muon's update of a weight matrix W with gradient G: a momentum buffer B <- mu B + (1 - mu) G (Nesterov:
the update is (1 - mu) G + mu B), orthogonalized by a few Newton-Schulz iterations (U S V^T -> about
U V^T), then W <- W (1 - lr wd) - lr' O, with lr' the LR adjusted to the matrix's shape. The arithmetic
is torch.optim.Muon's (torch >= 2.9), the reference the tests hold it to; it is written out here because
torch's Muon takes whole 2-D parameters only, and here

- the fused weights hold several matrices: QKV holds q, k and v (and `optim.muon_split=head` makes each
  head of them, and of an output gate's W_g, a matrix of its own, as modded-nanogpt's per-head
  orthogonalization), SwiGLU's FC1 holds
  gate and up. Moonlight and modded-nanogpt orthogonalize each apart, so each part (model/parts.py) is
  orthogonalized alone, and its LR adjusted by its own shape;
- the matrices of one shape are orthogonalized together, batched over a leading axis (one batched
  matmul instead of one per matrix; every matrix's own norm and Newton-Schulz, nothing mixed);
- one optimizer keeps one LR scheduler, one state_dict (a checkpoint resumes both exactly) and one
  `step` for Lightning, which takes a single optimizer in automatic optimization.

A stack's member (model/stack.py) gets its own optimizer over views of its slice, as its solo run
does: its momentum, its Newton-Schulz, never another member's.

The LR adjustment (`optim.adjust_lr_fn`): `match_rms_adamw` (Moonlight, Liu et al. 2025, "Muon is
Scalable for LLM Training"): lr * 0.2 * sqrt(max(A, B)) for an A x B matrix, which gives the update the
RMS of a typical AdamW update (0.2), so AdamW's LR, weight decay and schedule carry over; `original`
(Keller Jordan): lr * sqrt(max(1, A / B)).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..config import OptimConfig
from ..model.parts import parameter_parts
from ..model.roles import roles

# Keller Jordan's quintic Newton-Schulz coefficients (slope at zero maximized; torch.optim.Muon's too)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # torch.optim.Muon's: the floor of the Frobenius norm the update is divided by


def newton_schulz(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The orthogonalization of each matrix of g [..., A, B], batched over the leading dims: X / ||X||_F,
    then `steps` iterations of X <- a X + (b X X^T + c (X X^T)^2) X on the wide orientation. In bfloat16,
    as Keller Jordan's Muon and torch.optim.Muon compute it (tests/test_muon.py: equal to torch's, matrix
    by matrix); the result is bfloat16."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1: the iteration's domain
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(*lead, *x.shape[-2:])
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str, rows: int, cols: int) -> float:
    """The LR of the orthogonalized update of a rows x cols matrix (see the module's docstring)."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    raise ValueError(f"adjust_lr_fn: unknown value {adjust_lr_fn!r}; allowed: original, match_rms_adamw")


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices of the model's blocks (role `matrix`), which Muon takes. The embedding and the LM
    head (a matrix too when untied) are the input and output layers, which Muon is not for (Jordan et al.
    2024; Moonlight keeps both on AdamW): they stay with AdamW, as gains, biases and scalars do."""
    in_blocks = {id(p) for p in model.blocks.parameters()}  # type: ignore[union-attr]  # a Transformer's ModuleList
    role = roles(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and role[n] == "matrix" and id(p) in in_blocks]


def blocks(model: nn.Module, name: str, split: str) -> list[list[int]]:
    """[row start, row stop, matrices] per part of parameter `name`: each part (q, k, v, gate, up, or the
    whole weight) orthogonalized as one matrix, or with split="head" as one matrix per head."""
    out, start = [], 0
    for part in parameter_parts(model, name):
        out.append([start, start + part.rows, part.heads if split == "head" else 1])
        start += part.rows
    return out


class MuonWithAuxAdam(torch.optim.AdamW):
    """One optimizer, two update rules (Keller Jordan's name for Muon with its auxiliary AdamW): a group
    with `muon: True` takes Muon's step over its parameters' `blocks`, every other group torch's own AdamW
    step. Muon's groups take their settings (momentum, nesterov, ns_steps, adjust_lr_fn) from the group,
    the others AdamW's (betas, eps); lr and weight_decay are every group's, so one scheduler drives all."""

    def __init__(self, muon_groups: Iterable[dict], adamw_groups: Iterable[dict], *, lr: float, betas: tuple[float, float],
                 eps: float, momentum: float, nesterov: bool, ns_steps: int, adjust_lr_fn: str, **adamw: Any):
        muon = {"muon": True, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        groups = [{**g, **muon} for g in muon_groups] + [{**g, "muon": False} for g in adamw_groups]
        for g in groups:
            if g["muon"] and len(g["blocks"]) != len(g["params"]):
                raise ValueError("a Muon group needs the blocks of each of its parameters")
        super().__init__(groups, lr=lr, betas=betas, eps=eps, **adamw)
        # With the fused AdamW kernel, a GradScaler (fp16 AMP) would hand the optimizer the scale and leave the
        # gradients scaled, which fused AdamW undoes itself and Muon would not: the scaler unscales them instead.
        self._step_supports_amp_scaling = False

    def __setstate__(self, state: dict) -> None:
        # Adam's __setstate__ (on load_state_dict) reads every parameter state's "step", which Muon's (a momentum
        # buffer) has not: Muon's states are set aside while it runs
        muon = {p: s for p, s in state["state"].items() if "step" not in s}
        super().__setstate__({**state, "state": defaultdict(dict, {p: s for p, s in state["state"].items() if "step" in s})})
        self.state.update(muon)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]  # torch overloads it
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        taken: list[tuple[nn.Parameter, torch.Tensor]] = []
        for group in self.param_groups:
            if group["muon"]:
                taken += self._muon_step(group)
        # AdamW, torch's own step, over the other groups: it leaves a parameter without a gradient alone, so
        # Muon's parameters have theirs taken away for it (and given back after, as any step leaves them)
        for p, _ in taken:
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in taken:
                p.grad = grad
        return loss

    def _muon_step(self, group: dict) -> list[tuple[nn.Parameter, torch.Tensor]]:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list[tuple[nn.Parameter, int, int, torch.Tensor]]] = {}
        taken = []
        for p, layout in zip(group["params"], group["blocks"], strict=True):
            if p.grad is None:
                continue
            grad = p.grad
            taken.append((p, grad))
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - mu)
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            p.mul_(1 - lr * wd)  # decoupled weight decay, by the unadjusted LR (torch.optim.Muon, Moonlight)
            cols = p.shape[1]
            for start, stop, heads in layout:
                rows = (stop - start) // heads
                by_shape.setdefault((rows, cols, update.dtype, update.device), []).append(
                    (p, start, stop, update[start:stop].reshape(heads, rows, cols)))
        for (rows, cols, _, _), items in by_shape.items():
            ortho = newton_schulz(torch.cat([u for *_, u in items]), group["ns_steps"])
            step = adjusted_lr(lr, group["adjust_lr_fn"], rows, cols)
            for (p, start, stop, _), o in zip(items, ortho.split([u.shape[0] for *_, u in items]), strict=True):
                p[start:stop].add_(o.reshape(stop - start, cols), alpha=-step)
        return taken


def build_muon(model: nn.Module, decay: list[nn.Parameter], no_decay: list[nn.Parameter], weight_decay: float,
               cfg: OptimConfig, **adamw: Any) -> MuonWithAuxAdam:
    """`optim=muon`: Muon over the hidden matrices (decayed), AdamW over the rest of `decay` and `no_decay`
    (training/optim.py's groups, unchanged but for the matrices Muon took)."""
    hidden = hidden_matrices(model)
    taken = {id(p) for _, p in hidden}
    muon_group = {"params": [p for _, p in hidden], "weight_decay": weight_decay,
                  "blocks": [blocks(model, n, cfg.muon_split) for n, _ in hidden]}
    adamw_groups = [{"params": [p for p in decay if id(p) not in taken], "weight_decay": weight_decay},
                    {"params": no_decay, "weight_decay": 0.0}]
    return MuonWithAuxAdam([muon_group], adamw_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, momentum=cfg.momentum,
                           nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn, **adamw)
