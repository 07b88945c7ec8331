"""Corpora, the tokenizer cache, batching and bits-per-byte arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qknorm.config import DataConfig
from qknorm.data import DataError, load_corpus, prepare_data, strip_play_markup
from qknorm.data import tokens as tokens_mod
from qknorm.data.datamodule import RandomWindowBatches, ValWindows


@pytest.fixture(scope="module")
def shakespeare(cache_dir):
    cfg = DataConfig(cache_dir=str(cache_dir))
    return cfg, prepare_data(cfg)


def test_markup_is_stripped():
    md = "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \nStand, ho!\n"
    assert strip_play_markup(md) == "[Enter BERNARDO]\n\nBERNARDO:\nWho's there?\nStand, ho!\n"


def test_shakespeare_holds_out_whole_plays():
    corpus = load_corpus(DataConfig(val_plays=("hamlet", "macbeth")))
    assert len(corpus.train) + len(corpus.val) == 38 and len(corpus.val) == 2
    assert any("To be, or not to be" in doc for doc in corpus.val)
    assert not any("To be, or not to be" in doc for doc in corpus.train)
    assert sum(map(len, corpus.train)) > 4_000_000
    for doc in corpus.train + corpus.val:
        assert "**" not in doc and "\n#" not in doc


def test_unknown_play_lists_the_allowed_ones():
    with pytest.raises(DataError, match=r"data.val_plays: unknown play\(s\) hamlett; allowed: .*hamlet"):
        load_corpus(DataConfig(val_plays=("hamlett",)))


def test_tokenizer_round_trips_and_counts_bytes_exactly(shakespeare):
    cfg, data = shakespeare
    tok = data.tokenized.tokenizer
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\u00e9\u00e8 \u2603 caf\u00e9 123\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # identity normalization, no dummy prefix
    assert int(data.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    val = data.tokenized.val_tokens()
    window = np.asarray(val[1000:1600])
    assert int(data.token_bytes[window].sum()) == len(tok.decode(window).encode("utf-8"))
    assert tok.vocab_size == cfg.vocab_size == 2048


def test_tokenizer_cache_is_reused_not_retrained(shakespeare, monkeypatch):
    cfg, data = shakespeare

    def fail(*a, **k):
        raise AssertionError("tokenizer retrained although the cache holds it")

    monkeypatch.setattr(tokens_mod, "_train_tokenizer", fail)
    again = prepare_data(cfg)
    assert again.tokenized.tokenizer.path == data.tokenized.tokenizer.path
    assert np.array_equal(again.tokenized.train_tokens(), data.tokenized.train_tokens())


def test_a_truncated_token_cache_is_rebuilt(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    cfg = DataConfig(source="text_files", paths=(str(tmp_path / "a.txt"),), cache_dir=str(tmp_path / "cache"),
                     vocab_size=300, seq_len=16)
    first = prepare_data(cfg)
    n = len(first.tokenized.train_tokens())
    with open(first.tokenized.train_path, "r+b") as f:
        f.truncate(100)
    again = prepare_data(cfg)
    assert len(again.tokenized.train_tokens()) == n
    assert "rebuilding" in caplog.text


@pytest.mark.slow
def test_two_runs_building_the_same_new_cache_at_once_both_train_on_one_valid_copy(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["query", "key", "value", "norm", "softmax", "logit", "head", "layer", "scale", "gain", "the", "a"]
    for d in range(12):
        (corpus / f"doc{d}.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)) + "\n")
    cache = tmp_path / "cache"
    args = ["model=nano", "trainer.max_steps=3", "trainer.val_every_n_steps=3", "logger=none", "data=text_files",
            f"data.paths=[{corpus}]", "data.vocab_size=300", "data.seq_len=64", "data.batch_size=4"]
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = {**os.environ, "QKNORM_CACHE_DIR": str(cache), "QKNORM_LOG_DIR": str(tmp_path / name / "logs")}
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "qknorm-train"), "trainer.progress_bar=false", *args],
                                      cwd=tmp_path / name, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summaries = [json.loads(next((tmp_path / n / "logs").rglob("summary.json")).read_text()) for n in ("a", "b")]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert summaries[0]["final_val_loss"] == summaries[1]["final_val_loss"]  # same tokens, same seed
    assert sum(o.count("training a 300-piece BPE tokenizer") for o in outputs) == 1  # the other waited on the lock
    (tok_dir,) = [p for p in (cache / "tokenizers").iterdir() if p.is_dir()]
    (tokens_dir,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    assert tokens_mod._entry_is_valid(tok_dir, ("spm.model",)) and tokens_mod._entry_is_valid(tokens_dir, ("train.bin", "val.bin"))
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("tmp*"))


def test_training_batches_are_a_function_of_the_step_and_split_across_ranks(shakespeare):
    _, data = shakespeare
    tokens = data.tokenized.train_tokens()
    whole = RandomWindowBatches(tokens, 64, 8, seed=3)
    x, y = whole[5]
    assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(whole[5][0], RandomWindowBatches(tokens, 64, 8, seed=3)[5][0])
    assert not torch.equal(whole[5][0], whole[6][0])
    parts = [RandomWindowBatches(tokens, 64, 8, seed=3, rank=r, world=2)[5][0] for r in range(2)]
    assert torch.equal(torch.cat(parts), x)


def test_validation_windows_tile_the_held_out_split(shakespeare):
    _, data = shakespeare
    val = data.tokenized.val_tokens()
    windows = ValWindows(val, 128, None)
    assert len(windows) == (len(val) - 1) // 128
    x0, y0 = windows[0]
    x1, _ = windows[1]
    assert torch.equal(torch.from_numpy(val[:128].astype(np.int64)), x0)
    assert torch.equal(torch.from_numpy(val[128:256].astype(np.int64)), x1)
    assert y0[-1] == x1[0]


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_times_tokens_per_byte(shakespeare):
    """BPB = sum(nats) / (ln 2 * sum(bytes)); a model with all-zero logits spends ln V nats per token."""
    import pytorch_lightning as pl

    from qknorm.data import LMDataModule
    from qknorm.training import LMModule

    from .conftest import compose_config

    cfg_data, data = shakespeare
    cfg = compose_config(["model=nano", "data.val_max_tokens=2049", "data.seq_len=256", "logger=none"])
    cfg = replace(cfg, data=replace(cfg.data, cache_dir=cfg_data.cache_dir))
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    with torch.no_grad():
        module.model.lm_head.weight.zero_()  # tied: every logit 0
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=LMDataModule(cfg.data, data, 0, 1), verbose=False)[0]
    val = np.asarray(data.tokenized.val_tokens()[: 8 * 256 + 1])
    n_bytes = int(data.token_bytes[val[1:]].sum())
    assert metrics["val/loss"] == pytest.approx(math.log(2048), rel=1e-6)
    assert metrics["val/bpb"] == pytest.approx(math.log2(2048) * 8 * 256 / n_bytes, rel=1e-6)


# ---------------------------------------------------------------- user files and hub datasets

def test_text_files_split_and_errors(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    corpus = load_corpus(DataConfig(source="text_files", paths=(str(folder),), val_fraction=0.2))
    assert len(corpus.train) + len(corpus.val) == 10 and corpus.val and corpus.train

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "nothing").mkdir()
    cases = [(tmp_path / "missing.txt", "no such file or folder"), (tmp_path / "empty.txt", "file is empty"),
             (tmp_path / "latin1.txt", "not UTF-8 text"), (tmp_path / "nothing", "folder holds no files")]
    for path, message in cases:
        with pytest.raises(DataError, match=message) as err:
            load_corpus(DataConfig(source="text_files", paths=(str(path),)))
        assert str(path) in str(err.value)


def test_a_file_shorter_than_one_sequence_is_rejected(tmp_path):
    (tmp_path / "short.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    cfg = DataConfig(source="text_files", paths=(str(tmp_path / "short.txt"),), cache_dir=str(tmp_path / "c"),
                     vocab_size=300, seq_len=20_000)
    with pytest.raises(DataError, match="fewer than one sequence"):
        prepare_data(cfg)


def test_lines_longer_than_sentencepiece_takes_still_train_the_tokenizer(tmp_path):
    # SentencePiece skips a sentence over max_sentence_length bytes: a corpus of 70k-character lines gave it
    # nothing to train on, and the error blamed the text's length
    import random

    rng = random.Random(0)
    lines = [" ".join("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8))) for _ in range(12_000))
             for _ in range(3)]  # about 70k characters each, no newline inside
    assert min(len(line) for line in lines) > 1 << 16
    (tmp_path / "long.txt").write_text("".join(line + "\n" for line in lines))
    cfg = DataConfig(source="text_files", paths=(str(tmp_path / "long.txt"),), cache_dir=str(tmp_path / "c"),
                     vocab_size=300, seq_len=64)
    data = prepare_data(cfg)
    assert data.vocab_size == 300 and len(data.tokenized.train_tokens()) > 1000


@pytest.mark.parametrize("builder", ["text", "json"])
def test_hf_text_reads_local_files_through_datasets(tmp_path, builder):
    rows = [f"story number {i}: once upon a time there was a model that normalized its keys.\n" for i in range(200)]
    if builder == "text":
        path = tmp_path / "stories.txt"
        path.write_text("".join(rows))
    else:
        path = tmp_path / "stories.jsonl"
        path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    cfg = DataConfig(source="hf_text", name=builder, data_files=(str(path),), cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.1, vocab_size=300, seq_len=32, max_tokens=100_000)
    corpus = load_corpus(cfg)
    assert 150 < len(corpus.train) < 200 and len(corpus.val) >= 1
    assert prepare_data(cfg).vocab_size == 300


def test_hf_text_reads_a_cached_dataset_from_its_files_and_a_slice_through_datasets(tmp_path, monkeypatch):
    """The map-style dataset is read from its Arrow files (not memory-mapped, so its pages stay out of the
    process's RSS) and gives exactly the rows `datasets` gives; a split slice is not its files whole and goes
    through `datasets`' own iterator."""
    import datasets

    from qknorm.data import corpora

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " * (i % 7 + 1), "id": i}) + "\n" for i in range(3000)))
    kwargs = dict(data_files=[str(path)], cache_dir=str(tmp_path / "hf"))
    whole = datasets.load_dataset("json", split="train", **kwargs)
    part = datasets.load_dataset("json", split="train[:10%]", **kwargs)
    expected = [r["text"] for r in whole]
    calls = []
    monkeypatch.setattr(datasets.Dataset, "iter", lambda self, batch_size: calls.append(len(self)) or iter(
        [{"text": [r["text"] for r in self]}]))
    read = [t for b in corpora._batches(whole, "text") for t in b["text"]]
    assert read == expected and calls == []  # from the files
    sliced = [t for b in corpora._batches(part, "text") for t in b["text"]]
    assert sliced == expected[:300] and calls == [300]  # the slice, through datasets
    assert next(corpora._batches(whole, "body")) == {"text": None, "id": None}  # the columns, for the error


def test_hf_text_bad_column_names_the_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    cfg = DataConfig(source="hf_text", name="json", data_files=(str(path),), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="data.text_field='text': not a column"):
        load_corpus(cfg)


def test_a_loader_resumed_inside_an_epoch_has_the_epochs_length_and_yields_the_remaining_steps():
    """An epoch is one validation interval. Resumed at step 10 of the epoch 9-11, Lightning counts step 9 as
    fetched already and ends the epoch when its count reaches the loader's length: the loader yields steps 10
    and 11 but has the epoch's length, 3, so the epoch ends, and validates, at step 12 as the uninterrupted run
    does (a length of 2 ended it at step 11, with an extra validation)."""
    import types

    from qknorm.config import DataConfig
    from qknorm.data.datamodule import LMDataModule

    tokens = types.SimpleNamespace(train_tokens=lambda: np.arange(10_000, dtype=np.uint16) % 50)
    module = LMDataModule(DataConfig(seq_len=8, batch_size=2), types.SimpleNamespace(tokenized=tokens), seed=0, max_steps=20,
                          steps_per_epoch=3)
    for step, (first, stop) in ((10, (9, 12)), (9, (9, 12)), (18, (18, 20))):
        module.trainer = types.SimpleNamespace(global_step=step, global_rank=0, world_size=1)
        sampler = module.train_dataloader().sampler
        assert list(sampler) == list(range(step, stop)) and len(sampler) == stop - first, (step, list(sampler), len(sampler))


def test_an_hf_text_validation_cap_changes_the_validation_tokens_not_the_tokenizer(tmp_path):
    """A run's length sets its validation cap when data.val_max_tokens is null: runs of other lengths share one
    tokenizer (trained on the training split alone) and differ only in their validation tokens."""
    from qknorm.data.corpora import open_source
    from qknorm.data.tokens import tokenizer_folder, tokens_folder

    path = tmp_path / "stories.txt"
    path.write_text("".join(f"story {i}: a model normalized its keys.\n" for i in range(50)))
    folders = []
    for cap in (4096, 8192):
        cfg = DataConfig(source="hf_text", name="text", data_files=(str(path),), cache_dir=str(tmp_path / "cache"),
                         split="train", val_split="validation", val_max_tokens=cap, vocab_size=300, seq_len=32)
        source = open_source(cfg)
        tok = tokenizer_folder(source, cfg)
        folders.append((tok, tokens_folder(source, cfg, tok)))
    assert folders[0][0] == folders[1][0] and folders[0][1] != folders[1][1]
