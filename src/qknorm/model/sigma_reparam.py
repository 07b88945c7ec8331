"""sigma-reparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"): every matrix W of a block is used as W_hat = gamma / sigma(W) * W, with sigma(W) its
spectral norm and gamma a learnable scalar.

sigma is estimated as u^T W v with one power-iteration step per training forward, continuing from the
previous step's u and v (the paper's and torch's spectral_norm scheme); the gradient flows through W
only. The q, k and v parts of the fused QKV matrix and the gate and up parts of SwiGLU's FC1 are
separate matrices in the paper, so each block of rows gets its own sigma and gamma.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .attention import training_forward
from .output_gate import OutputGate
from .parts import parts_of
from .roles import declare


class SigmaReparam(nn.Module):
    """A parametrization of a Linear weight [out, in] whose rows split into blocks of `sizes`."""

    u: torch.Tensor
    v: torch.Tensor
    repeats: torch.Tensor

    def __init__(self, weight: torch.Tensor, sizes: tuple[int, ...]):
        super().__init__()
        self.sizes = tuple(sizes)
        us, vs, sigmas = [], [], []
        with torch.no_grad():  # start from the exact singular vectors (as Apple's reference code does)
            for w in weight.detach().double().split(self.sizes):
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                us.append(u[:, 0])
                vs.append(vh[0])
                sigmas.append(s[0])
        self.register_buffer("u", torch.cat(us).to(weight.dtype))  # [out]: the blocks' left vectors
        self.register_buffer("v", torch.stack(vs).to(weight.dtype))  # [blocks, in]
        # gamma starts at sigma(W_0), so W_hat = W at initialization and the model's init is kept
        self.gamma = nn.Parameter(torch.stack(sigmas).to(weight.dtype))
        declare(self, gamma="scalar")
        self.register_buffer("repeats", torch.tensor(self.sizes), persistent=False)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """u^T W v per block, differentiable in W; in a training forward after one power step."""
        blocks = weight.split(self.sizes)
        if training_forward(self):
            with torch.no_grad():
                for w, u, v in zip(blocks, self.u.split(self.sizes), self.v, strict=True):
                    v.copy_(F.normalize(w.t().to(v.dtype) @ u, dim=0))
                    u.copy_(F.normalize(w.to(u.dtype) @ v, dim=0))
        # clones: a later step's in-place update must not touch vectors this graph saved
        return torch.stack([u.clone() @ (w @ v.clone()) for w, u, v in zip(blocks, self.u.split(self.sizes), self.v, strict=True)])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = (self.gamma / self.sigma(weight)).repeat_interleave(self.repeats, output_size=weight.shape[0])
        return weight * scale[:, None].to(weight.dtype)


def apply_sigma_reparam(layers: Iterable[nn.Linear | OutputGate]) -> None:
    """Reparametrize each layer's `weight` matrix (a Linear's, the output gate's), each of its parts (q, k, v;
    gate, up) with its own sigma and gamma. The model names the layers (Transformer: every block's matrices,
    not the embedding or the output head)."""
    for layer in layers:
        sizes = tuple(part.rows for part in parts_of(layer))  # q, k, v and gate, up apart (parts.py)
        # unsafe: skip the registration's trial forward, which would take a power step
        parametrize.register_parametrization(layer, "weight", SigmaReparam(layer.weight, sizes), unsafe=True)
