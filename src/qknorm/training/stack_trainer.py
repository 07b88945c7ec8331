"""Training a stack (model/stack.py): K runs of one shape in one process, each still its own run.

This is the stacked counterpart of Lightning's fit loop over `LMModule`, step for step: a member's
batch of step s is the one its solo run draws (RandomWindowBatches, its seed), its loss is the model's
own `loss`, its gradients are clipped by its own norm, it is stepped by the optimizer and schedule its
solo run builds (`optim.optimizer_and_schedule`), validated on the same held-out windows at the same
steps, and watched by the same `StabilityMonitor` and `DivergenceDetector` callbacks, which see a
`Member` where a solo run gives them the LightningModule. Precision and the device come from Lightning
Fabric. A member that diverges is frozen (never stepped again) and its run directory finished at once;
the others go on.

Each member checkpoints into its own run directory (`checkpoints/last.ckpt`, its model, optimizer,
schedule, callbacks and history) at the interval and when it ends (its final state, as a solo run's).
A killed stack resumes from them; a member whose checkpoint is ahead of the others (a kill between two
members' saves, or a regrouped stack) waits, frozen, until the stack reaches its step, so every member
resumes exactly.

A member's run directory is its solo run's: the same metrics.csv rows (values as Lightning logs them,
float32), TensorBoard run name, `train.log` (`open_member_log`: the stack's lines and its own) and a
wall time of its own: its share of the stack's (`StackClock`), the stack's total beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from ..config import RunConfig
from ..data import LMDataModule, prepare_data
from ..data.datamodule import RandomWindowBatches
from ..model import build_model, kernels
from ..model.stack import StackedModel
from ..utils.flops import device_name
from .callbacks import AtomicCheckpointIO, ResumableCSVLogger, newest_checkpoint
from .module import Outcome, outcome_record, restore_outcome, val_batch_sums
from .monitor import DivergenceDetector, StabilityMonitor, callbacks_fingerprint
from .optim import optimizer_and_schedule
from .progress import log_run_params
from .qk_clip import apply_qk_clip, qk_clip_metrics
from .summary import RunSummary, result_fields

log = logging.getLogger("qknorm.stack")
STACKED_CHECKPOINT = "qknorm_stacked"  # the key that marks a stack member's checkpoint


@dataclass
class MemberSpec:
    cfg: RunConfig  # validated, schedule resolved
    run_dir: Path
    summary: RunSummary
    name: str  # TensorBoard's version name for the run: its solo run's (naming.run_name)
    variant: str = "attention"  # the attention preset, for the run's hparams


# -- each member's train.log -------------------------------------------------------------------------

_MEMBER: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("qknorm_stack_member", default=None)
_JOB_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log file


@contextlib.contextmanager
def member_scope(run_dir: Path) -> Iterator[None]:
    """Log records emitted inside concern this member: they go to its train.log and no other member's.
    Records outside any scope (the stack's own: data, start-up) go to every member's."""
    token = _MEMBER.set(str(run_dir))
    try:
        yield
    finally:
        _MEMBER.reset(token)


class _MemberFilter(logging.Filter):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        member = _MEMBER.get()
        return member is None or member == self.key


def open_member_log(run_dir: Path) -> Callable[[], None]:
    """`<run_dir>/train.log` for a member, appended to as its solo job's (Hydra's file handler on the
    root logger, in its format): the stack's lines and the member's own. Returns what closes it."""
    root = logging.getLogger()
    hydra_file = next((h for h in root.handlers if isinstance(h, logging.FileHandler) and h.formatter), None)
    handler = logging.FileHandler(Path(run_dir) / "train.log")
    handler.setFormatter(hydra_file.formatter if hydra_file else logging.Formatter(_JOB_LOG_FORMAT))
    handler.addFilter(_MemberFilter(str(run_dir)))
    root.addHandler(handler)

    def close() -> None:
        root.removeHandler(handler)
        handler.close()

    return close


# -- each member's wall time -------------------------------------------------------------------------

class StackClock:
    """Each member's share of the stack's wall time, so that a member's `wall_time_s` is its own and
    the members' times add up to the stack's (a sum over runs never counts one stack K times). What the
    stack does for one member (its optimizer step, callbacks, logging, validation, checkpoints) is that
    member's time; what it does for several at once (start-up, data, the stacked forward and backward)
    is split equally among the members it serves; a member's time stops when it ends."""

    def __init__(self, k: int):
        self.charged = [0.0] * k
        self.open = set(range(k))
        self._mark = time.perf_counter()

    def _lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._mark = now - self._mark, now
        return elapsed

    def share(self, members: Optional[Iterable[int]] = None) -> None:
        """The time since the last mark, split equally among `members` (default: those still training)."""
        ks = sorted(self.open if members is None else set(members))
        elapsed = self._lap()
        for k in ks:
            self.charged[k] += elapsed / len(ks)

    def own(self, k: int) -> None:
        """The time since the last mark, member k's alone."""
        self.charged[k] += self._lap()

    def close(self, k: int) -> None:
        self.open.discard(k)

    def of(self, k: int) -> float:
        return self.charged[k]

    @property
    def total(self) -> float:
        return sum(self.charged)


