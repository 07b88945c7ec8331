"""Typed run configuration: the composed Hydra config is validated here, once, into frozen dataclasses.

Nothing downstream reads raw YAML or guesses defaults. Every error names the config key and, where the
key has a fixed set of values, the allowed ones, so a bad sweep point fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional


class QknormError(Exception):
    """An error caused by the user's input (config, data, paths): reported as one line, no traceback."""


class ConfigError(QknormError):
    pass


# --------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------

QKNormKind = Literal["none", "l2", "rms", "layernorm"]
QKNormScope = Literal["head", "head_separate", "layer"]
GainKind = Literal["none", "vector", "zero_centered"]

# Lightning's seed_everything refuses seeds outside numpy's uint32 seed range (a crash after the run started)
MAX_SEED = 2**32 - 1
# the fewest tokens a validation capped by data.val_token_ratio reads: below this a short interval's loss
# would rest on a few hundred tokens
VAL_MIN_TOKENS = 8192
# the spike test compares a loss with the mean and std of the last spike_window losses: the std of fewer
# than 8 losses is too noisy to call anything a spike
MIN_SPIKE_WINDOW = 8
# the largest vocabulary: SentencePiece numbers its pieces with int32 (the token cache stores ids as uint16
# up to 65536 pieces, uint32 above)
MAX_VOCAB = 2**31 - 1


@dataclass(frozen=True)
class ScaleConfig:
    """Attention temperature: the factor the logits q.k are multiplied by.

    kind: inv_sqrt_head_dim (Vaswani), inv_head_dim (muP), constant (modded-nanogpt's 0.12, nGPT's
    sqrt(d_h)), or learnable (Henry et al. 2020's g, Swin V2's logit scale).
    """

    kind: Literal["inv_sqrt_head_dim", "inv_head_dim", "constant", "learnable"] = "inv_sqrt_head_dim"
    value: Optional[float] = None  # the constant, or the learnable scale's init when init=value
    # learnable only:
    init: Literal["henry", "sqrt_head_dim", "inv_sqrt_head_dim", "swin", "value"] = "inv_sqrt_head_dim"
    per: Literal["layer", "head"] = "layer"
    parametrization: Literal["linear", "log"] = "linear"  # Henry learns g itself; Swin V2 learns log g
    max: Optional[float] = None  # Swin V2 clamps the scale at 100

    def validate(self, path: str) -> None:
        if self.kind == "constant":
            _require(self.value is not None, f"{path}.value", "must be set when scale.kind=constant")
        if self.value is not None:
            _require(self.value > 0 and math.isfinite(self.value), f"{path}.value", f"must be a positive number, got {self.value}")
        if self.kind == "learnable" and self.init == "value":
            _require(self.value is not None, f"{path}.value", "must be set when scale.init=value")
        # a setting that would be read by no code is refused rather than silently ignored
        _require(self.value is None or self.kind == "constant" or (self.kind == "learnable" and self.init == "value"),
                 f"{path}.value", f"only applies to scale.kind=constant or to kind=learnable with init=value, got kind={self.kind}"
                 + (f" with init={self.init}" if self.kind == "learnable" else ""))
        if self.kind != "learnable":
            defaults = ScaleConfig()
            for key in ("init", "per", "parametrization"):
                _require(getattr(self, key) == getattr(defaults, key), f"{path}.{key}",
                         f"only applies to scale.kind=learnable, got kind={self.kind}")
        if self.max is not None:
            _require(math.isfinite(self.max) and self.max > 0, f"{path}.max", f"must be null or a positive number, got {self.max}")
            _require(self.kind == "learnable", f"{path}.max", "only applies to scale.kind=learnable")


