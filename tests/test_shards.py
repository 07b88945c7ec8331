"""Corpora beyond memory: streamed sources, the token shards, resuming a killed build, uint32 ids,
`qknorm-data prepare|verify`, and that the embedded default gives the ids and batches it always gave."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qknorm.config import ConfigError, DataConfig
from qknorm.data import corpora, load_corpus, prepare_data, shards
from qknorm.data.corpora import open_source, sample_lines
from qknorm.data.datamodule import RandomWindowBatches, ValWindows
from qknorm.data.progress import Progress
from qknorm.data_cli import main as data_main

from .conftest import compose_config

# -- the embedded default, as the code before the shards gave it ------------------------------------

# data=shakespeare with its defaults (vocabulary 2048, hamlet held out), computed by the code that held
# the corpus in memory (one uint16 file per split): sha256 of the ids' bytes, of the tokenizer's pieces
# (json [[piece, score], ...] by id), and of the inputs (int64) of the batches of steps 0-2 at seq_len
# 256, batch 32, seed 0
SHAKESPEARE = {
    "pieces_sha256": "274c78ec1a4ea10b83882dce3e3891427ad3ee785a22b92eb54f664ca1f1feee",
    "train_tokens": 1784647, "train_sha256": "496d9732b344ab0f95f3525b6aa1e1fd7914820fdccdaf7e143b6356775bfe2d",
    "train_first": [2038, 501, 566, 2025, 396, 1637, 2001, 430, 2007, 2035, 2035, 518, 2037, 2014, 2011, 2001],
    "val_tokens": 67707, "val_sha256": "7b85e7b740ca4268d5825dfb2eee23a697fe7d843bbc1b96e8f0a74b7a2d51ec",
    "val_first": [2038, 2031, 2021, 372, 2023, 802, 1502, 442, 345, 290, 494, 2012, 1915, 291, 354, 445],
    "batches": ["9b9b6531b3d69b42250b410a529f9e4c5ac30704b075b647fa4e499fd28c35b6",
                "de23c5ff29654deeee98e4c1841faff9a98acc9ac9cd1ecd93b4846768d72835",
                "b13d156e7a81ecff130b9888be26ab5c1d20e29bcff552fdd622137d0c771462"],
    "batch0_row0_first": [303, 1991, 716, 1998, 452, 2024, 492, 325, 392, 737, 1, 1994, 259, 1997, 337, 527],
}


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_the_embedded_default_gives_the_same_tokenizer_ids_and_batches_as_before(cache_dir):
    data = prepare_data(DataConfig(cache_dir=str(cache_dir)))
    sp = data.tokenized.tokenizer.sp
    pieces = [[sp.id_to_piece(i), sp.get_score(i)] for i in range(sp.get_piece_size())]
    assert hashlib.sha256(json.dumps(pieces).encode()).hexdigest() == SHAKESPEARE["pieces_sha256"]
    train, val = data.tokenized.train_tokens(), data.tokenized.val_tokens()
    assert train.dtype == np.uint16 and len(train.paths) == 1 and len(val.paths) == 1
    assert len(train) == SHAKESPEARE["train_tokens"] and len(val) == SHAKESPEARE["val_tokens"]
    assert train[:16].tolist() == SHAKESPEARE["train_first"] and val[:16].tolist() == SHAKESPEARE["val_first"]
    assert _sha(np.asarray(train)) == SHAKESPEARE["train_sha256"] and _sha(np.asarray(val)) == SHAKESPEARE["val_sha256"]
    batches = RandomWindowBatches(train, 256, 32, seed=0)
    assert batches[0][0][0, :16].tolist() == SHAKESPEARE["batch0_row0_first"]
    assert [_sha(batches[s][0].numpy()) for s in range(3)] == SHAKESPEARE["batches"]


# -- a small corpus of the user's files ------------------------------------------------------------

WORDS = ["query", "key", "value", "norm", "softmax", "logit", "head", "layer", "scale", "gain", "the", "a", "of",
         "attention", "caf\u00e9", "\u2603", "12", "405"]


def write_corpus(folder: Path, files: int = 12, lines: int = 150, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for d in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 14))) for _ in range(lines)) + "\n"
        (folder / f"doc{d:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "files")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The corpus prepared in one shard, in this process: the ids every other way of cutting it must give."""
    cache = tmp_path_factory.mktemp("reference-cache")
    cfg = files_config(corpus, cache, shard_tokens=10**9, workers=1)
    return cfg, prepare_data(cfg)


