"""Token shards: a split's ids in files of about data.shard_tokens tokens, each sealed when written, and
read back as one memory-mapped sequence.

An entry of the token cache (tokens/<key>/) holds, for each split (train, val):

  <split>-00000.bin   ids, uint16 when the vocabulary fits (ids < 65536), else uint32
  <split>-00000.json  the shard's seal, written once the .bin is complete and renamed into place: its
                      tokens, bytes, SHA-256 and dtype, and the span of the split's text pieces it holds
  <split>.json        the split is complete: its shards in order
  plan.json           how the entry is cut (shard size, batch size): a resumed build keeps it
  meta.json           the entry is complete (written last): every shard's size and checksum

Text reaches the encoder in batches (consecutive pieces of about `batch_chars` characters, formed the
same way on every pass) and a shard closes after the batch that brings it to shard_tokens, so a build
that was killed resumes after its last sealed shard, cuts the next ones at the same places, and
writes byte-identical files. Encoding runs in `workers` processes (each loads the tokenizer once),
batches in flight bounded, results taken in order.

Opening a complete entry reads meta.json and compares each shard's size with it; `verify_entry`
recomputes every checksum, and drops the seal of a corrupt shard so the next build rebuilds from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..utils.files import atomic_write_json
from . import corpora
from .corpora import DataError, Document
from .progress import Progress

log = logging.getLogger("qknorm.data")

FORMAT = 1  # bump when the layout or the cutting rule below changes
SPLITS = ("train", "val")
MAX_BATCH_PIECES = 4096  # a batch of many tiny documents closes here whatever its size
MAX_BATCH_CHARS = 1 << 20
MIN_BATCH_CHARS = 1 << 12


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 while every id (0 .. vocab_size - 1) fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def batch_chars_for(shard_tokens: int) -> int:
    """Characters per batch: 1 MiB, or less for small shards (about 4 characters a token, so a shard is
    still cut every few batches)."""
    return min(MAX_BATCH_CHARS, max(MIN_BATCH_CHARS, shard_tokens))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def seal_path(folder: Path, split: str, index: int) -> Path:
    return folder / f"{split}-{index:05d}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- reading --------------------------------------------------------------------------------------

class ShardedTokens:
    """A split's shards as one read-only sequence of ids: len(), integer and slice indexing (a slice
    that spans shards is copied together), index arrays of any shape (windows across a shard's end are
    read from both), np.asarray(). Each shard is memory-mapped on first use."""

    def __init__(self, paths: Sequence[Path], lengths: Sequence[int], dtype: Any):
        if len(paths) != len(lengths):
            raise ValueError("one length per shard")
        self.paths = [Path(p) for p in paths]
        self.lengths = [int(n) for n in lengths]
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
        self._maps: list[Optional[np.ndarray]] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def shard(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            m = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.lengths[i],)) if self.lengths[i] else \
                np.empty(0, self.dtype)
            self._maps[i] = m
        return m

    def __getstate__(self):
        return {**self.__dict__, "_maps": [None] * len(self.paths)}

    def _range(self, a: int, b: int) -> np.ndarray:
        if a >= b:
            return np.empty(0, self.dtype)
        i = int(np.searchsorted(self.starts, a, side="right")) - 1
        j = int(np.searchsorted(self.starts, b - 1, side="right")) - 1
        if i == j:
            return self.shard(i)[a - self.starts[i]:b - self.starts[i]]
        parts = [self.shard(k)[max(a, self.starts[k]) - self.starts[k]:min(b, self.starts[k + 1]) - self.starts[k]]
                 for k in range(i, j + 1)]
        return np.concatenate(parts)

    def __getitem__(self, key):
        if len(self.paths) == 1:
            return self.shard(0)[key]
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self[np.arange(start, stop, step)]
        if isinstance(key, (int, np.integer)):
            k = int(key) + (n if key < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {int(key)} is out of bounds for {n} tokens")
            i = int(np.searchsorted(self.starts, k, side="right")) - 1
            return self.shard(i)[k - self.starts[i]]
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens takes an int, a slice or an integer array, not {type(key).__name__}")
        flat = index.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"an index is out of bounds for {n} tokens")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, self.dtype)
        for i in np.unique(which):
            mask = which == i
            out[mask] = self.shard(int(i))[flat[mask] - self.starts[i]]
        return out.reshape(index.shape)

    def __array__(self, dtype=None, copy=None):
        whole = np.asarray(self._range(0, len(self)))
        return whole if dtype is None else whole.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def blocks(self, size: int, overlap: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(start, tokens[start:start + size + overlap]) for start = 0, size, 2 size, ...: the whole split a
        block at a time (overlap: tokens each block shares with the next, e.g. 1 for bigrams)."""
        for start in range(0, len(self), size):
            yield start, np.asarray(self._range(start, min(len(self), start + size + overlap)))


