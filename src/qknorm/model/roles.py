"""Parameter roles, declared by the module that makes each parameter: the one answer to how a parameter is
initialized (`Transformer.reset_parameters`) and whether AdamW decays it (`training/optim.py`).

A shape cannot tell: a per-head QK-norm gain [H, D] or a per-head temperature [H, 1, 1] has as many
dimensions as a weight matrix. So each module names the role of each of its parameters, and `roles`
refuses a model with a parameter that has none.

  matrix     a weight matrix: drawn by `model.init`; decayed
  embedding  the token embedding (the tied output head too): drawn from N(0, std); decayed
  qk_gain    a QK-norm gain (`attention.gain`): 1, or w = 0 of the zero-centred 1 + w; decayed only with
             `attention.gain_weight_decay`
  gain       a block norm's gain: 1; never decayed
  bias       0; never decayed
  scalar     a learned multiplier with its own init (temperature, LayerScale's lambda, sigma-reparam's
             gamma); never decayed

The declaration lives on the module (a `param_roles` dict keyed by the parameter's attribute name), not
on the tensor: the tensor of a parameter is replaced without its module knowing (a stack's member views,
model/stack.py; a parametrization's `original`; a dtype conversion that swaps parameters).
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn
from torch.nn.utils import parametrize

ROLES = ("matrix", "embedding", "qk_gain", "gain", "bias", "scalar")
DRAWN = ("matrix", "embedding")  # the roles whose init consumes the RNG
_ATTR = "param_roles"

M = TypeVar("M", bound=nn.Module)


def declare(module: M, **param_roles: str) -> M:
    """Declare the roles of `module`'s parameters by attribute name (declare(linear, weight="matrix",
    bias="bias")); returns the module. An absent optional parameter (registered as None) may be declared."""
    for attr, role in param_roles.items():
        if role not in ROLES:
            raise ValueError(f"{type(module).__name__}.{attr}: unknown parameter role {role!r} (roles: {', '.join(ROLES)})")
        if attr not in module._parameters:
            raise ValueError(f"{type(module).__name__} has no parameter {attr!r} to declare")
    # a copy, never an update in place: the dict may be shared with a module this one was copied from
    setattr(module, _ATTR, {**getattr(module, _ATTR, {}), **param_roles})
    return module


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that made parameter `name` and its attribute there: for a parametrized tensor
    (`<owner>.parametrizations.<tensor>.original`), its owner's, whose declarations it keeps."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if isinstance(module, parametrize.ParametrizationList) and attr == "original":
        lists, _, attr = path.rpartition(".")
        module = model.get_submodule(lists.rpartition(".")[0])
    return module, attr


def _declared(model: nn.Module, name: str) -> str | None:
    module, attr = owner(model, name)
    return getattr(module, _ATTR, {}).get(attr)


def roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role} in `named_parameters` order (a tied parameter once, under its first name).
    Raises if a parameter has no declared role, so a new module cannot fall back to a rule by shape."""
    out = {}
    for name, _ in model.named_parameters():
        role = _declared(model, name)
        if role is None:
            raise ValueError(f"parameter {name} has no declared role: declare it where it is made "
                             f"(qknorm.model.roles.declare; roles: {', '.join(ROLES)})")
        out[name] = role
    return out
