"""SentencePiece tokenizer and token shards, cached on disk and shared by every run on the same data.

Cache layout (under data.cache_dir):
  surveys/<key>.json                    a source's first pass: characters, where the split falls
  tokenizers/<key>/spm.model, meta.json  key = the source's key + tokenizer settings
  tokens/<key>/                          the token shards of both splits (qknorm.data.shards), memory-mapped
  tokens/<key>/bigram.json               the corpus's bigram reference (bigram_reference), on demand

A source's key is cheap to compute: the embedded plays' content, the user's files' paths, sizes and
modification times, a dataset's arguments (and its local files' sizes and times). A run whose cache is
built reads no text. Every entry is built under a file lock, so two runs starting at once build it once.
The tokenizer's meta.json records its checksum, verified on every read (the file is small); the token
shards are checked by size at start-up and by checksum by `qknorm-data verify`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..config import DataConfig
from ..utils.files import atomic_write_bytes, atomic_write_json, file_lock
from . import shards as shards_mod
from .corpora import DataError, ShakespeareSource, Source, key_hash, open_source, sample_lines
from .progress import Progress
from .shards import ShardedTokens, sha256_file

if TYPE_CHECKING:
    import sentencepiece as spm

log = logging.getLogger(__name__)
# SentencePiece's longest sentence in bytes (max_sentence_length): a longer line of the tokenizer's sample is cut
# into pieces of a quarter of it in characters (4 bytes at most a character), so that none is skipped
MAX_SENTENCE_BYTES = 1 << 16

TOKENIZER_VERSION = 1  # bump when the training recipe below changes


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _entry_is_valid(folder: Path, names: tuple[str, ...]) -> bool:
    """A tokenizer entry (names: its files) whose meta.json vouches for every file's size and checksum;
    for a token entry (names: train.bin, val.bin), every shard of those splits checked the same way."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        if "splits" in meta:
            files = {s["file"]: s for n in names for s in meta["splits"][n.removesuffix(".bin")]["shards"]}
        else:
            files = {n: meta["files"][n] for n in names}
        for name, want in files.items():
            f = folder / name
            if not f.exists() or f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]:
                log.warning("cache entry %s: %s is missing, truncated or corrupt; rebuilding", folder, name)
                return False
    except (ValueError, KeyError, TypeError, OSError):
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


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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


# -- the survey -----------------------------------------------------------------------------------

def get_survey(source: Source, cfg: DataConfig) -> dict:
    """The source's first pass (characters, where the split falls), computed once and kept in the cache."""
    key = source.key()
    path = cache_root(cfg) / "surveys" / f"{key_hash(key)[:20]}.json"
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return kept["survey"]
    except (OSError, ValueError, AttributeError):
        pass
    if source.in_memory:
        survey = source.survey()
    else:
        progress = Progress(f"{source.name}: reading", total_bytes=source.size_bytes)
        survey = source.survey(progress)
        progress.close()
    atomic_write_json(path, {"key": key, "survey": survey})
    return survey


# -- the tokenizer --------------------------------------------------------------------------------

def _tokenizer_settings(cfg: DataConfig) -> dict:
    return {"version": TOKENIZER_VERSION, "vocab_size": cfg.vocab_size, "model_type": "bpe",
            "byte_fallback": True, "max_chars": cfg.tokenizer_max_chars}


def _source_identity(source: Source):
    # the embedded plays are named by their content's fingerprint, as they always were: the same key,
    # so the tokenizer every earlier run trained with is the one found. The tokenizer learns from the training
    # split alone: a validation cap (hf_text's val_max_tokens, which a run's length sets when it is null) changes
    # the validation tokens, not the tokenizer, so runs of other lengths share one
    if isinstance(source, ShakespeareSource):
        return source.corpus.fingerprint
    return {k: v for k, v in source.key().items() if k != "val_max_tokens"}