def open_entry(folder: Path) -> Optional[dict]:
    """The entry's meta.json if the entry is complete and every shard has its sealed size; else None.
    A shard of the wrong size loses its seal (a rebuild starts from it), with a message."""
    meta = _read_json(folder / "meta.json")
    if meta is None or meta.get("format") != FORMAT:
        return None
    try:
        for split in SPLITS:
            for i, shard in enumerate(meta["splits"][split]["shards"]):
                path = folder / shard["file"]
                size = path.stat().st_size if path.exists() else -1
                if size != shard["bytes"]:
                    log.warning("token cache %s: %s is %s; rebuilding from it", folder, shard["file"],
                                "missing" if size < 0 else f"{size} bytes, sealed at {shard['bytes']} (truncated or overwritten)")
                    _unseal(folder, split, i)
                    return None
    except (KeyError, TypeError):
        log.warning("token cache %s: unreadable meta.json; rebuilding", folder)
        (folder / "meta.json").unlink(missing_ok=True)
        return None
    return meta


def split_tokens(folder: Path, meta: dict, split: str) -> ShardedTokens:
    shards = meta["splits"][split]["shards"]
    return ShardedTokens([folder / s["file"] for s in shards], [s["tokens"] for s in shards], meta["dtype"])


def _unseal(folder: Path, split: str, index: int) -> None:
    """Forget shard `index` of `split` and everything that vouches for it, so the next build rebuilds
    the split from there."""
    seal_path(folder, split, index).unlink(missing_ok=True)
    (folder / f"{split}.json").unlink(missing_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)


def verify_entry(folder: Path) -> tuple[int, list[str]]:
    """Recompute every sealed shard's checksum. A missing, truncated or corrupt shard is reported and
    unsealed (the next run rebuilds from it). Returns (shards checked, problems)."""
    checked = 0
    problems: list[str] = []
    for split in SPLITS:
        i = 0
        while (seal := _read_json(seal_path(folder, split, i))) is not None:
            path = folder / seal.get("file", shard_name(split, i))
            checked += 1
            if not path.exists():
                why = "missing"
            elif path.stat().st_size != seal.get("bytes"):
                why = f"{path.stat().st_size} bytes, sealed at {seal.get('bytes')}"
            elif sha256_file(path) != seal.get("sha256"):
                why = "checksum differs from its seal (corrupt)"
            else:
                i += 1
                continue
            problems.append(f"{path}: {why}; unsealed, the next run rebuilds the {split} split from it")
            _unseal(folder, split, i)
            i += 1
    return checked, problems


# -- writing --------------------------------------------------------------------------------------

@dataclass
class Batch:
    pieces: list[str]
    docs: int  # documents that end in this batch
    chars: int
    nbytes: int

    def counts(self) -> tuple[int, int, int, int]:
        return len(self.pieces), self.docs, self.chars, self.nbytes


def pieces_of(documents: Iterable[Document]) -> Iterator[tuple[str, bool]]:
    for doc in documents:
        yield from doc


def batches(pieces: Iterator[tuple[str, bool]], batch_chars: int) -> Iterator[Batch]:
    """Consecutive pieces, closed once they hold `batch_chars` characters (or MAX_BATCH_PIECES pieces)."""
    batch = Batch([], 0, 0, 0)
    for text, ends_doc in pieces:
        batch.pieces.append(text)
        batch.docs += ends_doc
        batch.chars += len(text)
        batch.nbytes += len(text.encode("utf-8"))
        if batch.chars >= batch_chars or len(batch.pieces) >= MAX_BATCH_PIECES:
            yield batch
            batch = Batch([], 0, 0, 0)
    if batch.pieces:
        yield batch


# SentencePiece encodes a long string several times slower per byte than the same text a few lines at a
# time (about 1.7 MB/s for 1 MB at once, 6 on this text cut every 2 KB, on one core); cut at "\n", which
# no piece crosses (a user-defined symbol), the ids are the same.
LINES_CHARS = 2048


def line_runs(text: str, size: int = LINES_CHARS) -> list[str]:
    """`text` cut after the first newline at or past every `size` characters."""
    if len(text) <= size:
        return [text]
    out = []
    i = 0
    while i < len(text):
        j = text.find("\n", i + size - 1)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j + 1])
        i = j + 1
    return out


