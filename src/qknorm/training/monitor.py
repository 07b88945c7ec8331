"""Stability instrumentation: the attention-logit monitor and divergence detection.

The monitor stays off the hot path: every N steps and at the last step it runs the model once, in eval
mode and without gradients, on a fixed probe batch (the first held-out windows) through the explicit attention path,
which exposes every logit whatever path training uses. Each record is appended to
`<run>/stability.jsonl` (one JSON object per monitored step, per-head values as lists) and the same
numbers go to TensorBoard with stable tags (`stability/layer{L}/...`, `stability/layer{L}/head{H}/...`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from ..config import DivergenceConfig, MonitorConfig
from ..model.roles import roles
from ..utils.files import atomic_write_bytes

FP16_MAX = 65504.0
# Attention entropy is judged on query rows that see at least this many keys: a row with n visible keys
# has entropy at most ln n, so the first rows (ln 2, ln 3, ...) would otherwise set the minimum.
ENTROPY_MIN_KEYS = 16
COLLAPSED_WEIGHT = 0.99  # a row whose largest attention weight exceeds this attends to one key
# Gu et al. 2025 ("When Attention Sink Emerges in Language Models"): a head has a sink on the first token when
# its mean attention weight on that token, over the query rows, exceeds epsilon; their metric Sink_1^epsilon
# is the share of heads (over layers and heads) that do, with epsilon = 0.3
SINK_EPSILON = 0.3


def kurtosis(x: torch.Tensor) -> float:
    """E[(x - mean)^4] / Var(x)^2 over every value of x (a Gaussian gives 3): the outlier measure of Bondarenko
    et al. 2023 for a layer's activations, which a few massive activations (Sun et al. 2024) drive far up."""
    x = x.double().flatten()
    squares = (x - x.mean()).square_()  # in place, and squared twice rather than pow(4): half the time
    var = squares.mean()
    return float(squares.square_().mean() / var.square()) if var > 0 else math.nan


def _per_head_masked(values: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """values [B,H,T,T] over the causal entries only -> [H]."""
    if reduce == "max":
        return values.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))
    total = values.masked_fill(~mask, 0.0).sum(dim=(0, 2, 3))
    return total / (mask.sum() * values.shape[0])


class StabilityProbe:
    """Collects per-layer statistics from `Attention.forward` (see AttentionProbe)."""

    def __init__(self) -> None:
        self.layers: dict[int, dict] = {}

    def on_attention(self, layer: int, t: dict) -> None:
        mask = t["mask"]
        logits, raw, weights = t["logits"], t["raw_scores"], t["weights"]
        # entropy / ln(visible keys): 1 for uniform attention, 0 for one key; over rows with enough keys
        visible = mask.sum(-1)
        rows = visible >= min(ENTROPY_MIN_KEYS, int(visible.max()))
        entropy = -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1)[..., rows]  # [B,H,rows]
        entropy_norm = entropy / torch.log(visible[rows].to(entropy.dtype)).clamp_min(math.log(2))
        collapsed = (weights.amax(-1)[..., rows] > COLLAPSED_WEIGHT).to(entropy.dtype)
        # the attention weight on the first token, mean over the batch and every query row (each row sees it)
        first_token = weights[..., 0].mean(dim=(0, 2))
        q, k = t["q"].float(), t["k"].float()  # [B,T,H,D] after norm and RoPE
        groups = q.shape[2] // k.shape[2]
        kk = k.repeat_interleave(groups, dim=2) if groups > 1 else k
        qn = torch.nn.functional.normalize(q, dim=-1).transpose(1, 2)
        kn = torch.nn.functional.normalize(kk, dim=-1).transpose(1, 2)
        cosine = qn @ kn.transpose(-1, -2)

        def rms(x):  # [B,T,H,D] -> [H]
            return x.float().pow(2).mean(dim=(0, 1, 3)).sqrt()

        raw_max = _per_head_masked(raw.abs(), mask, "max")
        self.layers[layer] = {
            "max_logit": _per_head_masked(logits.abs(), mask, "max"),
            # a soft-capped model's logits before the cap, which the cap keeps below c whatever grows under it
            **({"max_logit_precap": _per_head_masked(t["precap_logits"].abs(), mask, "max")} if "precap_logits" in t else {}),
            "mean_abs_logit": _per_head_masked(logits.abs(), mask, "mean"),
            "raw_qk_max": raw_max,
            "fp16_headroom": FP16_MAX / raw_max.clamp_min(1e-30),
            "entropy_norm_mean": entropy_norm.mean(dim=(0, 2)),
            "entropy_norm_min": entropy_norm.amin(dim=(0, 2)),
            "collapsed_rows": collapsed.mean(dim=(0, 2)),  # fraction of those rows
            "q_rms_proj": rms(t["q_proj"]), "k_rms_proj": rms(t["k_proj"]),
            "q_rms": rms(t["q"]), "k_rms": rms(t["k"]),
            "qk_cosine": _per_head_masked(cosine, mask, "mean"),
            # L2 norm of each token's whole q|k|v projection output, averaged over tokens
            "qkv_out_l2": sum(t[n].float().pow(2).sum(dim=(2, 3)) for n in ("q_proj", "k_proj", "v_proj")).sqrt().mean(),
            "first_token_mass": first_token,
            "sink_rate": (first_token > SINK_EPSILON).to(first_token.dtype).mean(),  # share of this layer's heads
            # each row's total weight on the keys, mean over rows: 1 for softmax; 1 minus what a learned sink (or
            # off-by-one's zero logit) takes, the row's weight on no token at all; sigmoid attention's free total
            "row_mass": weights.sum(-1).mean(dim=(0, 2)),
        }
        if "gate" in t:  # the output gate's mean score per head (Qiu et al. 2025 find it sparse, near 0)
            self.layers[layer]["gate_mean"] = t["gate"].float().mean(dim=(0, 1, 3))


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf  # a torn line from a killed writer is dropped


