"""qknorm-probe: would this model's attention overflow in fp16?

    qknorm-probe MODEL [--batches 16] [--seq-len N] [--out DIR] [--random-ids]

MODEL is one of our checkpoints (`.ckpt`) or a `transformers` causal LM (a local folder, or a hub name
when online). It feeds the model the start of Hamlet through the model's own tokenizer (a checkpoint: the
tokenizer of its training corpus) and says so: 16 sequences of the model's whole context for a checkpoint
(its longest-range logits included), 16 x 128 tokens for a transformers model unless --seq-len says
otherwise (never past the model's own context). The sample is written beside the results (probe.csv's
`tokens` and `sample`): a maximum over a sample is a lower bound on what the model produces. A model it
cannot tokenize text for is refused unless --random-ids asks for random token ids. For those batches it
reports per layer: max |q k^T| before the scale, max |QKV bias|, max attention logit, and the fp16
headroom (65504 / max |q k^T|); then it evaluates the logits in fp16 both as (q @ k^T) * s and as
(q * s) @ k^T and counts non-finite values: the Qwen2 -> Qwen3 story, where moving the scale before the matmul (as
PyTorch's SDPA does) removed the overflow and QK-norm removed its cause. Writes probe.csv and probe.png
(per-layer maxima against the fp16 limit).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

FP16_MAX = 65504.0
# the default sample: 16 sequences, of the whole context for our checkpoints (at 256 tokens, 4k tokens of Hamlet).
# A maximum over a sample understates the model's: 2 x 128 tokens read 9-15% lower maxima than 60 x 256 on a
# tiny model with QKV bias, and never saw the logits between positions 128 and 255.
BATCHES = 16
TRANSFORMERS_SEQ_LEN = 128
# the files a transformers tokenizer is loaded from: a model folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


@dataclass
class LayerProbe:
    index: int = 0  # the model's own number for the layer (a hybrid model's attention layers are not 0, 1, 2, ...)
    raw_qk_max: float = 0.0
    logit_max: float = 0.0
    bias_max: float = math.nan
    nonfinite_unscaled: int = 0
    nonfinite_prescaled: int = 0
    entries: int = 0

    def update(self, q: torch.Tensor, k: torch.Tensor, scale: float | torch.Tensor, softcap: float | None,
               allowed: torch.Tensor | None = None) -> None:
        """q [B,H,T,D], k [B,Hkv,T,D] after normalization and RoPE; `allowed`: which logits the softmax reads
        (bool, broadcastable to [B,H,Tq,Tk]: the model's own mask, a sliding window's say), by default causal."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        t_q, t_k = q.shape[-2], k.shape[-2]
        if allowed is None:
            allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        mask = allowed.expand(q.shape[0], q.shape[1], t_q, t_k)
        raw = q.double() @ k.double().transpose(-1, -2)
        s = scale.double() if isinstance(scale, torch.Tensor) else float(scale)
        logits = raw * s
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        self.raw_qk_max = max(self.raw_qk_max, float(raw.abs().masked_fill(~mask, 0).max()))
        self.logit_max = max(self.logit_max, float(logits.abs().masked_fill(~mask, 0).max()))
        q16, k16 = q.half(), k.half()
        s16 = s.half() if isinstance(s, torch.Tensor) else s
        unscaled = (q16 @ k16.transpose(-1, -2)) * s16
        prescaled = (q16 * s16) @ k16.transpose(-1, -2)
        self.nonfinite_unscaled += int((~torch.isfinite(unscaled) & mask).sum())
        self.nonfinite_prescaled += int((~torch.isfinite(prescaled) & mask).sum())
        self.entries += int(mask.sum())

    @property
    def headroom(self) -> float:
        return FP16_MAX / self.raw_qk_max if self.raw_qk_max > 0 else math.inf


@dataclass
class ProbeResult:
    model: str
    layers: list[LayerProbe] = field(default_factory=list)
    tokens: int = 0  # the sample the maxima are taken over
    sample: str = ""

    def rows(self) -> list[dict]:
        return [{"layer": p.index, "max_abs_qk_raw": p.raw_qk_max, "max_abs_qkv_bias": p.bias_max, "max_abs_logit": p.logit_max,
                 "fp16_headroom": p.headroom, "nonfinite_fp16_unscaled": p.nonfinite_unscaled,
                 "nonfinite_fp16_prescaled": p.nonfinite_prescaled,
                 "overflows_fp16_unscaled": p.nonfinite_unscaled > 0, "overflows_fp16_prescaled": p.nonfinite_prescaled > 0,
                 "tokens": self.tokens, "sample": self.sample}
                for p in self.layers]


# -- transformers models: a registered attention function sees q and k after norm and RoPE ---------