class SentencePieceEncoder:
    """Pieces -> ids with a SentencePiece model, loaded once per process (picklable: by path)."""

    def __init__(self, model_path: Path):
        self.model_path = str(model_path)
        self._sp: Any = None

    def __getstate__(self):
        return {"model_path": self.model_path, "_sp": None}

    def __call__(self, pieces: list[str]) -> np.ndarray:
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        arrays = self._sp.encode([run for piece in pieces for run in line_runs(piece)], return_type="numpy", num_threads=1)
        return np.concatenate(arrays) if arrays else np.empty(0, np.int32)


Encoder = Callable[[list[str]], np.ndarray]


def encode_checked(encoder: Encoder, pieces: list[str], dtype: np.dtype) -> np.ndarray:
    ids = np.asarray(encoder(pieces))
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(dtype).max):
        raise DataError(f"token id {int(ids.max())} does not fit the token cache's {dtype.name}")
    return ids.astype(dtype, copy=False)


_worker: dict[str, Any] = {}


def _init_worker(encoder: Encoder, dtype: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    _worker.update(encoder=encoder, dtype=np.dtype(dtype))


def _encode_in_worker(batch: Batch) -> tuple[tuple[int, int, int, int], np.ndarray]:
    return batch.counts(), encode_checked(_worker["encoder"], batch.pieces, _worker["dtype"])


def _context():
    # fork: the workers start at once and import nothing (the parent has the encoder's modules loaded);
    # they only ever run the tokenizer. Elsewhere (macOS, Windows) the platform's default.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def encoded(batches_in: Iterator[Batch], encoder: Encoder, dtype: np.dtype, workers: int
            ) -> Generator[tuple[tuple[int, int, int, int], np.ndarray], None, None]:
    """(counts, ids) of each batch, in order: here (workers=1) or in a pool of `workers` processes with
    at most 2 * workers + 2 batches read ahead."""
    if workers <= 1:
        for batch in batches_in:
            yield batch.counts(), encode_checked(encoder, batch.pieces, dtype)
        return
    ahead = 2 * workers + 2
    room = threading.Semaphore(ahead)
    stop = threading.Event()

    def feed():  # runs in the pool's task thread: reading waits while `ahead` batches are in flight
        for batch in batches_in:
            room.acquire()
            if stop.is_set():
                return
            yield batch

    pool = _context().Pool(workers, initializer=_init_worker, initargs=(encoder, dtype.name))
    try:
        for result in pool.imap(_encode_in_worker, feed()):
            room.release()
            yield result
    finally:
        stop.set()
        room.release(ahead + 1)  # a task thread waiting for room wakes, sees stop and ends
        pool.terminate()
        pool.join()


