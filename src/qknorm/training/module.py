"""The LightningModule: next-token loss with optional z-loss, bits-per-byte validation, guarded steps."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from ..config import RunConfig, resolve_schedule
from ..model import build_model
from ..model.kernels import compile_training_loss
from ..utils.flops import device_name
from .monitor import callbacks_fingerprint
from .optim import optimizer_and_schedule
from .qk_clip import apply_qk_clip, qk_clip_metrics
from .summary import utc_now


@dataclass
class Outcome:
    """How the run is going; read by the summary at the end."""

    status: str = "running"  # running -> completed | diverged | failed
    reason: Optional[str] = None
    step: Optional[int] = None
    skipped_steps: int = 0
    val_history: list = field(default_factory=list)  # (step, loss, bpb)


def outcome_record(outcome: Outcome, initial_loss: Optional[float], elapsed_s: Optional[float] = None,
                   val_time_s: Optional[float] = None, started_at: Optional[str] = None) -> dict:
    """A checkpoint's `qknorm_outcome`: the history so far, the run's wall and validation time so far and when
    its first attempt started (a resumed run's summary counts every attempt, as its steps and tokens do), and, for
    the final checkpoint of a diverged run, that it diverged (a rerun from it ends there instead of training on)."""
    record: dict[str, Any] = {"initial_loss": initial_loss, "skipped_steps": outcome.skipped_steps,
                              "val_history": list(outcome.val_history)}
    record.update({k: v for k, v in (("elapsed_s", elapsed_s), ("val_time_s", val_time_s), ("started_at", started_at))
                   if v is not None})
    if outcome.status == "diverged":
        record.update(status=outcome.status, reason=outcome.reason, step=outcome.step)
    return record


def restore_outcome(outcome: Outcome, checkpoint: dict) -> Optional[float]:
    """`outcome_record` back into `outcome`; returns the initial loss."""
    saved = checkpoint.get("qknorm_outcome", {})
    outcome.skipped_steps = saved.get("skipped_steps", 0)
    outcome.val_history = [tuple(v) for v in saved.get("val_history", [])]
    if saved.get("status") == "diverged":
        outcome.status, outcome.reason, outcome.step = "diverged", saved.get("reason"), saved.get("step")
    return saved.get("initial_loss")


def val_batch_sums(model, x: torch.Tensor, y: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """A validation batch's (nats, tokens, UTF-8 bytes), in float64: loss per token and bits per byte
    are sums over the whole held-out set divided at the end (a solo run's and a stack member's)."""
    _, nats, _ = model.loss(x, y)
    return torch.stack([nats.double().sum(), torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device),
                        token_bytes[y].sum()])


class LMModule(pl.LightningModule):
    def __init__(self, cfg: RunConfig, vocab_size: int, token_bytes: np.ndarray):
        super().__init__()
        self.cfg = cfg = resolve_schedule(cfg)  # concrete warmup and intervals (a no-op for a loaded config)
        self.model = build_model(cfg, vocab_size)
        # model.compile: the training step's forward and loss as one compiled graph, built at the first
        # training step (a compiled function does not pickle, and spawned DDP workers get this module
        # pickled); validation and the stability monitor's probe run the uncompiled model
        self._train_loss = None
        self.register_buffer("token_bytes", torch.as_tensor(token_bytes, dtype=torch.float64), persistent=False)
        self.outcome = Outcome()
        self.initial_loss: Optional[float] = None
        self.last_train_loss: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._val_sums: Optional[torch.Tensor] = None
        self._qk_clip = cfg.attention.qk_clip_tau is not None
        self.train_device: dict = {}  # where fit trained: Lightning moves the module back to the CPU after it
        # seconds spent validating (summary.json's val_time_s), and the wall time of earlier attempts: both carried
        # across a resume by the checkpoint (outcome_record), with the first attempt's start
        self.val_time_s, self.earlier_s, self.started_at = 0.0, 0.0, utc_now()  # train() gives the summary's start
        self.run_t0 = time.perf_counter()  # when the run's clock started (train(): the summary's)
        self.val_tokens = 0  # tokens one validation reads, all processes together (summary.json's val_tokens)
        self._val_t0 = 0.0
        self._grads_guarded = cfg.trainer.precision != "16-mixed"  # AMP's scaler skips inf steps itself

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # -- training ----------------------------------------------------------------------------------

    def _record_device(self) -> None:
        self.train_device = {"device": str(self.device), "device_name": device_name(self.device), "compiled": self.compiled}

    def on_fit_start(self) -> None:
        self._record_device()  # on the training device already, and called when a rerun from a final checkpoint trains no step

    def on_train_start(self) -> None:
        self._record_device()
        # A run resumed from a checkpoint taken at a validation step, before that validation ran:
        # validate now, so the history holds every validation step exactly once.
        step, every = self.global_step, self.cfg.trainer.val_every_n_steps
        assert every is not None, "val_every_n_steps is set by config.resolve_schedule"
        if step > 0 and step % every == 0 and not any(h[0] == step for h in self.outcome.val_history):
            self._validate_now()
        if self._qk_clip:
            for layer in self.model.attention_layers():
                layer.max_logit = torch.full((layer.n_heads,), float("-inf"), device=self.device)

    @property
    def compiled(self) -> bool:
        """model.compile, with "auto" resolved by the device the module trains on."""
        c = self.cfg.model.compile
        return c is True or (c == "auto" and self.device.type == "cuda")

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self._train_loss is None:
            self._train_loss = compile_training_loss(self.model) if self.compiled else self.model.loss
        total, nats, z_sq = self._train_loss(x, y, self.cfg.optim.z_loss)
        loss = nats.mean()
        # every process must take the same stop decision: judge the mean loss over all of them
        mean_loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean") if self.trainer.world_size > 1 else loss
        self.last_train_loss = float(mean_loss)
        if self.initial_loss is None:
            self.initial_loss = self.last_train_loss
        if not math.isfinite(self.last_train_loss):
            self._nonfinite(f"non-finite loss ({self.last_train_loss}) at step {self.global_step}")
            return None  # Lightning skips backward and the optimizer step
        tokens = x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/log_z_sq", z_sq)  # mean log^2 Z: the z-loss term is optim.z_loss times it
        self.log("train/tokens", float((self.global_step + 1) * tokens))
        return total

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        max_norm = self.cfg.optim.grad_clip or math.inf
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self.last_grad_norm = norm.detach()
        if self._grads_guarded and not torch.isfinite(norm):
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update at all
            self._nonfinite(f"non-finite gradient norm ({float(norm)}) at step {self.global_step}")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # QK-Clip is part of the step (Kimi K2's MuonClip: the optimizer's update, then the clip), whatever the
        # optimizer: the callbacks after it (the stability monitor, the checkpoint) see the clipped weights,
        # as a stack member's do (stack_trainer._member_step)
        if self._qk_clip:
            if self.trainer.world_size > 1:  # the max over the whole batch, every process's part: one clip for all
                for layer in self.model.attention_layers():
                    assert layer.max_logit is not None  # set in on_train_start with QK-Clip on
                    gathered = self.all_gather(layer.max_logit)
                    assert isinstance(gathered, torch.Tensor)  # the gather of one tensor
                    layer.max_logit = gathered.reshape(-1, layer.n_heads).amax(dim=0)
            apply_qk_clip(self.model, self.cfg.attention)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step % self.cfg.trainer.log_every_n_steps == 0:
            if self.last_grad_norm is not None:
                self.log("train/grad_norm", self.last_grad_norm)
            if self._qk_clip:
                for name, value in qk_clip_metrics(self.model).items():
                    self.log(name, value)

    def _nonfinite(self, reason: str) -> None:
        """A non-finite step is skipped; it ends the run unless skip_nonfinite_steps (OLMo-core's skip-step)."""
        self.outcome.skipped_steps += 1
        if self.cfg.callbacks.divergence.skip_nonfinite_steps:
            self.log("train/skipped_steps", float(self.outcome.skipped_steps))
        else:
            self.mark_diverged(reason)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # enough to rebuild the model without the run directory (qknorm-probe, interop)
        checkpoint["qknorm_config"] = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        checkpoint["qknorm_vocab_size"] = self.model.vocab_size
        checkpoint["qknorm_outcome"] = outcome_record(self.outcome, self.initial_loss,
                                                      self.earlier_s + time.perf_counter() - self.run_t0, self.val_time_s,
                                                      self.started_at)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.initial_loss = restore_outcome(self.outcome, checkpoint)
        saved = checkpoint.get("qknorm_outcome", {})
        self.earlier_s, self.val_time_s = saved.get("elapsed_s", 0.0), saved.get("val_time_s", 0.0)
        self.started_at = saved.get("started_at", self.started_at)

    def fit_result(self) -> dict:
        """What the summary needs from this process's fit (read back by the launching process, which
        under spawn-based DDP is not the one that trained)."""
        o = self.outcome
        fingerprint = callbacks_fingerprint(self.trainer.callbacks)  # type: ignore[attr-defined]  # Trainer's stubs
        return {"status": o.status, "reason": o.reason, "step": o.step, "skipped_steps": o.skipped_steps,
                "val_history": o.val_history, "initial_loss": self.initial_loss, "global_step": self.global_step,
                "stability": fingerprint, "val_time_s": round(self.val_time_s, 3), "val_tokens": self.val_tokens,
                **self.train_device}

    def mark_diverged(self, reason: str) -> None:
        if self.outcome.status == "running":
            self.outcome.status, self.outcome.reason, self.outcome.step = "diverged", reason, self.global_step
        self.trainer.should_stop = True

    def configure_optimizers(self):
        opt, sched = optimizer_and_schedule(self.model, self.cfg, on_cuda=self.device.type == "cuda")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation: loss per token and bits per byte ---------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
        self._val_t0 = time.perf_counter()

    def _val_batch_sums(self, x, y) -> torch.Tensor:
        return val_batch_sums(self.model, x, y, self.token_bytes)  # type: ignore[arg-type]  # a registered buffer

    def _val_metrics(self, sums: torch.Tensor) -> tuple[float, float] | None:
        nats, tokens, nbytes = (float(v) for v in self.trainer.strategy.reduce(sums, reduce_op="sum"))
        self.val_tokens = int(tokens)
        return (nats / tokens, nats / (math.log(2) * nbytes)) if tokens else None

    def validation_step(self, batch, batch_idx):
        self._val_sums += self._val_batch_sums(*batch)

    def on_validation_epoch_end(self) -> None:
        assert self._val_sums is not None  # set by on_validation_epoch_start
        self.val_time_s += time.perf_counter() - self._val_t0
        metrics = self._val_metrics(self._val_sums)
        if metrics is None:
            return
        loss, bpb = metrics
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/bpb", bpb, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.outcome.val_history.append((self.global_step, loss, bpb))

    @torch.no_grad()
    def _validate_now(self) -> None:
        """The validation pass outside Lightning's loop (see on_train_start)."""
        t0 = time.perf_counter()
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # under the precision Lightning's own validation runs in (bf16 or fp16 autocast in a mixed-precision
        # run): a hook is outside it, and this validation must score as the ones before and after the resume
        with self.trainer.precision_plugin.val_step_context():
            for x, y in self.trainer.datamodule.val_dataloader():  # type: ignore[attr-defined]
                sums += self._val_batch_sums(x.to(self.device), y.to(self.device))
        self.model.train()
        self.val_time_s += time.perf_counter() - t0
        metrics = self._val_metrics(sums)
        if metrics is None:
            return
        self.outcome.val_history.append((self.global_step, *metrics))
        for logger in self.trainer.loggers:  # at global_step - 1, where Lightning logs epoch-end validation
            logger.log_metrics({"val/loss": metrics[0], "val/bpb": metrics[1]}, step=self.global_step - 1)