def files_config(corpus: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(source="text_files", paths=(str(corpus),), cache_dir=str(cache), vocab_size=300, seq_len=32, **kw)


def with_tokenizer_of(reference_cfg: DataConfig, cache: Path) -> None:
    """Give a new cache the reference's tokenizer (the same key), so a test pays for encoding only."""
    shutil.copytree(Path(reference_cfg.cache_dir) / "tokenizers", cache / "tokenizers", dirs_exist_ok=True)


def entry(cache: Path) -> Path:
    (folder,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    return folder


def shard_files(data) -> dict[str, bytes]:
    folder = data.tokenized.folder
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_shards_and_workers_change_how_ids_are_stored_never_the_ids_or_the_batches(corpus, reference, tmp_path):
    ref_cfg, ref = reference
    assert len(ref.tokenized.train.paths) == 1
    cache = tmp_path / "cache"
    with_tokenizer_of(ref_cfg, cache)
    one = prepare_data(files_config(corpus, cache, shard_tokens=3000, workers=1))
    train, ref_train = one.tokenized.train_tokens(), ref.tokenized.train_tokens()
    assert len(train.paths) >= 5  # the same entry key: the shard size is not part of it
    assert np.array_equal(np.asarray(train), np.asarray(ref_train))
    assert np.array_equal(np.asarray(one.tokenized.val_tokens()), np.asarray(ref.tokenized.val_tokens()))
    # a batch draws over the whole split: the same windows, some across a shard's end
    crossing = 0
    for step in range(20):
        a, b = RandomWindowBatches(train, 32, 16, seed=1)[step], RandomWindowBatches(ref_train, 32, 16, seed=1)[step]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        starts = np.random.default_rng([1, step]).integers(0, len(train) - 33, size=16, endpoint=True)
        crossing += int(np.sum(np.searchsorted(train.starts, starts, "right") != np.searchsorted(train.starts, starts + 32, "right")))
    assert crossing > 0
    val = one.tokenized.val_tokens()
    assert all(torch.equal(x, y) for x, y in zip(ValWindows(val, 32, None)[3], ValWindows(ref.tokenized.val_tokens(), 32, None)[3],
                                                 strict=True))
    assert train[len(train) - 5:].tolist() == np.asarray(ref_train)[-5:].tolist() and train[-1] == ref_train[-1]
    # two workers write the very same files as one
    shutil.rmtree(one.tokenized.folder)
    two = prepare_data(files_config(corpus, cache, shard_tokens=3000, workers=2))
    assert two.tokenized.folder == one.tokenized.folder
    first = shard_files(two)
    shutil.rmtree(two.tokenized.folder)
    assert shard_files(prepare_data(files_config(corpus, cache, shard_tokens=3000, workers=1))) == first


def test_the_split_and_the_ids_are_those_of_the_corpus_held_in_memory(corpus, reference):
    """Today's rule, kept in this test as it was: the streamed split holds out the same documents, the
    tokenizer samples the same lines, and the ids are encode(document) concatenated."""
    cfg, data = reference
    docs = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    train, val = old_split(docs, cfg.val_fraction)
    got = load_corpus(cfg)
    assert (got.train, got.val) == (train, val)
    source = open_source(cfg)
    survey = source.survey()
    assert list(sample_lines(source, survey, cfg.tokenizer_max_chars)) == [
        line for doc in train for i, line in enumerate(doc.split("\n")) if line]
    tok = data.tokenized.tokenizer
    assert np.array_equal(np.asarray(data.tokenized.train_tokens()), [i for d in train for i in tok.encode(d)])
    assert np.array_equal(np.asarray(data.tokenized.val_tokens()), [i for d in val for i in tok.encode(d)])


def old_split(docs: list[str], val_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """qknorm.data.corpora._split_documents as it was when the corpus was held in memory."""
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut + 1 if cut > 0 else int(len(text) * (1 - val_fraction))
        if cut <= 0 or cut >= len(text):
            raise corpora.DataError("too little text to hold out a validation split")
        return (text[:cut],), (text[cut:],)
    scores = [zlib.crc32(d.encode("utf-8")) / 2**32 for d in docs]
    val_idx = {i for i, s in enumerate(scores) if s < val_fraction}
    if not val_idx:
        val_idx = {min(range(len(docs)), key=lambda i: scores[i])}
    if len(val_idx) == len(docs):
        val_idx.discard(max(val_idx, key=lambda i: scores[i]))
    return (tuple(d for i, d in enumerate(docs) if i not in val_idx), tuple(d for i, d in enumerate(docs) if i in val_idx))


@pytest.mark.parametrize("case", ["lines", "first line only", "no newline", "cut in a short piece"])
def test_a_single_file_read_in_pieces_is_split_where_the_whole_file_was(tmp_path, monkeypatch, case):
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 37)  # many pieces, each cut back to a line boundary
    rng = np.random.default_rng(3)
    text = {"lines": "\n".join(" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(300)) + "\n",
            "first line only": "\n" + "x" * 500 + "\nend",  # the only newline before the target is at 0
            "no newline": "caf\u00e9 " * 200,
            "cut in a short piece": "a\n" * 20 + "b" * 300 + "\n" + "c\n" * 3}[case]
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    for val_fraction in (0.05, 0.3, 0.9):
        cfg = DataConfig(source="text_files", paths=(str(tmp_path / "one.txt"),), val_fraction=val_fraction)
        got = load_corpus(cfg)
        assert (got.train, got.val) == old_split([text], val_fraction), (case, val_fraction)


@pytest.mark.parametrize("val_fraction", [0.01, 0.5, 0.99])
def test_the_exceptions_to_the_split_rule_are_kept(tmp_path, val_fraction):
    """None held out: the lowest hash is; all held out: the highest stays (a small folder shows both)."""
    folder = write_corpus(tmp_path / "c", files=4, lines=5, seed=7)
    (folder / "dup.txt").write_text((folder / "doc00.txt").read_text())  # equal hashes: the first one wins
    docs = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]
    got = load_corpus(DataConfig(source="text_files", paths=(str(folder),), val_fraction=val_fraction))
    assert (got.train, got.val) == old_split(docs, val_fraction)


def test_a_started_run_reads_no_text_and_a_changed_file_is_prepared_again(corpus, reference, tmp_path, monkeypatch):
    cfg, data = reference

    def no_reading(path):
        raise AssertionError(f"{path} read although the cache holds its tokens")

    monkeypatch.setattr(corpora, "_file_pieces", no_reading)
    again = prepare_data(cfg)
    assert again.tokenized.folder == data.tokenized.folder
    monkeypatch.undo()
    copy = tmp_path / "files"
    shutil.copytree(corpus, copy)
    first = open_source(files_config(copy, tmp_path / "c")).key()
    target = copy / "doc03.txt"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert open_source(files_config(copy, tmp_path / "c")).key() != first


# -- resuming, verifying -------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def test_a_build_killed_midway_resumes_after_its_last_sealed_shard_and_writes_the_same_files(corpus, reference, tmp_path,
                                                                                             monkeypatch, caplog):
    ref_cfg, _ = reference
    whole_cache, cut_cache = tmp_path / "whole", tmp_path / "cut"
    for c in (whole_cache, cut_cache):
        with_tokenizer_of(ref_cfg, c)
    whole = shard_files(prepare_data(files_config(corpus, whole_cache, shard_tokens=3000, workers=1)))
    assert len([n for n in whole if n.startswith("train-")]) >= 5

    real_seal = shards.ShardWriter.seal
    sealed = []

    def seal_then_die(self):
        out = real_seal(self)
        sealed.append(out["file"])
        if len(sealed) == 3:
            raise Interrupted("killed after three shards")
        return out

    monkeypatch.setattr(shards.ShardWriter, "seal", seal_then_die)
    with pytest.raises(Interrupted):
        prepare_data(files_config(corpus, cut_cache, shard_tokens=3000, workers=1))
    monkeypatch.undo()
    folder = entry(cut_cache)
    assert not (folder / "meta.json").exists()
    assert sorted(p.name for p in folder.glob("train-*.json")) == ["train-00000.json", "train-00001.json", "train-00002.json"]
    (folder / ".train-00003.bin.tmp").write_bytes(b"half a shard")  # what a SIGKILL leaves

    encoded = []
    real_encode = shards.encode_checked
    monkeypatch.setattr(shards, "encode_checked", lambda enc, pieces, dtype: encoded.extend(pieces) or real_encode(enc, pieces, dtype))
    caplog.set_level(logging.INFO)
    resumed = prepare_data(files_config(corpus, cut_cache, shard_tokens=3000, workers=1))
    assert "3 train shards already sealed" in caplog.text and "resuming after them" in caplog.text
    assert shard_files(resumed) == whole
    assert not list(cut_cache.rglob("*.tmp"))
    # only what the sealed shards did not hold was encoded again (a file is one piece here)
    whole_corpus = load_corpus(files_config(corpus, cut_cache))
    skipped = json.loads((folder / "train-00002.json").read_text())["pieces_end"]
    assert len(encoded) == len(whole_corpus.train) - skipped + len(whole_corpus.val)


def test_verify_finds_a_corrupt_shard_and_the_next_run_rebuilds_it(corpus, reference, tmp_path, capsys, caplog):
    ref_cfg, _ = reference
    cache = tmp_path / "cache"
    with_tokenizer_of(ref_cfg, cache)
    cfg = files_config(corpus, cache, shard_tokens=3000, workers=1)
    whole = shard_files(prepare_data(cfg))
    overrides = ["data=text_files", f"data.paths=[{corpus}]", f"data.cache_dir={cache}", "data.vocab_size=300",
                 "data.seq_len=32", "data.shard_tokens=3000", "data.workers=1"]
    with pytest.raises(SystemExit) as done:
        data_main(["verify", *overrides])
    assert done.value.code == 0 and "0 corrupt; the entry is complete" in capsys.readouterr().out

    folder = entry(cache)
    victim = folder / "train-00002.bin"
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 0xFF  # the same size: start-up does not notice, verify does
    victim.write_bytes(bytes(raw))
    prepare_data(cfg)
    assert victim.read_bytes() != whole[victim.name]  # start-up compares sizes only
    with pytest.raises(SystemExit) as done:
        data_main(["verify", *overrides])
    out = capsys.readouterr().out
    assert done.value.code == 1
    assert f"{victim}: checksum differs from its seal (corrupt); unsealed, the next run rebuilds the train split from it" in out
    assert not (folder / "train-00002.json").exists() and not (folder / "meta.json").exists()
    caplog.set_level(logging.INFO)
    assert shard_files(prepare_data(cfg)) == whole
    assert "2 train shards already sealed" in caplog.text
    with pytest.raises(SystemExit) as done:
        data_main(["verify", *overrides])
    assert done.value.code == 0


def test_verify_and_prepare_say_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        data_main(["verify", f"data.cache_dir={tmp_path}"])
    assert done.value.code == 1 and "not prepared" in capsys.readouterr().out


def test_a_bad_override_fails_in_one_line_exit_2(tmp_path):
    exe = str(Path(sys.executable).parent / "qknorm-data")
    for args, message in ((["prepare", "data.vocab_sise=3000"], "data.vocab_sise: no such key; did you mean data.vocab_size?"),
                          (["prepare", "data.workers=0"], "data.workers: must be null (every core) or >= 1, got 0"),
                          (["verify", "data=text_files", f"data.paths=[{tmp_path / 'none'}]"], "no such file or folder"),
                          (["tokenize"], "tokenize: no such command; allowed: prepare, verify")):
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "QKNORM_CACHE_DIR": str(tmp_path / "cache")})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("qknorm-data: error: "), proc.stderr
        assert message in lines[0]