class ShardWriter:
    """One shard being written: to a temporary file, hashed as it grows, renamed and sealed at the end."""

    def __init__(self, folder: Path, split: str, index: int, dtype: np.dtype, pieces_start: int, docs_start: int):
        self.folder, self.split, self.index, self.dtype = folder, split, index, dtype
        self.path = folder / shard_name(split, index)
        self.tmp = folder / f".{self.path.name}.tmp"
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.tokens = 0
        self.pieces_start = self.pieces_end = pieces_start
        self.docs_end = docs_start

    def add(self, ids: np.ndarray, counts: tuple[int, int, int, int]) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(ids)
        self.pieces_end += counts[0]
        self.docs_end += counts[1]

    def seal(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        seal = {"format": FORMAT, "file": self.path.name, "split": self.split, "index": self.index,
                "tokens": self.tokens, "bytes": self.tokens * self.dtype.itemsize, "sha256": self.hash.hexdigest(),
                "dtype": self.dtype.name, "pieces_start": self.pieces_start, "pieces_end": self.pieces_end,
                "docs_end": self.docs_end}
        atomic_write_json(seal_path(self.folder, self.split, self.index), seal)
        return seal

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def sealed_prefix(folder: Path, split: str, dtype: np.dtype) -> list[dict]:
    """The split's sealed shards from the first, up to the first one missing, unsealed or not of its
    sealed size (a build resumes after them)."""
    seals: list[dict] = []
    while (seal := _read_json(seal_path(folder, split, len(seals)))) is not None:
        path = folder / shard_name(split, len(seals))
        expected_start = seals[-1]["pieces_end"] if seals else 0
        size = path.stat().st_size if path.exists() else -1
        if (seal.get("format") != FORMAT or seal.get("dtype") != dtype.name or seal.get("pieces_start") != expected_start
                or size != seal.get("bytes")):
            log.warning("token cache %s: %s is %s; rebuilding the %s split from it", folder, path.name,
                        "missing" if size < 0 else "not as sealed", split)
            break
        seals.append(seal)
    return seals


def _clear_from(folder: Path, split: str, index: int) -> None:
    """Remove the split's shards and seals from `index` on, and temporary files left by a killed build."""
    for path in folder.glob(f"{split}-*"):
        stem = path.name.split(".")[0]
        try:
            i = int(stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if i >= index:
            path.unlink(missing_ok=True)
    for path in folder.glob(f".{split}-*.tmp"):
        path.unlink(missing_ok=True)


def build_split(folder: Path, split: str, documents: Iterator[Document], encoder: Encoder, *, dtype: np.dtype,
                shard_tokens: int, batch_chars: int, workers: int, progress: Progress) -> dict:
    """Write (or finish) the shards of one split; returns its <split>.json record."""
    record_path = folder / f"{split}.json"
    seals = sealed_prefix(folder, split, dtype)
    record = _read_json(record_path)
    if record is not None and [s["sha256"] for s in record.get("shards", [])] == [s["sha256"] for s in seals]:
        return record
    record_path.unlink(missing_ok=True)
    _clear_from(folder, split, len(seals))
    skip = seals[-1]["pieces_end"] if seals else 0
    if seals:
        log.info("token cache %s: %d %s shards already sealed (%s tokens); resuming after them", folder, len(seals), split,
                 f"{sum(s['tokens'] for s in seals):,}")
        progress.update(tokens=sum(s["tokens"] for s in seals))
    pieces = pieces_of(documents)
    for _ in range(skip):  # read again, not encoded again
        try:
            text, ends_doc = next(pieces)
        except StopIteration:
            raise DataError(f"token cache {folder}: the {split} split is shorter than its sealed shards say; "
                            "was the corpus changed while it was being prepared? Remove the folder to start again") from None
        progress.update(docs=int(ends_doc), chars=len(text), nbytes=len(text.encode("utf-8")))
    writer: Optional[ShardWriter] = None
    try:
        with contextlib.closing(encoded(batches(pieces, batch_chars), encoder, dtype, workers)) as results:
            for counts, ids in results:
                if writer is None:
                    last = seals[-1] if seals else {"pieces_end": 0, "docs_end": 0}
                    writer = ShardWriter(folder, split, len(seals), dtype, last["pieces_end"], last["docs_end"])
                writer.add(ids, counts)
                progress.update(docs=counts[1], tokens=len(ids), chars=counts[2], nbytes=counts[3])
                if writer.tokens >= shard_tokens:
                    seals.append(writer.seal())
                    writer = None
        if writer is not None:
            if writer.tokens:
                seals.append(writer.seal())
            else:
                writer.abort()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    record = {"format": FORMAT, "split": split, "tokens": sum(s["tokens"] for s in seals),
              "shards": [{k: s[k] for k in ("file", "tokens", "bytes", "sha256")} for s in seals]}
    atomic_write_json(record_path, record)
    return record


def read_plan(folder: Path, wanted: dict) -> dict:
    """How the entry is cut: the plan it was started with (a resumed build must cut where the first
    attempt did), else `wanted`, recorded."""
    plan = _read_json(folder / "plan.json")
    if plan is not None and all(plan.get(k) == wanted[k] for k in ("format", "dtype", "chunk_bytes")):
        if plan != wanted:
            log.info("token cache %s: started with shards of %s tokens; keeping them", folder, f"{plan['shard_tokens']:,}")
        return plan
    for split in SPLITS:  # a new plan: nothing cut by another one may stay
        _clear_from(folder, split, 0)
        (folder / f"{split}.json").unlink(missing_ok=True)
    atomic_write_json(folder / "plan.json", wanted)
    return wanted


def make_plan(vocab_size: int, shard_tokens: int) -> dict:
    return {"format": FORMAT, "dtype": dtype_for(vocab_size).name, "shard_tokens": shard_tokens,
            "batch_chars": batch_chars_for(shard_tokens), "chunk_bytes": corpora.CHUNK_BYTES}


def write_meta(folder: Path, plan: dict, records: dict[str, dict], extra: dict) -> dict:
    meta = {"format": FORMAT, "dtype": plan["dtype"], "plan": plan,
            "splits": {split: {"tokens": r["tokens"], "shards": r["shards"]} for split, r in records.items()}, **extra}
    atomic_write_json(folder / "meta.json", meta)
    return meta
