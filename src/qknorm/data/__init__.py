from .corpora import Corpus, DataError, load_corpus, strip_play_markup
from .datamodule import LMDataModule, PreparedData, prepare_data
from .tokens import Tokenizer, get_tokenized, get_tokenizer

__all__ = ["Corpus", "DataError", "LMDataModule", "PreparedData", "Tokenizer", "get_tokenized", "get_tokenizer",
           "load_corpus", "prepare_data", "strip_play_markup"]