def tokenizer_folder(source: Source, cfg: DataConfig) -> Path:
    settings = _tokenizer_settings(cfg)
    key = hashlib.sha256(json.dumps([_source_identity(source), settings], sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cfg) / "tokenizers" / key


def get_tokenizer(source: Source, cfg: DataConfig) -> Tokenizer:
    folder = tokenizer_folder(source, cfg)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if not _entry_is_valid(folder, ("spm.model",)):
            _train_tokenizer(source, cfg, folder, _tokenizer_settings(cfg))
    return Tokenizer(folder / "spm.model")


def _train_tokenizer(source: Source, cfg: DataConfig, folder: Path, settings: dict) -> None:
    import sentencepiece as spm

    survey = get_survey(source, cfg)
    log.info("training a %d-piece BPE tokenizer on %s", cfg.vocab_size, source.name)
    folder.mkdir(parents=True, exist_ok=True)
    # The sample is taken first (at most tokenizer_max_chars characters), then handed over: read from
    # inside SentencePiece's iterator callbacks, the corpus's text was not given back to the system
    # (1.3 GB held after reading 1 GB), while the sample alone costs a few times its size.
    progress = Progress(f"{source.name}: sampling the tokenizer's text", total_chars=survey["train_chars"])
    sample: list[str] = []
    for line in sample_lines(source, survey, cfg.tokenizer_max_chars):
        nbytes = len(line.encode("utf-8"))
        # SentencePiece skips a sentence longer than max_sentence_length bytes without a word: such a line is
        # handed over in pieces that fit (a line within the limit, all of them on most corpora, goes whole)
        sample.extend([line] if nbytes <= MAX_SENTENCE_BYTES else
                      [line[i:i + MAX_SENTENCE_BYTES // 4] for i in range(0, len(line), MAX_SENTENCE_BYTES // 4)])
        progress.update(chars=len(line) + 1, nbytes=nbytes + 1)
    progress.close()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_prefix=str(Path(tmp) / "spm"), vocab_size=cfg.vocab_size, model_type="bpe",
                byte_fallback=True, character_coverage=0.9995, split_digits=True,
                # identity normalization and no dummy prefix: decode(encode(text)) == text, so
                # counting bytes per token gives exact bits per byte
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                user_defined_symbols=["\n"], bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
                max_sentence_length=MAX_SENTENCE_BYTES, num_threads=1, minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e).splitlines()[-1] if str(e) else repr(e)
            msg = msg.rsplit("] ", 1)[-1]  # drop SentencePiece's source location and check expression
            raise DataError(f"{source.name}: cannot train a data.vocab_size={cfg.vocab_size} tokenizer on it ({msg}); "
                            "is the text too short for that vocabulary?") from None
        del sample
        atomic_write_bytes(folder / "spm.model", (Path(tmp) / "spm.model").read_bytes())
    _seal_entry(folder, ("spm.model",), {"settings": settings, "corpus": source.name})


# -- the token shards -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedCorpus:
    folder: Path
    train: ShardedTokens
    val: ShardedTokens
    tokenizer: Tokenizer
    fingerprint: str = ""  # data_fingerprint: which tokens a run trains and validates on

    @property
    def train_path(self) -> Path:
        """The first training shard."""
        return self.train.paths[0] if self.train.paths else self.folder / shards_mod.shard_name("train", 0)

    @property
    def val_path(self) -> Path:
        return self.val.paths[0] if self.val.paths else self.folder / shards_mod.shard_name("val", 0)

    def train_tokens(self) -> ShardedTokens:
        return self.train

    def val_tokens(self) -> ShardedTokens:
        return self.val


def data_fingerprint(meta: dict, tokenizer: Tokenizer) -> str:
    """Which tokens a run reads: the tokenizer's vocabulary (pieces and scores) and the checksums the cache
    sealed for every shard of both splits. A run records it (summary.json), so a rerun on edited corpus files
    or a retrained tokenizer is told apart from the run it would skip or resume (qknorm.jobs.data_conflict).
    Content, not names: a file touched but not changed gets a new cache entry of the same tokens and keeps
    it (the model file's bytes would not: SentencePiece writes its training paths into it). A cache rebuilt
    with another data.shard_tokens cuts the same ids into other shards and reads as other data (the safe side)."""
    sp = tokenizer.sp
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    shards = {split: [s["sha256"] for s in meta["splits"][split]["shards"]] for split in shards_mod.SPLITS}
    return hashlib.sha256(json.dumps([vocab, shards], sort_keys=True).encode()).hexdigest()[:16]


def tokens_folder(source: Source, cfg: DataConfig, tokenizer_dir: Path) -> Path:
    # the shard size and the workers are left out: they change how the ids are stored and how fast, not
    # which ids (a run's batches are the same whatever the shard size; see RandomWindowBatches)
    key = key_hash({"format": shards_mod.FORMAT, "source": source.key()})[:20]
    return cache_root(cfg) / "tokens" / f"{tokenizer_dir.name}-{key}"


def get_tokenized(source: Source, cfg: DataConfig, tokenizer: Tokenizer) -> TokenizedCorpus:
    folder = tokens_folder(source, cfg, tokenizer.path.parent)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        meta = shards_mod.open_entry(folder)
        if meta is None:
            meta = _build_tokens(source, cfg, tokenizer, folder)
    out = TokenizedCorpus(folder, shards_mod.split_tokens(folder, meta, "train"), shards_mod.split_tokens(folder, meta, "val"),
                          tokenizer, data_fingerprint(meta, tokenizer))
    need = cfg.seq_len + 1
    for split, arr in (("training", out.train_tokens()), ("validation", out.val_tokens())):
        if len(arr) < need:
            raise DataError(f"{source.name}: the {split} split has {len(arr)} tokens, fewer than one "
                            f"sequence (data.seq_len + 1 = {need})")
    return out


def _build_tokens(source: Source, cfg: DataConfig, tokenizer: Tokenizer, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    survey = get_survey(source, cfg)
    plan = shards_mod.read_plan(folder, shards_mod.make_plan(tokenizer.vocab_size, cfg.shard_tokens))
    workers = cfg.workers or default_workers()
    log.info("tokenizing %s into %s (%d worker%s, shards of %s tokens, %s)", source.name, folder, workers,
             "s" if workers > 1 else "", f"{plan['shard_tokens']:,}", plan["dtype"])
    encoder = shards_mod.SentencePieceEncoder(tokenizer.path)
    records = {}
    for split in shards_mod.SPLITS:
        progress = Progress(f"{source.name}: encoding {split}", total_chars=survey.get(f"{split}_chars"))
        try:
            records[split] = shards_mod.build_split(
                folder, split, source.documents(split, survey), encoder, dtype=np.dtype(plan["dtype"]),
                shard_tokens=plan["shard_tokens"], batch_chars=plan["batch_chars"], workers=workers, progress=progress)
        finally:
            progress.close()
    return shards_mod.write_meta(folder, plan, records, {"corpus": source.name, "tokenizer": tokenizer.path.parent.name})


def data_key(cfg: DataConfig) -> str:
    """The name of the token cache entry this config reads (its tokenizer's key and its source's): what a run
    records beside its data_fingerprint. Computed from the config and the source's description (text_files:
    its files' sizes and times), without reading the text or building anything."""
    source = open_source(cfg)
    return tokens_folder(source, cfg, tokenizer_folder(source, cfg)).name


def cached_fingerprint(cfg: DataConfig) -> Optional[str]:
    """The config's data_fingerprint if its tokenizer and token shards are in the cache, else None; builds
    nothing (a run's skip or resume check must not tokenize a corpus to compare with)."""
    source = open_source(cfg)
    tok_dir = tokenizer_folder(source, cfg)
    if not (tok_dir / "meta.json").exists() or not (tok_dir / "spm.model").exists():
        return None
    meta = shards_mod.open_entry(tokens_folder(source, cfg, tok_dir))
    return None if meta is None else data_fingerprint(meta, Tokenizer(tok_dir / "spm.model"))


def prepare_tokens(cfg: DataConfig) -> TokenizedCorpus:
    """The corpus's tokenizer and token shards, from the cache or built into it (the path every run takes)."""
    source = open_source(cfg)
    return get_tokenized(source, cfg, get_tokenizer(source, cfg))


def verify_cache(cfg: DataConfig) -> tuple[bool, list[str]]:
    """Full checksums of the tokenizer and token shards this config uses, without building anything.
    A corrupt shard is unsealed, so the next run rebuilds from it. Returns (all sound, report lines)."""
    source = open_source(cfg)
    lines: list[str] = []
    tok_dir = tokenizer_folder(source, cfg)
    if not (tok_dir / "meta.json").exists():
        return False, [f"{source.name}: not prepared (no tokenizer in {tok_dir.parent}); qknorm-data prepare builds it"]
    ok = _entry_is_valid(tok_dir, ("spm.model",))
    if not ok:
        (tok_dir / "meta.json").unlink(missing_ok=True)
        lines.append(f"{tok_dir / 'spm.model'}: corrupt; unsealed, the next run trains it again")
    folder = tokens_folder(source, cfg, tok_dir)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        checked, problems = shards_mod.verify_entry(folder)
        complete = (folder / "meta.json").exists()
    lines += problems
    if checked == 0:
        return False, lines + [f"{source.name}: no token shards in {folder}; qknorm-data prepare builds them"]
    state = "complete" if complete else "incomplete (a run or qknorm-data prepare finishes it)"
    lines.append(f"{folder}: {checked} shards checked, {len(problems)} corrupt; the entry is {state}")
    return ok and not problems and complete, lines


# -- the bigram reference -------------------------------------------------------------------------

BIGRAM_VERSION = 2  # bump when the bigram model below changes (2: scored on a run's own validation targets)
BIGRAM_BLOCK = 1 << 24  # tokens counted at a time


def val_windows(n_tokens: int, seq_len: int, max_tokens: Optional[int]) -> int:
    """How many validation windows a run reads: non-overlapping windows of seq_len + 1 tokens from the split's
    start (each window's last token is the next one's first), within the cap. They hold the split's first
    val_windows * seq_len next-token targets, the ones the run's validation loss averages over."""
    n = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    return max(0, (n - 1) // seq_len)


def bigram_reference(tokenized: TokenizedCorpus, scored: Optional[int] = None) -> dict:
    """The loss of a bigram model of the corpus: next-token probabilities counted on the training split,
    add-one smoothed, scored on the validation split (nats per token). This is the 'zero-layer' model a
    trained LM must beat (Wortsman et al. 2023, Fig. 10), so analyses call a run whose final validation
    loss is above it failed.

    `scored`: score the split's first `scored` next-token targets, those a run's validation windows hold (its
    summary's val_tokens; val_windows): a cap on validation takes the start of the split, whose bigram loss is
    not the whole split's (on the default corpus, 4.805 nats for the first 8,192 tokens against 4.853), and
    a run is compared with the bigram model on the tokens it was scored on. None: every target of the split.

    Computed once per tokenized corpus and number of targets and kept beside its shards as bigram.json. That
    file names the checksums of the shards it was counted on (from their seals, in the entry's meta.json), so
    a rebuilt entry is counted again; it takes no part in any run's identity. Counted a block at a time, so
    the memory it needs grows with the distinct pairs, not with the corpus."""
    folder = tokenized.folder
    path = folder / "bigram.json"
    with file_lock(folder.parent / f"{folder.name}.lock"):
        meta = json.loads((folder / "meta.json").read_text())
        source = {s["file"]: s["sha256"] for split in ("train", "val") for s in meta["splits"][split]["shards"]}
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") != BIGRAM_VERSION or cached.get("source") != source:
                cached = None
        except (OSError, ValueError):
            cached = None
        train, val = tokenized.train_tokens(), tokenized.val_tokens()
        vocab = tokenized.tokenizer.vocab_size
        targets = max(0, len(val) - 1)
        n = targets if scored is None else max(0, min(int(scored), targets))
        scores = dict((cached or {}).get("scores", {}))
        if str(n) not in scores:
            scores[str(n)] = _bigram_nats(train, val, vocab, n)
            cached = {"version": BIGRAM_VERSION, "train_tokens": int(len(train)), "val_split_tokens": int(len(val)),
                      "vocab_size": int(vocab), "smoothing": "add-one", "source": source, "scores": scores}
            atomic_write_json(path, cached)
    return {"nats": scores[str(n)], "train_tokens": int(len(train)), "val_tokens": n, "vocab_size": int(vocab),
            "smoothing": "add-one"}


def _bigram_nats(train: ShardedTokens, val: ShardedTokens, vocab: int, n: int) -> float:
    """The add-one smoothed bigram model counted on `train`, its mean loss over the first n targets of `val`."""
    # sparse counts (pair codes a * V + b), so that a large vocabulary needs no V x V table
    pairs = np.empty(0, np.int64)
    counts = np.empty(0, np.int64)
    row_totals = np.zeros(vocab, dtype=np.int64)
    for _, block in train.blocks(BIGRAM_BLOCK, overlap=1):
        b = block.astype(np.int64)
        p, c = np.unique(b[:-1] * vocab + b[1:], return_counts=True)
        pairs, inverse = np.unique(np.concatenate([pairs, p]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, c]), minlength=len(pairs)).astype(np.int64)
        row_totals += np.bincount(b[:-1], minlength=vocab)
    total, left = 0.0, n
    for _, block in val.blocks(BIGRAM_BLOCK, overlap=1):
        if left <= 0:
            break
        b = block.astype(np.int64)[:left + 1]
        wanted = b[:-1] * vocab + b[1:]
        at = np.clip(np.searchsorted(pairs, wanted), 0, max(0, len(pairs) - 1))
        seen = np.where(pairs[at] == wanted, counts[at], 0) if len(pairs) else np.zeros(len(wanted), np.int64)
        total += float(np.sum(np.log((seen + 1.0) / (row_totals[b[:-1]] + vocab))))
        left -= len(wanted)
    return -total / n if n else math.nan


def clear_cache(cfg: DataConfig) -> None:
    shutil.rmtree(cache_root(cfg), ignore_errors=True)


def check_data(cfg: DataConfig) -> None:
    """Every data error a run would meet, found without torch and before its run directory is made: the
    files exist, can be read and are not empty, the corpus is text that splits into a training and a
    validation part, its tokenizer trains, and each split holds a window of data.seq_len + 1 tokens. The
    tokenizer and the token shards go to the shared cache, where the run finds them. A Hugging Face dataset
    is read by the run itself (reading it twice could mean downloading it twice): only the local files named
    in data.data_files are checked here."""
    if cfg.source == "hf_text":
        for i, entry in enumerate(cfg.data_files or ()):
            if "://" in entry or any(c in entry for c in "*?["):
                continue  # a URL or a glob: the datasets library resolves it
            if not Path(entry).expanduser().exists():
                raise DataError(f"{entry}: no such file or folder (data.data_files[{i}])")
        return
    prepare_tokens(cfg)