def probe_transformers(model, batches: list[torch.Tensor], name: str) -> ProbeResult:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layers: dict[int, LayerProbe] = {}

    def probing_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        idx = getattr(module, "layer_idx", len(layers))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # the model's own mask (causal, or a sliding window), additive: 0 where the softmax reads the logit
        t_k = key.shape[-2]
        allowed = None if attention_mask is None else (
            attention_mask[..., :t_k] if attention_mask.dtype == torch.bool else attention_mask[..., :t_k] == 0)
        layers.setdefault(idx, LayerProbe(index=idx)).update(query.detach(), key.detach(), scale, softcap, allowed)
        # the model file's own eager attention (it honours a soft-cap; transformers' SDPA path drops it)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        kwargs = {**kwargs, "softcap": softcap} if softcap is not None else kwargs
        if eager is None:
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("qknorm_probe", probing_attention)
    # the mask the eager attention reads: an attention name transformers does not know gets no mask at all, and
    # every layer after the first would then see later tokens (the probe's own causal mask kept only layer 0 right)
    AttentionMaskInterface.register("qknorm_probe", eager_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "qknorm_probe"
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        model.config._attn_implementation = previous
    if not layers:
        raise _Refused(f"{name}: no attention layer called transformers' attention functions ({type(model).__name__} "
                       "computes its attention itself): qknorm-probe cannot see its queries and keys")
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx in layers and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            biases = [getattr(module, n).bias for n in ("q_proj", "k_proj", "v_proj")
                      if hasattr(module, n) and getattr(module, n).bias is not None]
            if biases:
                layers[idx].bias_max = max(float(b.detach().abs().max()) for b in biases)
    return ProbeResult(name, [layers[i] for i in sorted(layers)])


# -- our checkpoints -----------------------------------------------------------------------------

def load_checkpoint(path: str | Path):
    from .config import RunConfig, from_mapping
    from .model import build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "qknorm_config" not in ckpt:
        raise SystemExit(f"qknorm-probe: error: {path}: not a qknorm checkpoint (no qknorm_config)")
    cfg = from_mapping(RunConfig, ckpt["qknorm_config"])
    model = build_model(cfg, ckpt["qknorm_vocab_size"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    return model.eval(), cfg


def probe_qknorm(model, batches: list[torch.Tensor], name: str) -> ProbeResult:
    layers = [LayerProbe(index=i) for i in range(len(model.blocks))]

    class Capture:
        def on_attention(self, layer, t):
            layers[layer].update(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["scale"], model.attention_cfg.softcap)

    for attn in model.attention_layers():
        attn.probe = Capture()
        if attn.qkv.bias is not None:
            layers[attn.layer_idx].bias_max = float(attn.qkv.bias.detach().abs().max())
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids[:, : model.seq_len])
    finally:
        for attn in model.attention_layers():
            attn.probe = None
    return ProbeResult(name, layers)


# -- text ------------------------------------------------------------------------------------------

def sample_text() -> str:
    from .data.corpora import shakespeare_plays, strip_play_markup

    return strip_play_markup(shakespeare_plays()["hamlet"].read_text(encoding="utf-8"))


class NoUsableText(Exception):
    """The model's tokenizer is missing or cannot turn the sample text into enough valid token ids."""


def make_batches(encode, vocab_size: int, n: int | None, seq_len: int, random_ids: bool = False,
                 no_tokenizer: str = "no tokenizer", tokenizer: str = "the model's tokenizer") -> tuple[list[torch.Tensor], str]:
    """n sequences of seq_len token ids, and a line saying what they are; n None: BATCHES of them, or as many as the
    text holds (a long context). Random ids only when asked: attention statistics on random ids say little about
    the model on text."""
    fit = n is None
    n = BATCHES if n is None else n
    if random_ids:
        g = torch.Generator().manual_seed(0)
        return ([torch.randint(0, vocab_size, (1, seq_len), generator=g) for _ in range(n)],
                f"{n} x {seq_len} random token ids (--random-ids), not text")
    if encode is None:
        raise NoUsableText(no_tokenizer)
    ids = list(encode(sample_text()))
    if not ids:
        raise NoUsableText("its tokenizer turned the sample text into no tokens at all: not a usable tokenizer")
    if fit and len(ids) < n * seq_len:
        n = max(1, len(ids) // seq_len)
    if len(ids) < n * seq_len:
        asked = f"--batches x --seq-len = {n} x {seq_len}" if not fit else f"one sequence of {seq_len} (the model's context)"
        raise NoUsableText(f"its tokenizer turned the sample text into {len(ids)} tokens, fewer than {asked}")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise NoUsableText(f"its tokenizer gives token ids up to {max(ids)}, outside the model's vocabulary of {vocab_size}")
    t = torch.tensor(ids[: n * seq_len], dtype=torch.long)
    return ([t[i * seq_len:(i + 1) * seq_len][None] for i in range(n)],
            f"{n} x {seq_len} tokens of Hamlet (the embedded Shakespeare plays), tokenized by {tokenizer}")


def plot(result: ProbeResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, [r["max_abs_qk_raw"] for r in rows], marker="o", label="max |q k^T| (before scale)")
    ax.plot(x, [r["max_abs_logit"] for r in rows], marker="s", label="max |attention logit|")
    if any(not math.isnan(r["max_abs_qkv_bias"]) for r in rows):
        ax.plot(x, [r["max_abs_qkv_bias"] for r in rows], marker="^", label="max |QKV bias|")
    ax.axhline(FP16_MAX, color="red", ls="--", lw=1, label="fp16 max (65504)")
    from .analysis.figures import legend_outside

    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_xticks(x)
    ax.set_ylabel("magnitude (fp16 overflows above the red line)", fontsize=8)
    ax.set_title(f"{result.model}\n{result.sample}", fontsize=7)
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax)
    path = out / "probe.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


class _Refused(Exception):
    """A model that cannot be loaded: reported as one line."""


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def probe(args: argparse.Namespace) -> ProbeResult:
    """Load the model named on the command line, feed it text, and return the probe, which names its sample."""
    if args.model.endswith(".ckpt"):
        if not Path(args.model).is_file():
            raise _Refused(f"{args.model}: no such checkpoint")
        model, cfg = load_checkpoint(args.model)
        from .data import prepare_data

        encode, why = None, ""
        try:
            encode = prepare_data(cfg.data).tokenized.tokenizer.encode
        except Exception as e:  # the training corpus may not be on this machine
            why = f"the tokenizer of its training corpus cannot be built here ({_first_line(e)})"
        # the whole context by default: the longest-range logits are where a trained model's largest may lie
        seq_len = min(args.seq_len or model.seq_len, model.seq_len)
        batches, text = make_batches(encode, model.vocab_size, args.batches, seq_len,
                                     args.random_ids, why, "the tokenizer of its training corpus")
        return sampled(probe_qknorm(model, batches, args.model), batches, text)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise _Refused("probing a transformers model needs `pip install transformers`") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file would bury the one-line answers
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise _Refused(f"{args.model}: cannot load ({str(e).splitlines()[0]})") from None
    encode, why = None, ""
    folder = Path(args.model)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        why = f"the folder holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"  # e.g. a model saved from a config
    else:
        try:
            encode = AutoTokenizer.from_pretrained(args.model).encode
        except Exception as e:  # a tokenizer that does not load
            why = f"no tokenizer could be loaded from it ({_first_line(e)})"
    # never past the positions the model was built for: its logits there are not the model's
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = args.seq_len or TRANSFORMERS_SEQ_LEN
    if context:
        seq_len = min(seq_len, int(context))
    batches, text = make_batches(encode, model.config.vocab_size, args.batches, seq_len, args.random_ids, why)
    return sampled(probe_transformers(model, batches, args.model), batches, text)


def sampled(result: ProbeResult, batches: list[torch.Tensor], text: str) -> ProbeResult:
    """The result with the sample it was measured on."""
    result.tokens, result.sample = sum(int(b.numel()) for b in batches), text
    return result


def positive(text: str) -> int:
    """A count of at least 1: a probe over no tokens would report no overflow with nothing measured."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qknorm-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a qknorm .ckpt, a transformers model folder, or a hub name")
    parser.add_argument("--batches", type=positive, default=None,
                        help=f"sequences to read (default {BATCHES}, or as many as the text holds)")
    parser.add_argument("--seq-len", type=positive, default=None,
                        help=f"tokens per sequence (default: a checkpoint's whole context; {TRANSFORMERS_SEQ_LEN} for a "
                             "transformers model, whose context may be long for a CPU)")
    parser.add_argument("--out", type=Path, default=Path("probe"))
    parser.add_argument("--random-ids", action="store_true",
                        help="probe with random token ids when the model has no usable tokenizer")
    args = parser.parse_args(argv)
    try:
        result = probe(args)
    except NoUsableText as e:
        print(f"qknorm-probe: error: {args.model}: {e}; --random-ids probes it with random token ids instead",
              file=sys.stderr)
        return 2
    except _Refused as e:
        print(f"qknorm-probe: error: {e}", file=sys.stderr)
        return 2
    print(f"text: {result.sample}")
    args.out.mkdir(parents=True, exist_ok=True)
    import csv

    rows = result.rows()
    with open(args.out / "probe.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'layer':>5} {'max|qk^T|':>12} {'max|bias|':>10} {'max|logit|':>11} {'fp16 headroom':>14} "
          f"{'nonfinite (q@k)*s':>18} {'nonfinite (q*s)@k':>18}")
    for r in rows:
        flag = "  OVERFLOW (unscaled order)" if r["overflows_fp16_unscaled"] else ""
        flag += "  OVERFLOW (pre-scaled order)" if r["overflows_fp16_prescaled"] else ""
        bias = "-" if math.isnan(r["max_abs_qkv_bias"]) else f"{r['max_abs_qkv_bias']:.4g}"  # "-": no QKV bias
        print(f"{r['layer']:>5} {r['max_abs_qk_raw']:>12.4g} {bias:>10} {r['max_abs_logit']:>11.4g} "
              f"{r['fp16_headroom']:>14.4g} {r['nonfinite_fp16_unscaled']:>18} {r['nonfinite_fp16_prescaled']:>18}{flag}")
    print(f"wrote {args.out / 'probe.csv'}, {plot(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