def _as_logged(metrics: dict) -> dict:
    """Values as a LightningModule's `self.log` hands them to the loggers: float32 tensors made floats."""
    return {k: float(np.float32(v)) for k, v in metrics.items()}


class _MemberTrainer:
    """What the callbacks read from a Lightning Trainer, for one member."""

    is_global_zero = True
    world_size = 1

    def __init__(self, max_steps: int, loggers: list, datamodule):
        self.global_step, self.max_steps = 0, max_steps
        self.loggers, self.datamodule = loggers, datamodule
        self.should_stop = False


class Member:
    """One run of a stack: its view of the stacked model, its optimizer, callbacks and loggers, and
    what the callbacks read from a LightningModule (model, device, losses, mark_diverged)."""

    def __init__(self, k: int, spec: MemberSpec, model, data, device: torch.device):

        cfg = spec.cfg
        self.k, self.spec, self.cfg, self.model, self.device = k, spec, cfg, model, device
        self.outcome = Outcome()
        self.initial_loss: Optional[float] = None
        self.last_train_loss: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.finished = False
        self.vocab_size = data.vocab_size
        self.token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64, device=device)
        self.batches = RandomWindowBatches(data.tokenized.train_tokens(), cfg.data.seq_len, cfg.data.batch_size, cfg.seed)
        self.datamodule = LMDataModule(cfg.data, data, cfg.seed, cfg.trainer.max_steps, cfg.trainer.val_every_n_steps)
        self.optimizer, self.scheduler = optimizer_and_schedule(model, cfg, on_cuda=device.type == "cuda")
        self.step_metrics: dict = {}  # what this step logs, as a LightningModule's self.log collects it
        self._throughput: Optional[tuple[float, int]] = None  # (time, step) the Throughput callback counts from
        resume = _load_member_checkpoint(spec.run_dir)
        step = self._restore(resume) if resume else 0
        diverged = self.outcome.status == "diverged"
        # a final checkpoint (the stack was killed before this member's summary was finished): the member
        # ended there, and ends again without a step, a callback or a checkpoint more
        self.ended_before = diverged or step >= cfg.trainer.max_steps
        self.callbacks: list = []
        if cfg.callbacks.monitor.enabled:
            self.callbacks.append(StabilityMonitor(cfg.callbacks.monitor, spec.run_dir, resume_step=step))
        if cfg.callbacks.divergence.enabled:
            self.callbacks.append(DivergenceDetector(cfg.callbacks.divergence, cfg.optim.warmup_steps or 0))
        if resume:
            for cb in self.callbacks:
                cb.load_state_dict(resume["callbacks"].get(type(cb).__name__, {}))
        self.trainer = _MemberTrainer(cfg.trainer.max_steps, self._loggers(step), self.datamodule)
        self.trainer.global_step = step
        self.trainer.should_stop = diverged
        for cb in self.callbacks:
            if hasattr(cb, "setup"):
                cb.setup(self.trainer, self, "fit")

    def _loggers(self, step: int) -> list:
        from pytorch_lightning.loggers import TensorBoardLogger


        loggers: list = []
        run_dir = str(self.spec.run_dir)
        if self.cfg.logger.tensorboard:
            loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=self.spec.name,
                                             default_hp_metric=False))
        if self.cfg.logger.csv:
            loggers.append(ResumableCSVLogger(save_dir=run_dir, resume_step=step, validated_at_resume=True))
        log_run_params(loggers, {"run": self.spec.name, "variant": self.spec.variant, "lr": self.cfg.optim.lr,
                                 "seed": self.cfg.seed})
        return loggers

    # -- what the callbacks read ---------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    @property
    def running(self) -> bool:
        return not self.finished and not self.trainer.should_stop and self.global_step < self.cfg.trainer.max_steps

    def mark_diverged(self, reason: str) -> None:
        if self.outcome.status == "running":
            self.outcome.status, self.outcome.reason, self.outcome.step = "diverged", reason, self.global_step
        self.trainer.should_stop = True

    def nonfinite(self, reason: str) -> None:
        self.outcome.skipped_steps += 1
        if self.cfg.callbacks.divergence.skip_nonfinite_steps:
            self.step_metrics["train/skipped_steps"] = float(self.outcome.skipped_steps)
        else:
            self.mark_diverged(reason)

    # -- logging, validation, checkpoints -------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def log_step(self, step: int, metrics: dict) -> None:
        """A row as Lightning's logger connector writes a step's `self.log` values: float32, none when
        nothing was logged (no epoch column: a solo run's metrics.csv leaves it out, qknorm.training.callbacks)."""
        if metrics:
            self.log_metrics(_as_logged(metrics), step=step)

    def start_step(self, step: int) -> None:
        self.step_metrics = {}
        if self._throughput is None:
            self._throughput = (time.perf_counter(), step)

    def throughput(self, step: int, tokens_per_step: int) -> None:
        """The Throughput callback's `train/tokens_per_s` over each logging interval of this member's steps
        (the stack's wall clock); validation starts a new interval."""
        if not self.cfg.callbacks.throughput or self._throughput is None:
            return
        t0, step0 = self._throughput
        steps = step + 1 - step0
        if steps >= self.cfg.trainer.log_every_n_steps:
            now = time.perf_counter()
            self.step_metrics["train/tokens_per_s"] = steps * tokens_per_step / (now - t0)
            self._throughput = (now, step + 1)

    @torch.no_grad()
    def validate(self, autocast) -> None:
        self._throughput = None  # validation time is not training throughput
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        with autocast():
            for x, y in self.datamodule.val_dataloader():
                sums += val_batch_sums(self.model, x.to(self.device), y.to(self.device), self.token_bytes)
        self.model.train()
        nats, tokens, nbytes = (float(v) for v in sums)
        if not tokens:
            return
        loss, bpb = nats / tokens, nats / (math.log(2) * nbytes)
        self.outcome.val_history.append((self.global_step, loss, bpb))
        # at global_step - 1, where Lightning logs a validation at an epoch's end
        self.log_step(self.global_step - 1, {"val/loss": loss, "val/bpb": bpb})

    def checkpoint(self) -> None:

        ckpt = {
            STACKED_CHECKPOINT: True, "global_step": self.global_step,
            "state_dict": {"model." + n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "qknorm_config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
            "qknorm_vocab_size": self.vocab_size,
            "qknorm_outcome": outcome_record(self.outcome, self.initial_loss, self.spec.summary.earlier_s + self.spec.summary.clock(),
                                             started_at=self.spec.summary.data["started_at"]),
        }
        AtomicCheckpointIO().save_checkpoint(ckpt, self.spec.run_dir / "checkpoints" / "last.ckpt")

    def _restore(self, ckpt: dict) -> int:
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        with torch.no_grad():  # into the views: writes through to the stack
            for name, t in self.model.state_dict(keep_vars=True).items():
                if name in state:
                    t.copy_(state[name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.initial_loss = restore_outcome(self.outcome, ckpt)
        self.spec.summary.resumed(int(ckpt["global_step"]), ckpt.get("qknorm_outcome", {}))
        log.info("%s: resuming from its checkpoint at step %d", self.spec.run_dir.name, ckpt["global_step"])
        return int(ckpt["global_step"])


def _load_member_checkpoint(run_dir: Path) -> Optional[dict]:
    """The newest readable stack-member checkpoint of a run, else None (none, or a solo run's)."""
    found = newest_checkpoint(run_dir)
    if found is None:
        return None
    path, ckpt = found
    if not ckpt.get(STACKED_CHECKPOINT):
        log.warning("%s was written by a run trained alone; this member starts again from step 0", path)
        return None
    return ckpt


def train_stack(specs: list[MemberSpec], precision: str, accelerator: str = "auto",
                on_member_end=lambda member, result: None) -> list[dict]:
    """Train the members together; returns each member's summary fields (train.train's), in order.
    `on_member_end(member, result)` is called as soon as a member ends (a diverged one at once), inside
    its `member_scope`. Each member's summary gets its share of the stack's wall time as `wall_time_s`
    (StackClock) and, when the stack ends, the stack's total as `stack_wall_time_s`."""
    import pytorch_lightning as pl
    from lightning_fabric import Fabric


    clock = StackClock(len(specs))
    for k, spec in enumerate(specs):
        spec.summary.clock = functools.partial(clock.of, k)
    cfg0 = specs[0].cfg
    if cfg0.trainer.threads:
        torch.set_num_threads(cfg0.trainer.threads)
    if cfg0.trainer.deterministic:  # as Lightning's Trainer(deterministic=True) sets it for a run alone (fit.py)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)  # type: ignore[arg-type]  # a checked name
    device = fabric.device
    data = prepare_data(cfg0.data)
    models = []
    for spec in specs:
        pl.seed_everything(spec.cfg.seed, workers=True, verbose=False)  # what a solo run seeds its model with
        models.append(build_model(spec.cfg, data.vocab_size))
    params = {"params": models[0].num_params(), "params_non_embedding": models[0].num_params(exclude_embedding=True),
              "vocab_size": data.vocab_size, "corpus": data.corpus_name, "data_fingerprint": data.fingerprint,
              "data_key": data.tokenized.folder.name,  # the cache entry read (qknorm.data.tokens.data_key)
              "train_tokens_available": int(len(data.tokenized.train_tokens()))}
    stack = StackedModel(models).to(device)
    del models
    clock.share()
    members = []
    for k, (spec, view) in enumerate(zip(specs, stack.member_views(), strict=True)):
        with member_scope(spec.run_dir):
            members.append(Member(k, spec, view, data, device))
            spec.summary.update(**params, stack_size=len(specs))
        clock.own(k)
    path = kernels.stack_kernel(device, stack.own_code)  # the path stack.loss takes (its members' own configs)
    log.info("stack of %d members on %s (%s): %d parameters each", len(members), device, path, params["params"])
    info = {"device": str(device), "device_name": device_name(device), "compiled": False}
    z_loss = torch.tensor([m.cfg.optim.z_loss for m in members], device=device)
    max_steps = cfg0.trainer.max_steps
    every = cfg0.trainer.val_every_n_steps or max_steps  # one epoch: LMDataModule's
    log_every, ckpt_every = cfg0.trainer.log_every_n_steps, cfg0.trainer.checkpoint_every_n_steps
    deadline = time.monotonic() + 60 * cfg0.trainer.max_time_minutes if cfg0.trainer.max_time_minutes else None
    results: list[dict] = [{} for _ in members]

    def end(m: Member) -> None:
        """A member's last step: as a solo run's fit ends (callbacks, a final validation, the final
        checkpoint unless trainer.keep_checkpoint=false), then its summary (on_member_end)."""
        with member_scope(m.spec.run_dir):
            for cb in m.callbacks:
                if hasattr(cb, "on_train_end") and not m.ended_before:
                    cb.on_train_end(m.trainer, m)
            results[m.k] = _result(m, params, info, fabric.autocast)
            if ckpt_every and m.cfg.trainer.keep_checkpoint and not m.ended_before:
                m.checkpoint()
            m.finished = True
            for logger in m.trainer.loggers:
                logger.finalize("success")
            clock.own(m.k)
            clock.close(m.k)
            on_member_end(m, results[m.k])

    # No validation is owed at a resumed step (a solo run's on_train_start): a member checkpoints after it validates.
    for m in members:
        if m.cfg.attention.qk_clip_tau is not None:
            for layer in m.model.attention_layers():
                layer.max_logit = torch.full((layer.n_heads,), float("-inf"), device=device)
        if not m.running:
            end(m)
    clock.share()
    step = min((m.global_step for m in members if m.running), default=max_steps)
    while any(m.running for m in members):
        if deadline and time.monotonic() > deadline:
            clock.share()
            for m in members:
                if m.running:
                    m.trainer.should_stop = True
                    end(m)
            break
        active = [m for m in members if m.running and m.global_step == step]  # one ahead waits for the stack
        if not active:
            step += 1
            continue
        for m in active:
            m.start_step(step)
        xs, ys = zip(*(m.batches[step] for m in members), strict=True)
        idx, targets = torch.stack(xs).to(device), torch.stack(ys).to(device)
        with fabric.autocast():
            total, nats, z_sq = stack.loss(idx, targets, z_loss, members=[m.k for m in active])
        losses = nats.float().mean(dim=(1, 2)).tolist()
        z_values = z_sq.detach().float().tolist()
        finite = [math.isfinite(v) for v in losses]
        if any(finite):
            fabric.backward(total[torch.tensor(finite, device=device)].sum())
        clock.share(m.k for m in active)
        for i, m in enumerate(active):
            with member_scope(m.spec.run_dir):
                _member_step(m, step, losses[i], z_values[i], idx[0].numel(), stack if path == "vmap" else None)
                if m.running and (step + 1) % every == 0:
                    m.validate(fabric.autocast)
                if ckpt_every and m.running and (step + 1) % ckpt_every == 0:
                    m.checkpoint()
                if (step + 1) % log_every == 0 or (step + 1) % every == 0 or not m.running:
                    for logger in m.trainer.loggers:
                        logger.save()
            if m.running:
                clock.own(m.k)
            else:
                end(m)
        for p in stack.parameters():
            p.grad = None
        for m in active:
            m.optimizer.zero_grad(set_to_none=True)
        step += 1
    for m in members:  # the stack's total beside each member's share; finished members' summaries are rewritten
        m.spec.summary.update(stack_wall_time_s=round(clock.total, 3))
    return results


def _member_step(m: Member, step: int, loss: float, z_sq: float, tokens_per_step: int, shared: Optional[StackedModel]) -> None:
    """One member's part of a stacked step, in its solo run's order: the loss it logs, its optimizer
    step (the stacked gradients shared into its views first on the vmap path), QK-Clip, the callbacks,
    and the row Lightning would log for the step."""
    lrs = m.scheduler.get_last_lr()  # this step's LR, as Lightning's LearningRateMonitor logs it
    m.last_train_loss = loss
    if m.initial_loss is None:
        m.initial_loss = loss
    if not math.isfinite(loss):
        m.nonfinite(f"non-finite loss ({loss}) at step {step}")
    else:
        m.step_metrics.update({"train/loss": loss, "train/log_z_sq": z_sq, "train/tokens": float((step + 1) * tokens_per_step)})
        if shared is not None:
            shared.share_gradients(m.k)
        _optimizer_step(m, step)
    # every step, skipped or not, as Lightning steps a solo run's scheduler on every batch: a skipped step
    # must not leave the member's LR a step behind its solo run's for the rest of the run
    m.scheduler.step()
    m.trainer.global_step = step + 1
    log_step = (step + 1) % m.cfg.trainer.log_every_n_steps == 0
    if log_step and m.last_grad_norm is not None:
        m.step_metrics["train/grad_norm"] = float(m.last_grad_norm)
    if m.cfg.attention.qk_clip_tau is not None:
        apply_qk_clip(m.model, m.cfg.attention)
        if log_step:
            m.step_metrics.update(qk_clip_metrics(m.model))
    for cb in m.callbacks:
        cb.on_train_batch_end(m.trainer, m, None, None, step)
    m.throughput(step, tokens_per_step)
    if log_step and m.cfg.callbacks.lr_monitor:
        # named as Lightning's LearningRateMonitor names them: by the optimizer's class, a column per group
        m.log_metrics({f"lr-{type(m.optimizer).__name__}/pg{g + 1}": lr for g, lr in enumerate(lrs)}, step=step)
    if log_step or m.trainer.should_stop:
        m.log_step(step, m.step_metrics)


def _optimizer_step(m: Member, step: int) -> None:
    """The solo run's order: callbacks' on_before_optimizer_step, clipping by the member's own norm, step (the
    scheduler steps in _member_step, whether or not this step was skipped)."""
    for cb in m.callbacks:
        if hasattr(cb, "on_before_optimizer_step"):
            cb.on_before_optimizer_step(m.trainer, m, m.optimizer)
    grads = [p for p in m.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, m.cfg.optim.grad_clip or math.inf, foreach=True)
    m.last_grad_norm = norm.detach()
    if not torch.isfinite(norm):
        m.nonfinite(f"non-finite gradient norm ({float(norm)}) at step {step}")
        return
    m.optimizer.step()


def _result(m: Member, params: dict, info: dict, autocast) -> dict:
    """A member's summary fields, as train.train returns them for a solo run."""
    o = m.outcome
    if o.status == "running" and (not o.val_history or o.val_history[-1][0] != m.global_step):
        m.validate(autocast)
    return {
        **params,
        **result_fields(status=o.status, reason=o.reason, diverged_at_step=o.step, steps=m.global_step,
                        max_steps=m.cfg.trainer.max_steps, tokens_per_step=m.cfg.data.batch_size * m.cfg.data.seq_len,
                        initial_loss=m.initial_loss, val_history=o.val_history, skipped_steps=o.skipped_steps,
                        world_size=1, stability=callbacks_fingerprint(m.callbacks)),
        "precision": None, **info,
    }