# -- storage -------------------------------------------------------------------------------------

def test_a_vocabulary_above_65536_is_stored_as_uint32_and_round_trips(tmp_path):
    assert shards.dtype_for(65536) == np.uint16 and shards.dtype_for(65537) == np.uint32 == shards.dtype_for(70000)
    assert compose_config(["data.vocab_size=70000"]).data.vocab_size == 70000
    with pytest.raises(ConfigError, match="data.vocab_size: must be in"):
        compose_config(["data.vocab_size=259"])

    def encode(pieces):  # a stand-in for a 70000-piece tokenizer: every id above uint16's range
        return np.array([65536 + (ord(c) * 7919) % 4464 for p in pieces for c in p], dtype=np.int64)

    texts = [f"document {i}: " + "".join(chr(0x41 + (i * j) % 50) for j in range(40)) for i in range(30)]
    dtype = shards.dtype_for(70000)
    record = shards.build_split(tmp_path, "train", iter([iter([(t, True)]) for t in texts]), encode, dtype=dtype,
                                shard_tokens=200, batch_chars=100, workers=1, progress=Progress("test"))
    meta = shards.write_meta(tmp_path, shards.make_plan(70000, 200), {"train": record, "val": record}, {})
    tokens = shards.split_tokens(tmp_path, meta, "train")
    expected = encode(texts)
    assert tokens.dtype == np.uint32 and len(tokens.paths) > 3 and int(expected.min()) >= 65536
    assert np.array_equal(np.asarray(tokens), expected)
    assert all(p.stat().st_size == 4 * n for p, n in zip(tokens.paths, tokens.lengths, strict=True))
    assert json.loads((tmp_path / "train-00000.json").read_text())["dtype"] == "uint32"
    with pytest.raises(corpora.DataError, match="token id 70000 does not fit the token cache's uint16"):
        shards.encode_checked(lambda p: np.array([5, 70000]), ["x"], np.dtype(np.uint16))


