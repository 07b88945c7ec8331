"""Corpora, the tokenizer and token cache, and the batches a run trains and validates on.

The names below load on first use: the command line checks a run's corpus (qknorm.data.tokens.check_data:
its files, its text, its tokenizer and tokens) before torch loads, and importing the package must not pull
in torch and Lightning (seconds) for that.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Corpus": ".corpora", "DataError": ".corpora", "load_corpus": ".corpora", "strip_play_markup": ".corpora",
         "Tokenizer": ".tokens", "get_tokenized": ".tokens", "get_tokenizer": ".tokens", "check_data": ".tokens",
         "LMDataModule": ".datamodule", "PreparedData": ".datamodule", "prepare_data": ".datamodule"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
