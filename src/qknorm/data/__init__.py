"""Corpora, their tokenizer and token shards, and the batches a run trains on.

The names below load on first use: the preparation path (sources, shards, the tokenizer) imports
neither torch nor Lightning, so `qknorm-data`, the encoding workers and the command line's check of a
run's corpus before its run directory is made (`check_data`) start quickly; the data module
(`LMDataModule`, `prepare_data`'s batches) brings them in when a run asks for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .corpora import Corpus, DataError, load_corpus, open_source, strip_play_markup
    from .datamodule import LMDataModule, PreparedData, prepare_data
    from .tokens import Tokenizer, check_data, get_tokenized, get_tokenizer, prepare_tokens, verify_cache

_WHERE = {
    "Corpus": "corpora", "DataError": "corpora", "load_corpus": "corpora", "open_source": "corpora",
    "strip_play_markup": "corpora",
    "LMDataModule": "datamodule", "PreparedData": "datamodule", "prepare_data": "datamodule",
    "Tokenizer": "tokens", "get_tokenized": "tokens", "get_tokenizer": "tokens", "prepare_tokens": "tokens",
    "verify_cache": "tokens", "check_data": "tokens",
}

__all__ = ["Corpus", "DataError", "check_data", "LMDataModule", "PreparedData", "Tokenizer", "get_tokenized", "get_tokenizer",
           "load_corpus", "open_source", "prepare_data", "prepare_tokens", "strip_play_markup", "verify_cache"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