def test_sharded_tokens_index_like_one_array(tmp_path):
    whole = np.arange(1000, dtype=np.uint16) * 7
    cuts = [0, 1, 250, 251, 600, 1000]
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        paths.append(tmp_path / f"s{i}.bin")
        whole[a:b].tofile(paths[-1])
    t = shards.ShardedTokens(paths, np.diff(cuts), np.uint16)
    assert len(t) == 1000 and t.shape == (1000,)
    for key in (slice(None), slice(0, 1), slice(249, 252), slice(595, 1000), slice(-5, None), slice(10, 5), slice(3, 900, 7)):
        assert np.array_equal(t[key], whole[key]), key
    for i in (0, 1, 250, 999, -1, -1000):
        assert t[i] == whole[i]
    idx = np.array([[0, 1, 2], [249, 250, 251], [998, 999, -1]])
    assert np.array_equal(t[idx], whole[idx])
    assert np.array_equal(np.asarray(t), whole) and np.array_equal(t.astype(np.int64), whole.astype(np.int64))
    with pytest.raises(IndexError):
        t[1000]
    blocks = list(t.blocks(300, overlap=1))
    assert [s for s, _ in blocks] == [0, 300, 600, 900] and np.array_equal(blocks[1][1], whole[300:601])


def test_reading_ahead_is_bounded_by_the_workers(tmp_path):
    made = []

    def many():
        for i in range(40):
            made.append(i)
            yield shards.Batch([f"{i}"], 1, 1, 1)

    seen = 0
    for _counts, ids in shards.encoded(many(), lambda pieces: np.array([int(p) for p in pieces]), np.dtype(np.uint16), workers=2):
        assert ids.tolist() == [seen]
        seen += 1
        time.sleep(0.02)  # a slow consumer: the reader must wait, not run ahead through the corpus
        assert len(made) - seen <= 2 * 2 + 2 + 1
    assert seen == 40


