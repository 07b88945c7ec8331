"""SentencePiece tokenizer and token-id arrays, cached on disk and shared by every run on the same data.

Cache layout (under data.cache_dir):
  tokenizers/<key>/spm.model, meta.json      key = corpus fingerprint + tokenizer settings
  tokens/<key>/train.bin, val.bin, meta.json  uint16 ids, memory-mapped by the data module
  tokens/<key>/bigram.json                     the corpus's bigram reference (bigram_reference), on demand

Every entry is built under a file lock, written to temporary files and renamed into place, and its
meta.json (written last) records sizes and SHA-256 checksums that are verified on every read; a
missing, truncated or corrupt entry is rebuilt with a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import DataConfig
from ..utils.files import atomic_write_bytes, atomic_write_json, file_lock
from .corpora import Corpus, DataError, load_corpus

if TYPE_CHECKING:
    import sentencepiece as spm

log = logging.getLogger(__name__)

TOKENIZER_VERSION = 1  # bump when the training recipe below changes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_is_valid(folder: Path, names: tuple[str, ...]) -> bool:
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        for name in names:
            f = folder / name
            if not f.exists() or f.stat().st_size != meta["files"][name]["bytes"] or _sha256(f) != meta["files"][name]["sha256"]:
                log.warning("cache entry %s: %s is missing, truncated or corrupt; rebuilding", folder, name)
                return False
    except (ValueError, KeyError, OSError):
        log.warning("cache entry %s: unreadable meta.json; rebuilding", folder)
        return False
    return True


def _seal_entry(folder: Path, names: tuple[str, ...], extra: dict) -> None:
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}
    atomic_write_json(folder / "meta.json", {"files": files, **extra})


def cache_root(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir={root}: cannot create ({e.strerror or e})") from None
    return root


@dataclass(frozen=True)
class Tokenizer:
    """A trained SentencePiece model plus the UTF-8 byte length of every piece (for bits per byte)."""

    path: Path
    # loaded from `path` in __post_init__; not an argument, and not part of the repr, equality or hash
    sp: spm.SentencePieceProcessor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        import sentencepiece as spm

        object.__setattr__(self, "sp", spm.SentencePieceProcessor(model_file=str(self.path)))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(map(int, ids)))

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id decodes to: byte pieces 1, control and unknown pieces 0."""
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            sizes[i] = 1 if self.sp.is_byte(i) else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return sizes


def _tokenizer_settings(cfg: DataConfig) -> dict:
    return {"version": TOKENIZER_VERSION, "vocab_size": cfg.vocab_size, "model_type": "bpe",
            "byte_fallback": True, "max_chars": cfg.tokenizer_max_chars}


def _training_lines(corpus: Corpus, max_chars: int):
    """Lines of the training split, evenly sampled across documents up to `max_chars`."""
    total = sum(len(d) for d in corpus.train)
    keep_every = max(1, int(np.ceil(total / max_chars)))
    for doc in corpus.train:
        for i, line in enumerate(doc.split("\n")):
            if line and i % keep_every == 0:
                yield line


