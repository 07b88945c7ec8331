"""The precision a run trains in, `trainer.precision=auto` resolved for the device: one rule for a solo
run (train.py) and a stack (stacking.py)."""

from __future__ import annotations

from typing import Any

import torch


def resolve_precision(precision: str, accelerator: str) -> Any:  # Lightning's precision literal
    """fp32 on a CPU; bf16 autocast on a GPU that has it, else fp16 autocast (with Lightning's scaler)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