def test_the_progress_line_names_documents_tokens_speed_and_time_left():
    p = Progress("corpus: encoding train", total_chars=1000)
    p.update(docs=3, tokens=250, chars=400, nbytes=2_000_000)
    line = p.line(now=p.t0 + 2.0)
    assert line.startswith("corpus: encoding train: 3 documents, 250 tokens, 2.0 MB, 1.00 MB/s, 40%, 0m03s left"), line
    assert "left" not in p.line(final=True)
    p.update(docs=-2)
    assert p.line().startswith("corpus: encoding train: 1 document, ")


# -- hub datasets, streamed --------------------------------------------------------------------

def test_hf_text_streaming_or_not_gives_the_same_ids_and_its_key_is_its_arguments(tmp_path, monkeypatch):
    rows = [f"story {i}: once upon a time a model normalized its keys and {'queries ' * (i % 5)}\n" for i in range(300)]
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    base = dict(source="hf_text", name="json", data_files=(str(path),), val_fraction=0.1, vocab_size=300, seq_len=16,
                max_tokens=None, workers=1)
    a = prepare_data(DataConfig(cache_dir=str(tmp_path / "a"), streaming=False, **base))
    b = prepare_data(DataConfig(cache_dir=str(tmp_path / "b"), streaming=True, **base))
    for split in ("train_tokens", "val_tokens"):
        assert np.array_equal(np.asarray(getattr(a.tokenized, split)()), np.asarray(getattr(b.tokenized, split)()))

    import datasets

    def offline(*args, **kwargs):
        raise AssertionError("the dataset loaded although the cache holds its tokens")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prepare_data(DataConfig(cache_dir=str(tmp_path / "a"), streaming=False, **base)).tokenized.folder == a.tokenized.folder


