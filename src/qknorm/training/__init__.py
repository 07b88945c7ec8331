from .module import LMModule, Outcome
from .optim import build_optimizer, lr_factor

__all__ = ["LMModule", "Outcome", "build_optimizer", "lr_factor"]