def get_tokenizer(corpus: Corpus, cfg: DataConfig) -> Tokenizer:
    settings = _tokenizer_settings(cfg)
    key = hashlib.sha256(json.dumps([corpus.fingerprint, settings], sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_root(cfg) / "tokenizers" / key
    with file_lock(folder.parent / f"{key}.lock"):
        if not _entry_is_valid(folder, ("spm.model",)):
            _train_tokenizer(corpus, cfg, folder, settings)
    return Tokenizer(folder / "spm.model")


def _train_tokenizer(corpus: Corpus, cfg: DataConfig, folder: Path, settings: dict) -> None:
    import sentencepiece as spm

    log.info("training a %d-piece BPE tokenizer on %s", cfg.vocab_size, corpus.name)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(corpus, cfg.tokenizer_max_chars),
                model_prefix=str(Path(tmp) / "spm"), vocab_size=cfg.vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=0.9995, split_digits=True,
                # identity normalization and no dummy prefix: decode(encode(text)) == text, so
                # counting bytes per token gives exact bits per byte
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                user_defined_symbols=["\n"], bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e).splitlines()[-1] if str(e) else repr(e)
            msg = msg.rsplit("] ", 1)[-1]  # drop SentencePiece's source location and check expression
            raise DataError(f"{corpus.name}: cannot train a data.vocab_size={cfg.vocab_size} tokenizer on it ({msg}); "
                            "is the text too short for that vocabulary?") from None
        atomic_write_bytes(folder / "spm.model", (Path(tmp) / "spm.model").read_bytes())
    _seal_entry(folder, ("spm.model",), {"settings": settings, "corpus": corpus.name})


@dataclass(frozen=True)
class TokenizedCorpus:
    train_path: Path
    val_path: Path
    tokenizer: Tokenizer

    def train_tokens(self) -> np.ndarray:
        return np.memmap(self.train_path, dtype=np.uint16, mode="r")

    def val_tokens(self) -> np.ndarray:
        return np.memmap(self.val_path, dtype=np.uint16, mode="r")


def get_tokenized(corpus: Corpus, cfg: DataConfig, tokenizer: Tokenizer) -> TokenizedCorpus:
    tok_key = tokenizer.path.parent.name
    folder = cache_root(cfg) / "tokens" / f"{tok_key}-{corpus.fingerprint[:20]}"
    names = ("train.bin", "val.bin")
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if not _entry_is_valid(folder, names):
            folder.mkdir(parents=True, exist_ok=True)
            for name, docs in zip(names, (corpus.train, corpus.val), strict=True):
                ids = np.fromiter((i for d in docs for i in tokenizer.encode(d)), dtype=np.uint16)
                atomic_write_bytes(folder / name, ids.tobytes())
            _seal_entry(folder, names, {"corpus": corpus.name})
    out = TokenizedCorpus(folder / "train.bin", folder / "val.bin", tokenizer)
    need = cfg.seq_len + 1
    for split, arr in (("training", out.train_tokens()), ("validation", out.val_tokens())):
        if len(arr) < need:
            raise DataError(f"{corpus.name}: the {split} split has {len(arr)} tokens, fewer than one "
                            f"sequence (data.seq_len + 1 = {need})")
    return out


BIGRAM_VERSION = 1  # bump when the bigram model below changes


def bigram_reference(tokenized: TokenizedCorpus) -> dict:
    """The loss of a bigram model of the corpus: next-token probabilities counted on the training split,
    add-one smoothed, scored on the validation split (nats per token). This is the 'zero-layer' model a
    trained LM must beat (Wortsman et al. 2023, Fig. 10), so analyses call a run whose final validation
    loss is above it failed.

    Computed once per tokenized corpus and kept beside its token files as bigram.json. That file names
    the checksums of the token files it was counted on (from the entry's meta.json), so a rebuilt entry
    is counted again; it takes no part in any run's identity."""
    folder = tokenized.train_path.parent
    path = folder / "bigram.json"
    with file_lock(folder.parent / f"{folder.name}.lock"):
        meta = json.loads((folder / "meta.json").read_text())
        source = {n: meta["files"][n]["sha256"] for n in ("train.bin", "val.bin")}
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == BIGRAM_VERSION and cached.get("source") == source:
                return cached
        except (OSError, ValueError):
            pass
        train = tokenized.train_tokens().astype(np.int64)
        val = tokenized.val_tokens().astype(np.int64)
        vocab = tokenized.tokenizer.vocab_size
        # sparse counts (pair codes a * V + b), so that a large vocabulary needs no V x V table
        pairs, counts = np.unique(train[:-1] * vocab + train[1:], return_counts=True)
        row_totals = np.bincount(train[:-1], minlength=vocab)
        wanted = val[:-1] * vocab + val[1:]
        at = np.clip(np.searchsorted(pairs, wanted), 0, len(pairs) - 1)
        seen = np.where(pairs[at] == wanted, counts[at], 0)
        nats = float(-np.mean(np.log((seen + 1.0) / (row_totals[val[:-1]] + vocab))))
        result = {"version": BIGRAM_VERSION, "nats": nats, "train_tokens": int(len(train)),
                  "val_tokens": int(len(val)), "vocab_size": int(vocab), "smoothing": "add-one",
                  "source": source}
        atomic_write_json(path, result)
    return result


def clear_cache(cfg: DataConfig) -> None:
    shutil.rmtree(cache_root(cfg), ignore_errors=True)


def tokenize_corpus(cfg: DataConfig) -> tuple[Corpus, Tokenizer, TokenizedCorpus]:
    """The corpus read, its tokenizer and its token arrays, from the shared cache when it holds them."""
    corpus = load_corpus(cfg)
    tokenizer = get_tokenizer(corpus, cfg)
    return corpus, tokenizer, get_tokenized(corpus, cfg, tokenizer)


def check_data(cfg: DataConfig) -> None:
    """Every data error a run would meet, found without torch and before its run directory is made: the
    files exist, can be read and are not empty, the corpus is text that splits into a training and a
    validation part, its tokenizer trains, and each split holds a window of data.seq_len + 1 tokens. The
    tokenizer and the tokens go to the shared cache, where the run finds them. A Hugging Face dataset is
    read by the run itself (reading it twice could mean downloading it twice): only the local files named
    in data.data_files are checked here."""
    if cfg.source == "hf_text":
        for i, entry in enumerate(cfg.data_files or ()):
            if "://" in entry or any(c in entry for c in "*?["):
                continue  # a URL or a glob: the datasets library resolves it
            if not Path(entry).expanduser().exists():
                raise DataError(f"{entry}: no such file or folder (data.data_files[{i}])")
        return
    tokenize_corpus(cfg)
