"""K runs of one shape as one model with a leading member axis: the arithmetic of stacked sweeps.

A stack is the same `Transformer`, not a second one: each member's parameters are stacked along a new
first axis, and `torch.func.vmap` maps the model's own `loss` over that axis (`functional_call` with the
member's parameters). Every op then runs once for K members (a batched matmul instead of K small
ones), and members stay independent: nothing mixes the member axis, so member k's loss and gradients
are its solo run's (tests/test_stack.py checks them against solo models to float rounding). On a CPU,
where vmap costs more than it saves, the same stack loops over its members' views instead
(`kernels.stack_kernel`).

Members must agree on everything that sets a shape or a code path (model, attention variant, data
shapes); `training.stack.stack_conflict` names the first key that does not. They may differ in their
initialization (seed) and in the optimizer's scalars: each member is updated by its own optimizer,
the one its solo run builds, over views of its slice of the stack (`member_views`).

Inside the vmapped loss every part of the step takes the path it takes in a solo run on the same
device (`kernels.py`): the CPU's hand-written autograd nodes (norm + RoPE, the chunked LM-head loss)
declare `generate_vmap_rule`, so vmap runs them per member as they are, and a member's arithmetic is
its solo run's op for op. A stack whose members need their own modules (attention scalars that
differ, QK-Clip, the soft-cap's kernels) loops over its member views on every device
(`config.needs_own_code`, which the stack reads from its members' own configs).
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..config import needs_own_code
from . import kernels
from .transformer import Transformer


class _Loss(nn.Module):
    """`model.loss` as a module's forward, so that functional_call can run it with other parameters."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, idx, targets, z_loss):
        return self.model.loss(idx, targets, z_loss)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class StackedModel(nn.Module):
    """Members' parameters stacked as [K, ...]; `loss` maps the one model over them."""

    def __init__(self, members: Sequence[Transformer]):
        super().__init__()
        if not members:
            raise ValueError("a stack needs at least one member")
        self.k = len(members)
        params, buffers = stack_module_state(list(members))
        self.names = list(params)
        self.params = nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone()) for n, p in params.items()})
        # the config's own tables (RoPE) are not stacked: every member reads the template's or its own, which
        # follow a dtype change from float64 (Transformer._apply) where a stacked copy would only be cast
        buffers = {n: b for n, b in buffers.items() if n not in Transformer.config_buffers}
        self.buffer_names = list(buffers)
        for n, b in buffers.items():
            self.register_buffer(_key(n), b.clone(), persistent=False)
        # the template whose code runs for every member; its own tensors are never read (functional_call
        # substitutes the members'), and it is kept out of self.parameters() so no optimizer sees it
        self._template = [_Loss(copy.deepcopy(members[0]))]
        # each member's own modules (their tensors are replaced by views into the stack): what a looped
        # stack runs, with the member's own attention scalars
        self._skeletons = list(members)
        self._views: list[Transformer] | None = None
        self.own_code = needs_own_code([m.attention_cfg for m in members])  # loss() loops over the members then

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for module in (self._template[0], *self._skeletons):  # their other state (caches) moves too
            module._apply(fn, recurse)
        self._views = None  # views of the old storage: rebuilt on the next use
        return self

    def member_views(self) -> list[Transformer]:
        """One solo Transformer per member whose parameters are views into the stack: what the member's
        own optimizer (training/optim.py's, as in its solo run), gradient clipping, stability monitor
        and validation work on. Built once; writes through them are writes to the stack."""
        if self._views is None:
            self._views = [self._view(k) for k in range(self.k)]
        return self._views

    def _view(self, k: int) -> Transformer:
        model = self._skeletons[k]
        by_old = {}
        for name in self.names:
            old = model.get_parameter(name)
            by_old[id(old)] = nn.Parameter(self.params[_key(name)].data[k], requires_grad=old.requires_grad)
        for module in model.modules():  # every reference to a parameter, tied ones included
            for attr, p in list(module._parameters.items()):
                if p is not None and id(p) in by_old:
                    module._parameters[attr] = by_old[id(p)]
        for name in self.buffer_names:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = getattr(self, _key(name))[k]
        return model

    def share_gradients(self, k: int) -> None:
        """Point member k's view parameters' .grad at its slice of the stack's gradients (after a
        vmapped backward; a looped one already left them there)."""
        if all(self.params[_key(n)].grad is None for n in self.names):
            return
        view = dict(self.member_views()[k].named_parameters())
        for name in self.names:
            g = self.params[_key(name)].grad
            view[name].grad = None if g is None else g[k]

    def named_member_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(the member model's parameter name, the stacked [K, ...] parameter)."""
        return [(n, self.params[_key(n)]) for n in self.names]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's parameters under the model's own names: loads into a solo Transformer."""
        return {n: self.params[_key(n)][k].detach() for n in self.names}

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, z_loss: torch.Tensor, members: Sequence[int] | None = None,
             own_code: bool = False):
        """idx, targets [K, B, T]; z_loss [K] -> for each member in `members` (default: all): mean CE +
        z_loss * mean log^2 Z [M], per-token CE [M, B, T] (no grad), mean log^2 Z [M] (no grad). On the
        path kernels.stack_kernel picks: vmapped over all K (gradients land on the stacked parameters;
        the members left out get none) or looped over the chosen members' views (gradients land on the
        views). A stack whose members need their own code (self.own_code) loops whatever `own_code` says."""
        members = list(range(self.k)) if members is None else list(members)
        if kernels.stack_kernel(idx.device, own_code or self.own_code) == "loop":
            views = self.member_views()
            outs = [views[k].loss(idx[k], targets[k], z_loss[k]) for k in members]
            return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
        params = {"model." + n: self.params[_key(n)] for n in self.names}
        buffers = {"model." + n: getattr(self, _key(n)) for n in self.buffer_names}
        template = self._template[0]

        def one(p, b, x, y, z):
            return functional_call(template, (p, b), (x, y, z))

        left_out = [k for k in range(self.k) if k not in members]
        # a training forward updates state in place (sigma-reparam's power iteration moves its u, v buffers): vmap runs
        # every member, so the state of a member left out of this step (one waiting to rejoin after a resume) is put
        # back as its own run would have it, untouched by a step it did not take
        kept = {n: b[left_out].clone() for n, b in buffers.items()} if left_out and buffers else {}
        with warnings.catch_warnings():
            # vmap loops over members for the few ops without a batching rule (SDPA on a CPU, addcmul_):
            # correct, and said once here rather than on every step
            warnings.filterwarnings("ignore", message="There is a performance drop")
            total, nats, z_sq = vmap(one, randomness="error")(params, buffers, idx, targets, z_loss)
        if left_out:
            with torch.no_grad():
                for n, saved in kept.items():
                    buffers[n][left_out] = saved
            total, nats, z_sq = total[members], nats[members], z_sq[members]
        return total, nats.detach(), z_sq.detach()