@dataclass(frozen=True)
class AttentionConfig:
    """Every attention stabilizer as one independent axis (see conf/attention/ for named presets)."""

    qk_norm: QKNormKind = "none"
    scope: QKNormScope = "head"
    gain: GainKind = "vector"
    gain_weight_decay: bool = False
    layernorm_bias: bool = False
    norm_eps: float = 1e-6
    position: Literal["before_rope", "after_rope"] = "before_rope"
    targets: Literal["qk", "qkv"] = "qk"
    pre_attn_norm: bool = True  # QKV-Norm (Rybakov et al. 2024) drops the block's pre-attention norm
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    softcap: Optional[float] = None  # Gemma 2: 50, Grok-1: 30
    final_logit_softcap: Optional[float] = None  # Gemma 2: 30
    qkv_bias: bool = False  # Qwen2
    qk_clip_tau: Optional[float] = None  # Kimi K2 QK-Clip: 100
    # head: each head h whose max logit S_h exceeded tau is scaled by tau / S_h (Kimi K2); layer: every head of
    # a layer by tau / max_h S_h once any exceeded (the coarser rule Kimi K2 compares against). S_h is the logit
    # before a soft-cap: with both, the clip holds the logit the cap bends, and fires at tau > softcap too
    qk_clip_scope: Literal["head", "layer"] = "head"
    # Rybakov et al. 2024's other baselines (conf/attention/ has one preset each):
    proj_fc2_norm: Literal["none", "layernorm"] = "none"  # QK_FC_norm: LayerNorm on the Proj and FC2 outputs
    sigma_reparam: bool = False  # Zhai et al. 2023: every block matrix W -> gamma / sigma(W) * W
    layerscale_init: Optional[float] = None  # Touvron et al. 2021: x + diag(lambda) f(x), lambda = init
    soft_temp: Optional[float] = None  # beta in softmax(beta * z)
    soft_clip: Optional[tuple[float, float]] = None  # (zeta, gamma): clip((zeta - gamma) softmax(z) + gamma, 0, 1)
    # Gated attention (Qiu et al. 2025; Qwen3-Next): y * sigmoid(x W_g) before the output projection, one gate
    # per head (headwise) or per channel (elementwise)
    output_gate: Literal["none", "headwise", "elementwise"] = "none"
    # logits -> weights: softmax; off_by_one (Miller 2023: +1 in the denominator); learned_sink (gpt-oss: a
    # learned logit per head in the denominator); sigmoid (Ramapuram et al. 2024: sigmoid(z - log n), unnormalized)
    softmax: Literal["softmax", "off_by_one", "learned_sink", "sigmoid"] = "softmax"
    length_scale: Literal["none", "ssmax"] = "none"  # SSMax (Nakanishi 2025): q times s log n, s learned per head
    backend: Literal["auto", "sdpa", "flex", "explicit"] = "auto"

    def validate(self, path: str) -> None:
        for key in ("softcap", "final_logit_softcap", "qk_clip_tau", "layerscale_init", "soft_temp"):
            v = getattr(self, key)
            if v is not None:
                _require(math.isfinite(v) and v > 0, f"{path}.{key}", f"must be null or a positive number, got {v}")
        _require(math.isfinite(self.norm_eps) and self.norm_eps > 0, f"{path}.norm_eps", f"must be a positive number, got {self.norm_eps}")
        _require(not self.gain_weight_decay or (self.qk_norm != "none" and self.gain != "none"), f"{path}.gain_weight_decay",
                 f"decays the QK-norm gains, and there are none (qk_norm={self.qk_norm}, gain={self.gain})")
        if self.qk_norm == "none":
            _require(self.targets == "qk", f"{path}.targets", "targets=qkv needs a qk_norm (one of l2, rms, layernorm)")
            _require(self.layernorm_bias is False, f"{path}.layernorm_bias", "only applies to qk_norm=layernorm")
            # read by the QK-norm alone: a setting without one would change the run's identity, not its model
            defaults = AttentionConfig()
            for key in ("scope", "gain", "position", "norm_eps"):
                _require(getattr(self, key) == getattr(defaults, key), f"{path}.{key}",
                         f"only applies with a qk_norm (one of l2, rms, layernorm), got qk_norm=none and {key}={getattr(self, key)}")
        # head_separate differs from head only by a gain per head: without a gain the two are one model
        _require(not (self.scope == "head_separate" and self.gain == "none"), f"{path}.scope",
                 "head_separate gives each head its own gain, and gain=none has none; allowed with gain=none: head, layer")
        if self.qk_norm != "layernorm":
            _require(not self.layernorm_bias, f"{path}.layernorm_bias", f"only applies to qk_norm=layernorm, got qk_norm={self.qk_norm}")
        if self.qk_clip_tau is not None:
            _require(self.qk_norm == "none", f"{path}.qk_clip_tau",
                     f"QK-Clip rescales W_q/W_k, which qk_norm={self.qk_norm} cancels; use it with qk_norm=none")
            _require(not self.sigma_reparam, f"{path}.qk_clip_tau",
                     "QK-Clip rescales W_q/W_k, which sigma_reparam's gamma / sigma(W) cancels")
        else:
            _require(self.qk_clip_scope == "head", f"{path}.qk_clip_scope",
                     "only applies with attention.qk_clip_tau set (QK-Clip is off)")
        if self.softcap is not None:
            _require(self.backend != "sdpa", f"{path}.backend",
                     "sdpa cannot apply a logit soft-cap; allowed with softcap: auto, flex, explicit")
        else:  # FlexAttention runs only the soft-capped attention here: without a cap, flex would quietly be SDPA
            _require(self.backend != "flex", f"{path}.backend",
                     "flex computes only soft-capped attention (set attention.softcap); allowed without softcap: auto, sdpa, explicit")
        if self.soft_clip is not None:
            zeta, gamma = self.soft_clip
            _require(math.isfinite(zeta) and math.isfinite(gamma) and zeta >= 1.0 and gamma <= 0.0, f"{path}.soft_clip",
                     f"must be [zeta, gamma] with zeta >= 1 and gamma <= 0 (Rybakov et al.: [1.03, -0.03]), got {list(self.soft_clip)}")
            _require(self.backend in ("auto", "explicit"), f"{path}.backend",
                     "only the explicit path clips the softmax; allowed with soft_clip: auto, explicit")
        if self.softmax == "sigmoid":
            _require(self.backend in ("auto", "explicit"), f"{path}.backend",
                     "no fused kernel computes sigmoid attention here; allowed with softmax=sigmoid: auto, explicit")
        if self.softmax != "softmax" and self.softcap is not None:
            _require(self.backend in ("auto", "explicit"), f"{path}.backend",
                     f"the soft-cap kernels normalize with a plain softmax; allowed with softcap and softmax={self.softmax}: "
                     "auto, explicit")
        self.scale.validate(f"{path}.scale")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no grouping)
    # pre_norm: x + f(norm(x)); reordered_norm (OLMo 2): x + norm(f(x)), no norm on the sublayer inputs
    block: Literal["pre_norm", "reordered_norm"] = "pre_norm"
    head_dim: Optional[int] = None  # None: d_model // n_heads
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    mlp_hidden: Optional[int] = None  # None: 8/3 d (swiglu, rounded to 32) or 4 d (gelu)
    tie_embeddings: bool = True
    init: Literal["wortsman", "gpt2"] = "wortsman"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # the training loss as one compiled graph: "auto" compiles on a GPU, where it is 1.7-2x faster
    # (benchmarks/RESULTS.md), and not on a CPU, where compiling costs more than a short run gains
    compile: Literal["auto", True, False] = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def validate(self, path: str) -> None:
        for key in ("d_model", "n_layers", "n_heads"):
            _require(getattr(self, key) >= 1, f"{path}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.head_dim is None:
            _require(self.d_model % self.n_heads == 0, f"{path}.n_heads",
                     f"n_heads={self.n_heads} must divide d_model={self.d_model} (or set {path}.head_dim)")
        else:
            _require(self.head_dim >= 2, f"{path}.head_dim", f"must be >= 2, got {self.head_dim}")
        _require(self.dim_head % 2 == 0, f"{path}.head_dim", f"RoPE needs an even head_dim, got {self.dim_head}")
        if self.n_kv_heads is not None:
            _require(self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0, f"{path}.n_kv_heads",
                     f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.mlp_hidden is not None:
            _require(self.mlp_hidden >= 1, f"{path}.mlp_hidden", f"must be >= 1, got {self.mlp_hidden}")
        _require(math.isfinite(self.norm_eps) and self.norm_eps > 0, f"{path}.norm_eps", f"must be a positive number, got {self.norm_eps}")
        # RoPE rotates pair i at theta^(-2i/d): at 1 every pair turns at the same rate, below 1 the
        # wavelengths shrink instead of growing, so no pair carries long-range position
        _require(math.isfinite(self.rope_theta) and self.rope_theta > 1, f"{path}.rope_theta",
                 f"must be a number above 1 (the base of RoPE's wavelengths), got {self.rope_theta}")


# The data keys each corpus reader reads (qknorm.data.corpora); the others are set only for their own sources.
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "val_plays": ("shakespeare",),
    "paths": ("text_files",), "glob": ("text_files",),
    "val_fraction": ("text_files", "hf_text"),
    **{key: ("hf_text",) for key in ("name", "config_name", "data_files", "split", "val_split", "text_field", "streaming",
                                      "max_tokens")},
}


@dataclass(frozen=True)
class DataConfig:
    source: Literal["shakespeare", "hf_text", "text_files"] = "shakespeare"
    seq_len: int = 256
    batch_size: int = 32
    vocab_size: int = 2048
    tokenizer_max_chars: int = 20_000_000  # text sampled to train the tokenizer
    val_fraction: float = 0.05  # hf_text / text_files: share of documents held out
    val_max_tokens: Optional[int] = None  # cap on validation tokens (None: from val_token_ratio)
    # With val_max_tokens null, validate on at most this many tokens per token trained between two validations
    # (and at least VAL_MIN_TOKENS): a validation token costs about a third of a training token (a forward pass
    # only; 0.34-0.36 measured at nano and tiny), so 0.3 keeps validation near 10% of a run's time. null: the
    # whole held-out split at every validation (the default before; a short run then spent most of its time there)
    val_token_ratio: Optional[float] = 0.3
    cache_dir: str = "~/.cache/qknorm"
    # shakespeare
    val_plays: tuple[str, ...] = ("hamlet",)
    # text_files
    paths: tuple[str, ...] = ()
    glob: str = "**/*.txt"
    # hf_text
    name: Optional[str] = None
    config_name: Optional[str] = None
    data_files: Optional[tuple[str, ...]] = None
    split: str = "train"
    val_split: Optional[str] = None
    text_field: str = "text"
    streaming: bool = False
    max_tokens: Optional[int] = None  # approximate cap on training tokens read from the source
    # building the token cache (neither changes a token id or a batch; both are left out of a run's identity):
    workers: Optional[int] = None  # encoding processes (null: this machine's cores; 1: in this process)
    shard_tokens: int = 100_000_000  # tokens per cache file (uint16 ids: 200 MB)

    def validate(self, path: str) -> None:
        _require(self.seq_len >= 2, f"{path}.seq_len", f"must be >= 2, got {self.seq_len}")
        _require(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(260 <= self.vocab_size <= MAX_VOCAB, f"{path}.vocab_size",
                 f"must be in [260, {MAX_VOCAB}] (256 byte-fallback pieces + specials; SentencePiece numbers pieces "
                 f"with int32), got {self.vocab_size}")
        if self.workers is not None:
            _require(self.workers >= 1, f"{path}.workers", f"must be null (every core) or >= 1, got {self.workers}")
        _require(self.shard_tokens >= 1, f"{path}.shard_tokens", f"must be >= 1, got {self.shard_tokens}")
        # a count of characters sampled: at 0 the tokenizer has no text to learn from
        _require(self.tokenizer_max_chars >= 1, f"{path}.tokenizer_max_chars", f"must be >= 1, got {self.tokenizer_max_chars}")
        _require(0.0 < self.val_fraction < 1.0, f"{path}.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        # a window is seq_len + 1 tokens: a cap at or below seq_len leaves no window to train or validate on
        if self.val_max_tokens is not None:
            _require(self.val_max_tokens > self.seq_len, f"{path}.val_max_tokens", f"must exceed data.seq_len={self.seq_len}")
        if self.val_token_ratio is not None:
            _require(math.isfinite(self.val_token_ratio) and self.val_token_ratio > 0, f"{path}.val_token_ratio",
                     f"must be null (the whole held-out split) or a positive number, got {self.val_token_ratio}")
        if self.max_tokens is not None:
            _require(self.max_tokens > self.seq_len, f"{path}.max_tokens",
                     f"must exceed data.seq_len={self.seq_len}, got {self.max_tokens}")
        if self.source == "text_files":
            _require(len(self.paths) > 0, f"{path}.paths",
                     "data=text_files needs at least one file or folder, e.g. data.paths=[my_corpus/]")
        if self.source == "hf_text":
            _require(bool(self.name), f"{path}.name", "data=hf_text needs a dataset name or builder "
                     "(e.g. roneneldan/TinyStories, or text/json/parquet with data.data_files)")
        if self.source == "shakespeare":
            _require(len(self.val_plays) > 0, f"{path}.val_plays",
                     "data=shakespeare holds out at least one play for validation, e.g. data.val_plays=[hamlet]")
        if self.source == "hf_text" and self.val_split is not None:
            _require(self.val_split != self.split, f"{path}.val_split",
                     f"is the training split ({self.split}): validation would read the text it trains on; another split, "
                     "or null (documents held out of data.split by data.val_fraction)")
        # a key only another source reads would be ignored, yet make another run identity of the same model
        defaults = DataConfig()
        for key, sources in SOURCE_KEYS.items():
            if self.source not in sources:
                _require(getattr(self, key) == getattr(defaults, key), f"{path}.{key}",
                         f"only applies to data={' or data='.join(sources)}, got data={self.source}")
        # names and paths: what each one means is only known to the corpus reader, but a blank one is always
        # a mistake (an unset variable, a stray comma), never the current folder or a default
        for key in ("cache_dir", "glob", "split", "text_field"):
            _require_text(getattr(self, key), f"{path}.{key}")
        for key in ("name", "config_name", "val_split"):
            if getattr(self, key) is not None:
                _require_text(getattr(self, key), f"{path}.{key}", nullable=True)
        for key in ("val_plays", "paths"):
            for i, item in enumerate(getattr(self, key)):
                _require_text(item, f"{path}.{key}[{i}]")
        if self.data_files is not None:
            _require(len(self.data_files) > 0, f"{path}.data_files", "must be null or a list of at least one file")
            for i, item in enumerate(self.data_files):
                _require_text(item, f"{path}.data_files[{i}]")


# Muon's settings and their defaults: with optim.name=adamw they must stay at these (OptimConfig.validate)
MUON_DEFAULTS: dict[str, Any] = {"muon_split": "matrix", "adjust_lr_fn": "match_rms_adamw", "momentum": 0.95,
                                 "nesterov": True, "ns_steps": 5}


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-2  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # independent: decay by weight_decay * schedule(t), not by lr(t) * weight_decay (Wortsman et al. 2023, Fig. 6)
    independent_weight_decay: bool = False
    # whether the token embedding decays (with tied embeddings, the LM head with it): OLMo 2 (Team OLMo 2024)
    # takes the decay off the embedding, among its stability changes, so that its norm is not pulled down
    embedding_weight_decay: bool = True
    # Linear warmup as a fraction of trainer.max_steps (Wortsman et al. 2023 warm up for 5% of training),
    # so a short run still reaches its nominal peak LR; warmup_steps, when set, replaces the fraction.
    warmup_fraction: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    # the floor as an LR, replacing min_lr_ratio when set: Wortsman et al. 2023 end every run at 1e-5 whatever its
    # peak, so across an LR sweep the floor's share of the peak differs (min_lr_ratio keeps it the same)
    min_lr: Optional[float] = None
    grad_clip: Optional[float] = 1.0
    z_loss: float = 0.0  # coefficient of log^2 Z (Wortsman et al. 2023; PaLM: 1e-4)
    fused: Literal["auto", "on", "off"] = "auto"  # AdamW's fused kernel (Muon's AdamW groups too)
    # adamw: AdamW for every parameter. muon: Muon (Jordan et al. 2024) for the blocks' weight matrices, AdamW
    # (the settings above) for the embedding, the LM head, gains, biases and scalars (training/muon.py).
    name: Literal["adamw", "muon"] = "adamw"
    # Muon only. The fused QKV and SwiGLU gate|up weights are orthogonalized part by part (q, k, v, gate, up:
    # separate matrices in Moonlight and modded-nanogpt); head: each head of q, k and v on its own.
    muon_split: Literal["matrix", "head"] = "matrix"
    # the LR of a Muon update of an A x B matrix: match_rms_adamw (Moonlight, Liu et al. 2025): lr * 0.2 *
    # sqrt(max(A, B)), an update of AdamW's RMS, so AdamW's LR and weight decay carry over; original (Keller
    # Jordan): lr * sqrt(max(1, A / B))
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations

    def validate(self, path: str) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"{path}.lr", f"must be a positive number, got {self.lr}")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{path}.betas",
                 f"must be two numbers in [0, 1), got {list(self.betas)}")
        _require(math.isfinite(self.eps) and self.eps > 0, f"{path}.eps", f"must be a positive number, got {self.eps}")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{path}.weight_decay",
                 f"must be a number >= 0, got {self.weight_decay}")
        if self.independent_weight_decay:
            # each step multiplies the weights by 1 - weight_decay * schedule(t): at 1 or above, the peak
            # steps zero or flip them, whatever the LR (coupled decay, lr * weight_decay, is left free: a
            # diverging LR is what the LR sweeps are after)
            _require(self.weight_decay < 1, f"{path}.weight_decay",
                     f"must be below 1 with optim.independent_weight_decay=true, got {self.weight_decay}")
        _require(0.0 <= self.warmup_fraction < 1.0, f"{path}.warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_steps is not None:
            _require(self.warmup_steps >= 0, f"{path}.warmup_steps", f"must be null or >= 0, got {self.warmup_steps}")
        # the cosine ends at min_lr_ratio * lr: above 1 the LR would rise after the warmup, below 0 turn negative
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.min_lr is not None:  # the same rule as an LR: above the peak the LR would rise after the warmup
            _require(0.0 <= self.min_lr <= self.lr, f"{path}.min_lr",
                     f"must be null or in [0, {path}.lr] ([0, {self.lr:g}]), got {self.min_lr}")
        if self.grad_clip is not None:
            # a negative max norm flips every gradient (clip_grad_norm_ scales by max_norm / norm): gradient ascent
            _require(self.grad_clip > 0, f"{path}.grad_clip", f"must be null or positive, got {self.grad_clip}")
            _require(math.isfinite(self.grad_clip), f"{path}.grad_clip", f"must be finite (null turns clipping off), got {self.grad_clip}")
        # a negative coefficient rewards a large log Z: the drift the z-loss is there to stop
        _require(math.isfinite(self.z_loss) and self.z_loss >= 0, f"{path}.z_loss", f"must be a number >= 0, got {self.z_loss}")
        # momentum is an average's weight (buf = momentum * buf + (1 - momentum) * grad): at 1 the gradient never enters
        _require(math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0, f"{path}.momentum",
                 f"must be in [0, 1), got {self.momentum}")
        # no iteration leaves the update merely normalized, not orthogonalized: not Muon
        _require(self.ns_steps >= 1, f"{path}.ns_steps", f"must be >= 1, got {self.ns_steps}")
        if self.name != "muon":
            # Muon's settings set with AdamW would be ignored without a word
            for key, default in MUON_DEFAULTS.items():
                _require(getattr(self, key) == default, f"{path}.{key}",
                         f"only applies to optim=muon (optim.name=muon), got {getattr(self, key)!r} with optim.name={self.name}")

    def floor_ratio(self) -> float:
        """The cosine's floor as a fraction of the peak LR: min_lr / lr when min_lr is set, else min_lr_ratio."""
        return self.min_lr / self.lr if self.min_lr is not None else self.min_lr_ratio

    def warmup_for(self, max_steps: int) -> int:
        """Warmup steps of a run of `max_steps` steps: warmup_steps if set, else the fraction (rounded up)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_fraction * max_steps - 1e-9)


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Any = 1  # int, list of ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"] = "auto"
    max_steps: int = 1000
    max_time_minutes: Optional[float] = None
    # Validation every val_every_n_steps steps or, when null, about val_points times per run (and always
    # at the last step), so a run of any length has a validation curve.
    val_every_n_steps: Optional[int] = None
    val_points: int = 8
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: Optional[int] = 500
    # A finished run keeps its last checkpoint (for qknorm-probe, interop, fine-tuning) or, with false,
    # none; the previous copy kept against a torn write is removed either way.
    keep_checkpoint: bool = True
    threads: Optional[int] = None  # torch intra-op threads per process (None: torch's default)
    progress_bar: bool = True
    deterministic: bool = False

    def validate(self, path: str) -> None:
        _require(_devices_ok(self.devices), f"{path}.devices",
                 f"must be a device count >= 1 (-1: every device), a list of distinct device ids, or auto, got {self.devices!r}")
        # a Lightning strategy name (auto, ddp, ddp_spawn, fsdp, ...): Lightning's registry checks the name
        # itself, and it is not imported before the config is valid
        _require_text(self.strategy, f"{path}.strategy")
        _require(self.max_steps >= 1, f"{path}.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.val_every_n_steps is not None:
            _require(self.val_every_n_steps >= 1, f"{path}.val_every_n_steps", f"must be null or >= 1, got {self.val_every_n_steps}")
        _require(self.val_points >= 1, f"{path}.val_points", f"must be >= 1, got {self.val_points}")
        _require(self.log_every_n_steps >= 1, f"{path}.log_every_n_steps", f"must be >= 1, got {self.log_every_n_steps}")
        _require(self.num_nodes >= 1, f"{path}.num_nodes", f"must be >= 1, got {self.num_nodes}")
        if self.max_time_minutes is not None:
            # null is the run without a time limit
            _require(math.isfinite(self.max_time_minutes) and self.max_time_minutes > 0, f"{path}.max_time_minutes",
                     f"must be null or a positive number, got {self.max_time_minutes}")
        if self.checkpoint_every_n_steps is not None:
            _require(self.checkpoint_every_n_steps >= 1, f"{path}.checkpoint_every_n_steps",
                     f"must be null or >= 1, got {self.checkpoint_every_n_steps}")
        if self.threads is not None:
            _require(self.threads >= 1, f"{path}.threads", f"must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class LoggerConfig:
    tensorboard: bool = True
    csv: bool = True

    def validate(self, path: str) -> None:
        pass


@dataclass(frozen=True)
class MonitorConfig:
    """The stability monitor: every N steps, a forward pass on a fixed probe batch through the explicit
    attention path, recording per-layer and per-head logit, entropy, q/k and activation statistics."""

    enabled: bool = True
    every_n_steps: Optional[int] = None  # null: about `points` records per run, whatever its length
    points: int = 25
    probe_sequences: int = 4

    def validate(self, path: str) -> None:
        if self.every_n_steps is not None:
            _require(self.every_n_steps >= 1, f"{path}.every_n_steps", f"must be null or >= 1, got {self.every_n_steps}")
        _require(self.points >= 1, f"{path}.points", f"must be >= 1, got {self.points}")
        _require(self.probe_sequences >= 1, f"{path}.probe_sequences", f"must be >= 1, got {self.probe_sequences}")


@dataclass(frozen=True)
class DivergenceConfig:
    """When a run counts as diverged (it then stops cleanly, status diverged, exit code 0).

    - a non-finite loss or gradient norm (always; unless skip_nonfinite_steps, which skips the step);
    - the loss above the first step's loss + loss_margin for `patience` consecutive steps;
    - a sustained spike: the loss more than spike_sigma standard deviations above the mean of the last
      spike_window steps for `patience` consecutive steps (single spikes are only counted).

    Early stops of doomed runs, for LR searches (off by default; the critical-LR finder's probes set them,
    conf/hydra/sweeper/critical_lr.yaml): a run that will not recover is stopped, as diverged, once it shows it.
    - after_warmup_margin: after the warmup, the loss above the initial loss + this margin for `patience`
      steps (0: above the initial loss at all, which the analysis calls diverged when it lasts to the end);
    - running_min_factor: the loss above this factor times its running minimum for `patience` steps;
    - max_logit: the monitor's largest attention logit (before a soft-cap, which it never exceeds) above this
      (Wortsman et al. 2023 see divergence
      follow logits of about 1e4); checked when the monitor measures, so only with the monitor on.
    - early_stop_patience: the steps the first two must hold before they stop a run (null: `patience`).
      Longer than the detector's own: a run at a high LR can overshoot its initial loss just after the
      warmup and recover (runs of the first E4 round did, for 10-20 steps), and a stop there would move
      the divergence LR down; the finder's probes use 30.
    """

    enabled: bool = True
    loss_margin: float = 1.0
    spike_sigma: float = 6.0
    spike_window: int = 128
    patience: int = 10
    skip_nonfinite_steps: bool = False
    after_warmup_margin: Optional[float] = None
    running_min_factor: Optional[float] = None
    max_logit: Optional[float] = None
    early_stop_patience: Optional[int] = None

    def validate(self, path: str) -> None:
        # finite: a criterion is switched off by callbacks.divergence.enabled=false, or by a large number
        _require(math.isfinite(self.loss_margin) and self.loss_margin > 0, f"{path}.loss_margin",
                 f"must be a positive number, got {self.loss_margin}")
        _require(math.isfinite(self.spike_sigma) and self.spike_sigma > 0, f"{path}.spike_sigma",
                 f"must be a positive number, got {self.spike_sigma}")
        _require(self.spike_window >= MIN_SPIKE_WINDOW, f"{path}.spike_window", f"must be >= {MIN_SPIKE_WINDOW}, got {self.spike_window}")
        _require(self.patience >= 1, f"{path}.patience", f"must be >= 1, got {self.patience}")
        if self.after_warmup_margin is not None:
            _require(math.isfinite(self.after_warmup_margin) and self.after_warmup_margin >= 0,
                     f"{path}.after_warmup_margin", f"must be null or a number >= 0, got {self.after_warmup_margin}")
        if self.early_stop_patience is not None:
            _require(isinstance(self.early_stop_patience, int) and self.early_stop_patience >= 1,
                     f"{path}.early_stop_patience", f"must be null or an integer >= 1, got {self.early_stop_patience}")
        if self.running_min_factor is not None:
            _require(math.isfinite(self.running_min_factor) and self.running_min_factor > 1,
                     f"{path}.running_min_factor", f"must be null or a number > 1, got {self.running_min_factor}")
        if self.max_logit is not None:
            _require(math.isfinite(self.max_logit) and self.max_logit > 0, f"{path}.max_logit",
                     f"must be null or a positive number, got {self.max_logit}")


@dataclass(frozen=True)
class CallbacksConfig:
    lr_monitor: bool = True
    throughput: bool = True
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)

    def validate(self, path: str) -> None:
        self.monitor.validate(f"{path}.monitor")
        self.divergence.validate(f"{path}.divergence")
        # the early stop on the max logit reads the monitor's newest record: without the monitor it would never fire
        _require(self.divergence.max_logit is None or self.monitor.enabled, f"{path}.divergence.max_logit",
                 f"reads the stability monitor's max logit; set {path}.monitor.enabled=true, or divergence.max_logit=null")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    seed: int = 0
    task_name: str = "train"

    def validate(self, path: str = "") -> None:
        for f in dataclasses.fields(self):
            group: Any = getattr(self, f.name)
            if dataclasses.is_dataclass(type(group)):
                group.validate(f.name)
        _require(0 <= self.seed <= MAX_SEED, "seed",
                 f"must be in [0, {MAX_SEED}] (numpy's seed range, and so Lightning's), got {self.seed}")
        # logs/<task_name>/runs/...: one folder name, which can neither be blank nor climb out of the log folder
        _require_text(self.task_name, "task_name")
        _require(not any(c in self.task_name for c in "/\\") and self.task_name not in (".", ".."), "task_name",
                 f"must name one folder (no /, not . or ..), got {self.task_name!r}")
        warmup = self.optim.warmup_for(self.trainer.max_steps)
        key = "optim.warmup_steps" if self.optim.warmup_steps is not None else "optim.warmup_fraction"
        _require(warmup <= self.trainer.max_steps, key,
                 f"a warmup of {warmup} steps is longer than the run (trainer.max_steps={self.trainer.max_steps})")
        a, m = self.attention, self.model
        if not a.pre_attn_norm:
            _require(a.targets == "qkv", "attention.pre_attn_norm",
                     "may only be false with attention.targets=qkv (QKV-Norm normalizes the attention inputs instead)")
        if m.block == "reordered_norm":
            _require(a.pre_attn_norm, "attention.pre_attn_norm",
                     "model.block=reordered_norm has no pre-attention norm to remove; leave it true")
            _require(a.proj_fc2_norm == "none", "attention.proj_fc2_norm",
                     "model.block=reordered_norm already normalizes the Proj and FC2 outputs; allowed: none")


# --------------------------------------------------------------------------------------------------
# Conversion: plain mapping (from OmegaConf) -> dataclasses, with key-naming errors
# --------------------------------------------------------------------------------------------------

def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_text(value: str, key: str, nullable: bool = False) -> None:
    """A name or path: not blank (what it names is checked where it is used)."""
    _require(bool(value.strip()), key, f"must be {'null or ' if nullable else ''}a non-empty string, got {value!r}")


def _devices_ok(devices: Any) -> bool:
    """What Lightning's Trainer(devices=...) takes: a count (-1: every device), a list of device ids, "auto",
    or the same as text ("2", "0,1"). A count of 0 trains on nothing."""
    if isinstance(devices, str):
        if devices.strip() == "auto":
            return True
        try:
            return _devices_ok([int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices))
        except ValueError:
            return False
    if isinstance(devices, bool):  # True is an int to Python, not a device count
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, (list, tuple)):
        ids = list(devices)
        return (len(ids) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in ids)
                and len(set(ids)) == len(ids))
    return False


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}: unknown value {value!r}; allowed: {allowed}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a group of keys, got {value!r}")
        return from_mapping(tp, value, key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_mapping(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by their dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "config"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{path}.{name}" if path else name
            kwargs[name] = _convert(hints[name], data[name], key)
    return cls(**kwargs)


# Top-level keys that Hydra or the run directory own; they are not part of the typed run config.
NON_RUN_KEYS = {"hydra", "paths", "experiment", "sweeps"}


def default_tree() -> dict[str, Any]:
    """Every key of the run config with its default, as plain data: the base the YAML groups merge onto,
    so any key can be overridden from the command line and a misspelt one is rejected by name."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(RunConfig()))


def every(interval: Optional[int], points: int, max_steps: int) -> int:
    """An explicit interval, or the one that gives about `points` events over `max_steps` steps."""
    return interval if interval is not None else max(1, math.ceil(max_steps / points))


def val_tokens(data: DataConfig, val_every_n_steps: int) -> Optional[int]:
    """The validation token cap: data.val_max_tokens if set, else data.val_token_ratio times the tokens one
    process trains between two validations, at least VAL_MIN_TOKENS (and one window); None: no cap."""
    if data.val_max_tokens is not None or data.val_token_ratio is None:
        return data.val_max_tokens
    trained = val_every_n_steps * data.batch_size * data.seq_len
    return max(VAL_MIN_TOKENS, data.seq_len + 1, math.ceil(data.val_token_ratio * trained))


def resolve_schedule(cfg: RunConfig) -> RunConfig:
    """The same config with the run-length-relative settings made concrete: warmup steps, validation
    and monitor intervals, the validation token cap. Everything downstream reads these as plain numbers."""
    t, m = cfg.trainer, cfg.callbacks.monitor
    val_every = every(t.val_every_n_steps, t.val_points, t.max_steps)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, val_max_tokens=val_tokens(cfg.data, val_every)),
        optim=dataclasses.replace(cfg.optim, warmup_steps=cfg.optim.warmup_for(t.max_steps)),
        trainer=dataclasses.replace(t, val_every_n_steps=val_every),
        callbacks=dataclasses.replace(cfg.callbacks, monitor=dataclasses.replace(
            m, every_n_steps=every(m.every_n_steps, m.points, t.max_steps))),
    )


def load_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a composed config (a plain dict, e.g. `OmegaConf.to_container(cfg, resolve=True)`), and
    resolve its relative schedule settings (see resolve_schedule)."""
    data = {k: v for k, v in raw.items() if k not in NON_RUN_KEYS}
    cfg = from_mapping(RunConfig, data)
    cfg.validate()
    return resolve_schedule(cfg)


def needs_own_code(attention: "typing.Sequence[AttentionConfig]") -> bool:
    """Whether a stack of members with these attention configs must run each member's own modules: settings that
    differ between them (a soft-cap's or a fixed scale's value: a member's modules hold them as Python numbers,
    and vmap would run member 0's modules for all), QK-Clip (its running max logit is a member's own state), or
    the soft-cap (its kernels, chunked on a CPU and FlexAttention on a GPU, are not written for vmap). In the
    config layer, which imports no torch: the command line plans stacks before it loads torch."""
    a = attention[0]
    return len({repr(c) for c in attention}) > 1 or a.qk_clip_tau is not None or a.softcap is not None
