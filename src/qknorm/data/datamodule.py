"""Batches from memory-mapped token shards.

Training batches are random windows. The batch of step s is a pure function of (seed, s), so data
order survives a resume, and each of W data-parallel ranks takes its slice of the same global batch,
so W processes see exactly what one process would see at the same global batch size.
Validation walks the held-out tokens in consecutive, non-overlapping windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import DataConfig
from .corpora import open_source
from .shards import ShardedTokens
from .tokens import TokenizedCorpus, get_tokenized, get_tokenizer, val_windows


@dataclass(frozen=True)
class PreparedData:
    tokenized: TokenizedCorpus
    token_bytes: np.ndarray  # UTF-8 bytes per token id
    corpus_name: str

    @property
    def vocab_size(self) -> int:
        return self.tokenized.tokenizer.vocab_size

    @property
    def fingerprint(self) -> str:
        return self.tokenized.fingerprint


def prepare_data(cfg: DataConfig) -> PreparedData:
    """The corpus's tokenizer and token shards: from the shared cache, or built into it (streamed, in
    data.workers processes, resumable; see qknorm.data.tokens)."""
    source = open_source(cfg)
    tokenizer = get_tokenizer(source, cfg)
    tokenized = get_tokenized(source, cfg, tokenizer)
    return PreparedData(tokenized, tokenizer.token_bytes(), source.name)


class RandomWindowBatches(Dataset):
    """Item s is (this rank's part of) the training batch of step s: inputs and targets, [b, seq_len].

    Window starts are drawn uniformly over the whole training split, read as one sequence whatever its
    shards (a window that crosses a shard's end reads from both, as it crosses a document's end), so a
    batch depends on the tokens alone, never on how they were cut into shards."""

    def __init__(self, tokens: np.ndarray | ShardedTokens, seq_len: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} processes")
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.rank, self.world = rank, world
        self.offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int):
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch, endpoint=True)
        per_rank = self.global_batch // self.world
        starts = starts[self.rank * per_rank:(self.rank + 1) * per_rank]
        window = torch.from_numpy(self.tokens[starts[:, None] + self.offsets].astype(np.int64))
        return window[:, :-1], window[:, 1:]


class StepSampler(Sampler[int]):
    """Yields step indices from `start` (the resumed global step) up to `stop`. Its length is the whole epoch's,
    from `epoch_start`: resumed inside an epoch, Lightning counts the epoch's batches done before the checkpoint
    as fetched already and ends the epoch (and validates) when its count reaches this length; a length of the
    remaining steps alone would end it that many steps early, with a validation the uninterrupted run never had."""

    def __init__(self, start: int, stop: int, epoch_start: int | None = None):
        self.start, self.stop = start, stop
        self.epoch_start = start if epoch_start is None else min(epoch_start, start)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.epoch_start)


class ValWindows(Dataset):
    def __init__(self, tokens: np.ndarray | ShardedTokens, seq_len: int, max_tokens: int | None, rank: int = 0, world: int = 1):
        count = val_windows(len(tokens), seq_len, max_tokens)  # the bigram reference scores the same targets
        self.tokens, self.seq_len = tokens, seq_len
        self.indices = list(range(count))[rank::world]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        start = self.indices[i] * self.seq_len
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class LMDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, data: PreparedData, seed: int, max_steps: int, steps_per_epoch: int | None = None):
        super().__init__()
        self.cfg, self.data, self.seed, self.max_steps = cfg, data, seed, max_steps
        # An "epoch" ends at each validation step, so validation falls on the same steps whether or not
        # the run was resumed in between (the trainer reloads this loader every epoch).
        self.steps_per_epoch = steps_per_epoch or max_steps

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        start = self.trainer.global_step if self.trainer is not None else 0
        epoch_start = start // self.steps_per_epoch * self.steps_per_epoch
        stop = min(self.max_steps, epoch_start + self.steps_per_epoch)
        batches = RandomWindowBatches(self.data.tokenized.train_tokens(), self.cfg.seq_len,
                                      self.cfg.batch_size * world, self.seed, rank, world)
        return DataLoader(batches, batch_size=None, sampler=StepSampler(start, stop, epoch_start))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        windows = ValWindows(self.data.tokenized.val_tokens(), self.cfg.seq_len, self.cfg.val_max_tokens, rank, world)
        return DataLoader(windows, batch_size=self.cfg.batch_size, shuffle=False)
