"""The matrices a stored weight holds: q, k and v in the fused QKV weight, gate and up in SwiGLU's FC1.

The model stores them fused for speed (one matmul, one weight), but each is a matrix of its own to
whatever treats a weight as a linear map: sigma-reparam's spectral norm (Zhai et al. 2023) and Muon's
orthogonalized update (Moonlight and modded-nanogpt orthogonalize q, k and v apart) act on each part,
never on their concatenation. Like a parameter's role (roles.py), the layout is declared by the module
that makes the weight, on the module, so a stack's member views and a parametrization keep it.

A part is a block of rows: `heads` matrices of `head_rows` x in_features each, one after the other (a
part that is not split by head has heads=1). A weight with no declaration is one part, itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from .roles import owner

_ATTR = "param_parts"

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Part:
    name: str  # q, k, v, gate, up
    heads: int  # the part's matrices stacked along the rows, one per head (1: one matrix)
    head_rows: int  # the rows of one head's matrix

    @property
    def rows(self) -> int:
        return self.heads * self.head_rows


def declare_parts(module: M, **parts: tuple[Part, ...]) -> M:
    """Declare the parts of `module`'s parameters by attribute name, in row order; they must tile its rows."""
    for attr, layout in parts.items():
        p = module._parameters.get(attr)
        if p is None:
            raise ValueError(f"{type(module).__name__} has no parameter {attr!r} to declare parts of")
        if sum(part.rows for part in layout) != p.shape[0]:
            raise ValueError(f"{type(module).__name__}.{attr}: parts of {sum(part.rows for part in layout)} rows "
                             f"for a weight of {p.shape[0]}")
    setattr(module, _ATTR, {**getattr(module, _ATTR, {}), **parts})
    return module


def parts_of(module: nn.Module, attr: str = "weight") -> tuple[Part, ...]:
    """The declared parts of `module.<attr>`, or the whole weight as one part."""
    declared = getattr(module, _ATTR, {}).get(attr)
    if declared is not None:
        return declared
    return (Part(attr, 1, module._parameters[attr].shape[0]),)  # type: ignore[union-attr]  # a registered parameter


def parameter_parts(model: nn.Module, name: str) -> tuple[Part, ...]:
    """The parts of parameter `name` of `model` (as `named_parameters` names it; a parametrized weight's
    `original` has its owner's)."""
    module, attr = owner(model, name)
    declared = getattr(module, _ATTR, {}).get(attr)
    if declared is not None:
        return declared
    return (Part(attr, 1, model.get_parameter(name).shape[0]),)