@pytest.mark.slow
def test_a_prepare_killed_with_sigkill_resumes_to_the_same_shards(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=40, lines=600, seed=5)
    exe = str(Path(sys.executable).parent / "qknorm-data")
    args = ["prepare", "data=text_files", f"data.paths=[{corpus}]", "data.vocab_size=300", "data.shard_tokens=4000",
            "data.workers=2"]

    def run(cache: Path, kill_after: str | None = None) -> None:
        env = {**os.environ, "QKNORM_CACHE_DIR": str(cache)}
        proc = subprocess.Popen([exe, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if kill_after is None:
            assert proc.wait(timeout=600) == 0, proc.stdout.read() if proc.stdout else ""
            return
        deadline = time.time() + 600
        while not list(cache.glob(f"tokens/*/{kill_after}")):
            assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        proc.wait()

    run(tmp_path / "whole")
    run(tmp_path / "cut", kill_after="train-00003.json")
    folder = entry(tmp_path / "cut")
    assert not (folder / "meta.json").exists()
    run(tmp_path / "cut")
    whole = entry(tmp_path / "whole")
    names = sorted(p.name for p in whole.glob("*.bin"))
    assert names == sorted(p.name for p in folder.glob("*.bin")) and len(names) > 6
    assert all((whole / n).read_bytes() == (folder / n).read_bytes() for n in names)
    assert not list((tmp_path / "cut").rglob("*.tmp"))

