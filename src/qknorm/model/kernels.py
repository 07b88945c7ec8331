"""Which implementation each part of the training step takes: the one place where that is decided.

The same arithmetic has two forms here, and which one is faster depends on the device:

- On a CPU in eager mode, hand-written autograd nodes win: the QK-norm + RoPE node (norm_rope.py,
  rope.py) makes one pass over q and k where eager PyTorch makes a dozen, and the LM-head loss
  (lm_loss.py) runs in chunks of rows whose logits stay in the cache. Every kernel launch is cheap on
  a CPU, so many small chunks cost nothing.
- On a GPU, and under torch.compile on any device, the composite form wins: plain PyTorch ops that
  the compiler fuses into a few kernels (a hand-written node is opaque to it), and on a GPU in eager
  mode a handful of large launches instead of hundreds of small ones (a GPU step of small chunks
  waits on Python).
- The soft-cap: SDPA cannot cap logits, so on a GPU it goes through FlexAttention, compiled once
  (uncompiled FlexAttention is a slow reference implementation); FlexAttention has no CPU backward,
  so CPU training takes the chunked exact kernel (capped_attention.py), which a compiled graph calls
  as it is.
- AdamW (training/optim.py, `optim.fused=auto`): the fused kernel on a GPU, foreach on a CPU.
- A stack of runs (model/stack.py): on a GPU one vmapped model over the member axis (one batched
  launch for K members); on a CPU a loop over the members' own models, whose ops are already large
  enough to keep the cores busy and which vmap slows down (batched matmul and the elementwise ops on
  batched tensors: 0.79x at `tiny`, benchmarks/stack_speed.py).

`force` overrides any choice (tests run every path on the CPU and compare them).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Protocol

import torch

_forced: dict[str, Any] = {}


@contextlib.contextmanager
def force(**choices) -> Iterator[None]:
    """Within the block, take the given paths whatever the device: norm_rope="fused" | "composite",
    lm_loss_chunk_rows=<int> | None (None: the composite loss), softcap="chunked" | "flex",
    stack="vmap" | "loop"."""
    unknown = set(choices) - {"norm_rope", "lm_loss_chunk_rows", "softcap", "stack"}
    if unknown:
        raise ValueError(f"unknown kernel choices: {sorted(unknown)}")
    allowed = {"norm_rope": ("fused", "composite"), "softcap": ("chunked", "flex"), "stack": ("vmap", "loop")}
    for key, value in choices.items():
        # a misspelt path would fall through each caller's `== "..."` test to the other path, silently
        if key in allowed and value not in allowed[key]:
            raise ValueError(f"kernel choice {key}={value!r}: one of {', '.join(allowed[key])}")
        rows = choices.get("lm_loss_chunk_rows")
        if key == "lm_loss_chunk_rows" and rows is not None and not (isinstance(rows, int) and rows > 0):
            raise ValueError(f"kernel choice lm_loss_chunk_rows={rows!r}: a positive number of rows, or None (composite)")
    saved = dict(_forced)
    _forced.update(choices)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def norm_rope_kernel(device: torch.device) -> str:
    """"fused": the hand-written QK-norm + RoPE autograd nodes (CPU, eager); "composite": torch ops."""
    if "norm_rope" in _forced:
        return _forced["norm_rope"]
    return "fused" if device.type == "cpu" and not compiling() else "composite"


def lm_loss_chunk_rows(device: torch.device, vocab: int, dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Rows per chunk of the fused head loss; None: the composite loss (one cross-entropy over all rows,
    which torch.compile fuses with the head matmul's epilogue, z-loss and soft-cap). `dtype`: the head's
    compute dtype (autocast's, where it is on)."""
    if "lm_loss_chunk_rows" in _forced:
        return _forced["lm_loss_chunk_rows"]
    if compiling():
        return None
    if dtype == torch.float16:
        # fp16 mixed precision scales the loss before its backward (GradScaler) so that small gradients survive
        # fp16; the fused loss computes its gradients in the forward, before that scale, and casts them to fp16:
        # entries of softmax / tokens (about 1e-7 at 16k tokens) underflow. The composite loss's backward sees it
        return None
    if device.type == "cpu":
        return max(32, (1 << 20) // vocab)  # ~4 MB of fp32 logits per chunk: stays in cache
    # a GPU: ~512 MB of fp32 logits per chunk, so a step of 16 x 1024 tokens at vocab 32768 is 4 chunks
    return max(1024, (1 << 27) // vocab)


def stack_kernel(device: torch.device, own_code: bool = False) -> str:
    """"vmap": a stack's members as one batched model; "loop": each member's own model in turn. A stack
    whose members need their own code (attention scalars that differ, QK-Clip's running max logit, both
    Python state of a member's modules that vmap, running member 0's modules for all, would not see)
    always loops."""
    if own_code:
        return "loop"
    if "stack" in _forced:
        return _forced["stack"]
    return "vmap" if device.type == "cuda" else "loop"


def softcap_kernel(device: torch.device, backend: str) -> str:
    """"flex": FlexAttention (compiled, block mask cached); "chunked": the exact chunked CPU kernel."""
    if "softcap" in _forced:
        return _forced["softcap"]
    # FlexAttention has no CPU backward (torch 2.13): CPU training always takes the chunked kernel
    flex_ok = device.type == "cuda" or not torch.is_grad_enabled()
    return "flex" if flex_ok and (backend == "flex" or backend == "auto" and device.type == "cuda") else "chunked"


# -- FlexAttention: compiled once, block masks cached -------------------------------------------------

_compiled_flex = None
_block_masks: dict[tuple, object] = {}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_block_mask(t_q: int, t_k: int, device: torch.device):
    """The causal BlockMask for t_q queries over t_k keys, built once per (t_q, t_k, device) in eager mode
    (building it is a pass over the full t_q x t_k mask); inside a compiled graph it is part of the graph."""
    from torch.nn.attention.flex_attention import create_block_mask

    if compiling():
        return create_block_mask(_causal, None, None, t_q, t_k, device=device)
    key = (t_q, t_k, str(device))
    if key not in _block_masks:
        _block_masks[key] = create_block_mask(_causal, None, None, t_q, t_k, device=device)
    return _block_masks[key]


@functools.lru_cache(maxsize=None)
def softcap_score_mod(cap: float):
    """c * tanh(score / c), one function object per cap: a compiled FlexAttention is specialized on its
    score_mod, and a new closure on every call would recompile it."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def flex_attention(q, k, v, **kwargs):
    """FlexAttention; on a GPU in eager mode compiled once per process (uncompiled it is a reference
    implementation that materializes the scores). Inside a compiled graph the compiler lowers the plain
    function itself; on a CPU (inference only, see softcap_kernel) it runs uncompiled."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if compiling() or q.device.type != "cuda":
        return flex(q, k, v, **kwargs)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, **kwargs)


class _WithLoss(Protocol):  # the Transformer, named by what is compiled of it (this module sits below it)
    def loss(self, *args: Any, **kwargs: Any) -> Any: ...


def compile_training_loss(model: _WithLoss):
    """`model.loss` compiled as one graph (forward, LM-head loss and, through AOTAutograd, the backward):
    what `model.compile=true` trains with. Shapes are static (training batches all have one shape);
    validation and the stability monitor call the uncompiled model, so their shapes and their
    explicit-attention probe never meet this graph."""
    return torch.compile(model.loss, dynamic=False)