def _significant(v: float) -> float:
    return float(f"{v:.7g}")  # fp32's precision, relative: a tiny value stays itself, never 0


def _to_list(x):
    if isinstance(x, torch.Tensor):
        return [_significant(float(v)) for v in x.flatten()] if x.numel() > 1 else _significant(float(x))
    return x


class StabilityMonitor(pl.Callback):
    def __init__(self, cfg: MonitorConfig, run_dir: Path, resume_step: int = 0):
        self.cfg, self.path = cfg, Path(run_dir) / "stability.jsonl"
        if self.path.exists():
            # rows from after the checkpoint will be measured again: keep each step exactly once (a run started
            # again from scratch, resume_step 0, keeps none of its cut attempt's rows)
            keep = [line for line in self.path.read_text().splitlines() if _record_step(line) < resume_step]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())
        self.probe_batch: Optional[torch.Tensor] = None
        self._pre_step: Optional[dict[str, torch.Tensor]] = None
        self._layer_grad_norms: Optional[dict[int, float]] = None
        self._last_measured: Optional[int] = None
        self.fingerprint: dict = {}
        self.clipped_head_steps = 0  # QK-Clip: heads clipped, summed over every step so far

    # -- checkpointed state: the fingerprint so far ------------------------------------------------
    def state_dict(self):
        return {"fingerprint": self.fingerprint, "clipped_head_steps": self.clipped_head_steps}

    def load_state_dict(self, state):
        self.fingerprint = dict(state.get("fingerprint", {}))
        self.clipped_head_steps = int(state.get("clipped_head_steps", 0))

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.probe_batch is None:
            self.take_probe_batch(trainer.datamodule.data.tokenized.val_tokens(), trainer.datamodule.cfg.seq_len)

    def take_probe_batch(self, tokens, seq_len: int) -> None:
        """The first `probe_sequences` windows of the held-out tokens: the same text at every record."""
        n = min(self.cfg.probe_sequences, (len(tokens) - 1) // seq_len)
        self.probe_batch = torch.from_numpy(np.asarray(tokens[: n * seq_len]).astype(np.int64).reshape(n, seq_len))

    def _due(self, trainer, step: int) -> bool:
        # the last step too: the fingerprint's final_* values are the trained model's
        every = self.cfg.every_n_steps
        if every is None:
            raise ValueError("callbacks.monitor.every_n_steps is unresolved: the monitor needs a config from "
                             "load_run_config (resolve_schedule makes the interval concrete)")
        return step % every == 0 or step == trainer.max_steps - 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # global_step is the index of the step about to be taken
        if not self._due(trainer, trainer.global_step):
            return
        model = pl_module.model
        # the update/weight ratio is over weight matrices (and the embedding), by their declared role: a
        # per-head gain or temperature has two or more dimensions too, but is not a matrix
        matrices = {n for n, role in roles(model).items() if role in ("matrix", "embedding")}
        self._pre_step = {n: p.detach().clone() for n, p in model.named_parameters() if n in matrices}
        norms = {}
        for i, block in enumerate(model.blocks):
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            norms[i] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        self._layer_grad_norms = norms

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step just taken
        # QK-Clip ran in the step (training/qk_clip.py): count its heads every step, not only at records
        self.clipped_head_steps += sum(int((a.qk_clip_gamma < 1.0).sum()) for a in pl_module.model.attention_layers()
                                       if a.qk_clip_gamma is not None)
        if not self._due(trainer, step) or self._pre_step is None:
            return
        self._record(trainer, pl_module, step)
        self._pre_step, self._layer_grad_norms = None, None

    def on_train_end(self, trainer, pl_module):
        # a run stopped before max_steps (diverged, out of time): measure where it ended
        step = trainer.global_step - 1
        if step >= 0 and step != self._last_measured and self.probe_batch is not None:
            self._record(trainer, pl_module, step)

    def _record(self, trainer, pl_module, step: int) -> None:
        record = self.measure(pl_module, step)
        if trainer.is_global_zero:
            self._write(trainer, record)
        self._update_fingerprint(record)
        self._last_measured = step
        # for DivergenceDetector's max_logit early stop
        pl_module.last_max_logit = record_peak_logit(record)

    @torch.no_grad()
    def measure(self, pl_module, step: int) -> dict:
        if self.probe_batch is None:
            raise RuntimeError("StabilityMonitor.measure before setup: no probe batch yet")
        model = pl_module.model
        probe = StabilityProbe()
        outputs: dict[str, list] = {"attn_proj_out_l2": [], "mlp_out_l2": [], "residual_max_abs": [], "residual_kurtosis": []}
        hooks = []

        def norm_hook(name):
            return lambda m, i, o: outputs[name].append(float(o.float().norm(dim=-1).mean()))

        def residual_hook(m, i, o):  # the residual stream after the block: massive activations (Sun et al. 2024)
            outputs["residual_max_abs"].append(float(o.detach().abs().max()))
            outputs["residual_kurtosis"].append(kurtosis(o.detach()))

        attns = model.attention_layers()
        for block in model.blocks:
            hooks += [block.attn.proj.register_forward_hook(norm_hook("attn_proj_out_l2")),
                      block.mlp.fc2.register_forward_hook(norm_hook("mlp_out_l2")),
                      block.register_forward_hook(residual_hook)]
        was_training = model.training
        model.eval()
        for a in attns:
            a.probe = probe
        try:
            hidden = model(self.probe_batch.to(pl_module.device), return_hidden=True)
            logits = model.logits(hidden)
        finally:
            for a in attns:
                a.probe = None
            for h in hooks:
                h.remove()
            model.train(was_training)
        log_z = torch.logsumexp(logits, dim=-1)
        layers = []
        for i, a in enumerate(attns):
            stats = {k: _to_list(v) for k, v in probe.layers[i].items()}
            stats.update(layer=i, attn_proj_out_l2=outputs["attn_proj_out_l2"][i],
                         mlp_out_l2=outputs["mlp_out_l2"][i], residual_max_abs=outputs["residual_max_abs"][i],
                         residual_kurtosis=outputs["residual_kurtosis"][i], logit_bound=a.logit_bound())
            for name in ("q_norm", "k_norm", "v_norm"):
                norm = getattr(a, name)
                if norm is not None and norm.weight is not None:
                    stats[f"{name}_gain_l2"] = float(norm.effective_gain().norm())
                    stats[f"{name}_gain_absmax"] = float(norm.effective_gain().abs().max())
            if a.temperature.param is not None:
                stats["temperature"] = _to_list(a.temperature().detach())
            if a.qk_clip_gamma is not None:  # QK-Clip at this step: each head's gamma (1: not clipped)
                stats["qk_clip_gamma"] = [_significant(float(g)) for g in a.qk_clip_gamma]
                stats["qk_clip_clipped_heads"] = int((a.qk_clip_gamma < 1.0).sum())
            if a.qk_clip_max_logit is not None:  # each head's max logit S_h on the step's batch, as the clip measured it
                stats["qk_clip_max_logit"] = [_significant(float(v)) for v in a.qk_clip_max_logit]
            if a.sink is not None:
                stats["sink_logit"] = _to_list(a.sink.logit.detach())
            if a.ssmax is not None:
                stats["ssmax_s"] = _to_list(a.ssmax.s.detach())
            if self._layer_grad_norms is not None:
                stats["grad_norm"] = self._layer_grad_norms[i]
            if self._pre_step is not None:
                prefix = f"blocks.{i}."
                num = den = 0.0
                for n, p in model.named_parameters():
                    if n.startswith(prefix) and n in self._pre_step:
                        num += float((p.detach() - self._pre_step[n]).pow(2).sum())
                        den += float(self._pre_step[n].pow(2).sum())
                stats["update_ratio"] = math.sqrt(num / den) if den > 0 else 0.0
            layers.append(stats)
        grad = pl_module.last_grad_norm
        first_token = torch.stack([probe.layers[i]["first_token_mass"] for i in range(len(attns))])  # [L, H]
        record = {
            "step": step,
            "train_loss": pl_module.last_train_loss,
            "grad_norm": float(grad) if grad is not None else None,
            "output_logit_max": float(logits.max()), "output_logit_mean": float(logits.mean()),
            "output_log_z_mean": float(log_z.mean()),
            # Gu et al.'s Sink_1^epsilon: the share of all heads, over layers, with a sink on the first token
            "sink_rate": float((first_token > SINK_EPSILON).float().mean()),
            "first_token_mass_mean": float(first_token.mean()),
            "row_mass_mean": float(torch.stack([probe.layers[i]["row_mass"] for i in range(len(attns))]).mean()),
            "residual_max_abs": max(outputs["residual_max_abs"]),
            "residual_kurtosis": max(outputs["residual_kurtosis"]),  # the most heavy-tailed layer's
            "layers": layers,
        }
        if any("qk_clip_clipped_heads" in layer for layer in layers):
            # this step's clipped heads over all layers, and every step's since the run began (head-steps)
            record["qk_clip_clipped_heads"] = sum(layer.get("qk_clip_clipped_heads", 0) for layer in layers)
            record["qk_clip_clipped_head_steps"] = self.clipped_head_steps
        return record

    def _write(self, trainer, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        # the run's numbers (QK-Clip's counts are ints; the step is the x axis, not a series)
        flat = {f"stability/{k}": float(v) for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # inf and nan too: a blow-up
        for layer in record["layers"]:
            for key, value in layer.items():
                if key == "layer":
                    continue
                base = f"stability/layer{layer['layer']}"
                if isinstance(value, list):
                    flat[f"{base}/{key}_max"] = max(value)
                    for h, v in enumerate(value):
                        flat[f"{base}/head{h}/{key}"] = v
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    flat[f"{base}/{key}"] = float(value)
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "add_scalar"):  # TensorBoard
                for tag, value in flat.items():
                    logger.experiment.add_scalar(tag, value, step)

    def _update_fingerprint(self, record: dict) -> None:
        fp = self.fingerprint

        def over_layers(key: str, reduce, layers=record["layers"]) -> float:
            """`reduce` over heads (values are per-head lists, or one value with a single head) and layers."""
            return reduce(reduce(v) if isinstance(v, list) else v for v in (layer[key] for layer in layers))

        layer0 = over_layers("max_logit", max, record["layers"][:1])
        overall = over_layers("max_logit", max)
        headroom = over_layers("fp16_headroom", min)
        # a NaN (a diverged model) never becomes a peak or a minimum; an inf logit does
        if layer0 >= fp.get("peak_layer0_max_logit", -1.0):
            fp["peak_layer0_max_logit"], fp["peak_layer0_step"] = layer0, record["step"]
        if overall >= fp.get("peak_max_logit", -1.0):
            fp["peak_max_logit"], fp["peak_max_logit_step"] = overall, record["step"]
        if not math.isnan(headroom):
            fp["min_fp16_headroom"] = min(headroom, fp.get("min_fp16_headroom", math.inf))
        if "max_logit_precap" in record["layers"][0]:
            precap = over_layers("max_logit_precap", max)
            if precap >= fp.get("peak_max_logit_precap", -1.0):
                fp["peak_max_logit_precap"], fp["peak_max_logit_precap_step"] = precap, record["step"]
        if "qk_clip_clipped_head_steps" in record:
            fp["qk_clip_clipped_head_steps"] = record["qk_clip_clipped_head_steps"]
        fp["first_layer0_max_logit"] = fp.get("first_layer0_max_logit", layer0)
        fp["final_step"] = record["step"]
        fp["final_layer0_max_logit"] = layer0
        fp["final_entropy_norm_min"] = over_layers("entropy_norm_min", min)
        fp["final_entropy_norm_mean"] = over_layers("entropy_norm_mean", min)  # the least spread-out head
        fp["final_collapsed_rows"] = over_layers("collapsed_rows", max)  # the most collapsed head
        for key in ("sink_rate", "first_token_mass_mean", "row_mass_mean", "residual_max_abs", "residual_kurtosis"):
            fp[f"final_{key}"] = record[key]
        fp["monitored_steps"] = fp.get("monitored_steps", 0) + 1


class DivergenceDetector(pl.Callback):
    """Stops a run whose loss left the initial loss behind or spikes for good; counts single spikes."""

    def __init__(self, cfg: DivergenceConfig, warmup_steps: int = 0):
        self.cfg = cfg
        self.warmup_steps = warmup_steps  # the early stop after_warmup_margin starts after these steps
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.spikes = 0
        self._over_margin = 0
        self._spiking = 0
        self._after_warmup = 0  # consecutive steps over after_warmup_margin
        self._over_min = 0  # consecutive steps over running_min_factor x the running minimum
        self._running_min = math.inf

    def state_dict(self):
        return {"window": list(self.window), "spikes": self.spikes, "over_margin": self._over_margin, "spiking": self._spiking,
                "after_warmup": self._after_warmup, "over_min": self._over_min, "running_min": self._running_min}

    def load_state_dict(self, state):
        self.window = deque(state.get("window", []), maxlen=self.cfg.spike_window)
        self.spikes, self._over_margin, self._spiking = state.get("spikes", 0), state.get("over_margin", 0), state.get("spiking", 0)
        self._after_warmup, self._over_min = state.get("after_warmup", 0), state.get("over_min", 0)
        self._running_min = state.get("running_min", math.inf)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = pl_module.last_train_loss
        if loss is None or not math.isfinite(loss) or pl_module.initial_loss is None:
            return
        limit = pl_module.initial_loss + self.cfg.loss_margin
        self._over_margin = self._over_margin + 1 if loss > limit else 0
        if self._over_margin >= self.cfg.patience:
            pl_module.mark_diverged(f"loss {loss:.4g} above the initial loss + margin ({limit:.4g}) for {self.cfg.patience} steps")
            return
        if self._doomed(trainer.global_step - 1, loss, pl_module):
            return
        spike = False
        if len(self.window) >= min(32, self.cfg.spike_window):
            values = np.asarray(self.window)
            spike = loss > values.mean() + self.cfg.spike_sigma * max(values.std(), 1e-8)
        if spike:
            self.spikes += 1
            self._spiking += 1
            if self._spiking >= self.cfg.patience:
                pl_module.mark_diverged(f"loss spike sustained for {self.cfg.patience} steps "
                                        f"(> {self.cfg.spike_sigma} sigma over the last {len(self.window)} steps)")
        else:
            self._spiking = 0
            self.window.append(loss)  # spikes do not widen their own reference window

    def _doomed(self, step: int, loss: float, pl_module) -> bool:
        """The early stops for LR searches (DivergenceConfig): True when one stopped the run."""
        cfg = self.cfg
        patience = cfg.patience if cfg.early_stop_patience is None else cfg.early_stop_patience
        if cfg.after_warmup_margin is not None and step >= self.warmup_steps:
            limit = pl_module.initial_loss + cfg.after_warmup_margin
            self._after_warmup = self._after_warmup + 1 if loss > limit else 0
            if self._after_warmup >= patience:
                pl_module.mark_diverged(f"early stop: loss {loss:.4g} above the initial loss + {cfg.after_warmup_margin:g} "
                                        f"({limit:.4g}) after the warmup for {patience} steps")
                return True
        if cfg.running_min_factor is not None:
            self._running_min = min(self._running_min, loss)
            limit = cfg.running_min_factor * self._running_min
            self._over_min = self._over_min + 1 if loss > limit else 0
            if self._over_min >= patience:
                pl_module.mark_diverged(f"early stop: loss {loss:.4g} above {cfg.running_min_factor:g}x its running "
                                        f"minimum ({self._running_min:.4g}) for {patience} steps")
                return True
        # the monitor (before this callback in the list) leaves its newest max logit on the module
        logit = getattr(pl_module, "last_max_logit", None)
        if cfg.max_logit is not None and logit is not None and logit > cfg.max_logit:
            pl_module.mark_diverged(f"early stop: max attention logit {logit:.4g} above {cfg.max_logit:g}")
            return True
        return False


def record_peak_logit(record: dict) -> Optional[float]:
    """A monitor record's largest attention logit, over layers and heads, for the max_logit early stop: the logit
    before a soft-cap where the record has it (`max_logit_precap`), since after the cap it never exceeds the cap
    and a threshold above it would never fire; None for a record without layers."""
    values = [layer.get("max_logit_precap", layer["max_logit"]) for layer in record["layers"]]
    return max((max(v) if isinstance(v, list) else v for v in values), default=None)


def callbacks_fingerprint(callbacks) -> dict:
    """The run's stability fingerprint for its summary: the monitor's values and the detector's spike count."""
    fingerprint: dict[str, Any] = {}
    for cb in callbacks:
        fingerprint.update(getattr(cb, "fingerprint", {}))
        if hasattr(cb, "spikes"):
            fingerprint["loss_spikes"] = cb.spikes
    return fingerprint
