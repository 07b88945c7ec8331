"""The command line around the Hydra app: our own --help page, and every user error as one line.

Hydra reports its own errors (an unknown group option, a misspelt key, an override it cannot parse) in
several lines, exits 1 and suggests `+key=value`, which adds the misspelt key instead of fixing it.
`run_app` lets Hydra raise instead (HYDRA_FULL_ERROR) and says what went wrong in the same one-line form
as the config validator: `qknorm-train: error: <key or group>: ...; did you mean ...? allowed: ...`,
exit code 2. Everything here reads the config folders and the typed defaults only: no torch, no
Lightning, so an error is reported in well under a second. A multirun whose jobs ran but some failed
(qknorm.sweeping.job_failed) exits 1 with one line naming them.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import hydra
from omegaconf import DictConfig

from . import sweeping
from .config import VAL_MIN_TOKENS, QknormError, default_tree
from .hydra_wiring import register_defaults
from .jobs import STACK_KEY
from .training.naming import announce_job

PROG = "qknorm-train"

# One line per config group for --help; the options are read from the folders, so only these lines
# are written by hand (tests/test_cli.py checks that every folder has one).
GROUPS = {
    "model": "size and shape: d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp, init, compile",
    "attention": "the attention stabilizer: qk_norm, scope, gain, scale, softcap, output_gate, softmax, length_scale, ...",
    "data": "the corpus, seq_len, batch_size, vocab_size",
    "optim": "AdamW or Muon, and the schedule: lr (peak), betas, weight_decay, warmup_steps, grad_clip, muon_split",
    "trainer": "device and length: max_steps, max_time_minutes, val_every_n_steps, precision, devices",
    "logger": "TensorBoard and/or metrics.csv",
    "callbacks": "the stability monitor (monitor.*) and the divergence detector (divergence.*)",
    "experiment": "presets over several groups",
    "paths": "where runs and the tokenizer cache go",
}

COMMANDS = {
    "qknorm-sweep sweeps=NAME [sweeps.size=...]": "list a sweep's (or a -m command's) jobs and which finished",
    "qknorm-analyze SWEEP_DIR [...]": "tables, figures and report.md/report.html from run directories",
    "qknorm-probe MODEL": "would a checkpoint's or a transformers model's attention overflow in fp16?",
    "qknorm-scorecard SWEEP_DIR": "docs/scorecard.md: one row per preset from a critical-LR finder sweep",
    "qknorm-data prepare|verify [overrides]": "build a run's token cache ahead of a sweep; checksum it",
}


# -- what the config folders hold ------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    return Path(str(importlib.resources.files(package)))


def _options(folder: Path) -> list[str]:
    """The options of a config group: its YAML files, without the shared `_`-prefixed ones."""
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


@lru_cache(maxsize=1)
def config_groups() -> dict[str, list[str]]:
    """Group -> options, from conf/ (Hydra's own hydra/ group aside) and sweeps/."""
    conf = _package_dir("qknorm.conf")
    groups = {p.name: _options(p) for p in sorted(conf.iterdir())
              if p.is_dir() and p.name != "hydra" and not p.name.startswith("_")}
    groups["sweeps"] = _options(_package_dir("qknorm.sweeps"))
    return groups


def default_options() -> dict[str, Optional[str]]:
    """Group -> the option conf/train.yaml selects (None: nothing unless asked)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.load(_package_dir("qknorm.conf") / "train.yaml"))
    assert isinstance(tree, dict)
    defaults = tree["defaults"]
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def sweep_question(name: str) -> str:
    """The `# Question:` sentence in the header of sweeps/<name>.yaml."""
    lines = (_package_dir("qknorm.sweeps") / f"{name}.yaml").read_text().splitlines()
    text = ""
    for line in lines:
        if not line.startswith("#"):
            break
        body = line.lstrip("# ").strip()
        if body.startswith("Question:") or text:
            text += " " + body.removeprefix("Question:").strip()
        if text and "?" in text:
            return text[: text.index("?") + 1].strip()
    return text.strip()


@lru_cache(maxsize=1)
def config_tree() -> dict[str, list[str]]:
    """Dotted node ("" for the root) -> the names under it, for every key that can be set."""
    from omegaconf import OmegaConf


    paths = OmegaConf.to_container(OmegaConf.load(_package_dir("qknorm.conf") / "paths" / "default.yaml"))
    root = {**default_tree(), "paths": paths, "experiment": None, "sweeps": {"name": None, "size": None},
            "hydra": None}
    tree: dict[str, list[str]] = {}

    def walk(prefix: str, node: dict) -> None:
        tree[prefix] = sorted(node)
        for name, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}.{name}" if prefix else name, value)

    walk("", root)
    return tree


# -- did you mean ----------------------------------------------------------------------------------

def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def closest(word: str, candidates: list[str]) -> Optional[str]:
    """The candidate `word` most likely misspells, or abbreviates (learning_rate -> lr), if any."""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    return next((c for c in candidates if _same_name(word, c)), None)


def _same_name(a: str, b: str) -> bool:
    return a == b or "_" in a and _initials(a) == b or "_" in b and _initials(b) == a


def _all_keys() -> list[str]:
    tree = config_tree()
    return [f"{node}.{name}" if node else name for node, names in tree.items() for name in names]


def unknown_key_message(key: str) -> str:
    """`key` is not in the config: name it, what is allowed where it was put, and a guess."""
    if key == "hydra" or key.startswith("hydra."):
        return f"{key}: no such key in Hydra's settings (`{PROG} --cfg hydra` lists them)"
    tree = config_tree()
    parts = key.split(".")
    head = parts[0]
    if head in config_groups() and key in _all_keys():  # e.g. sweeps.size while no sweep is chosen
        return f"{key}: only exists once a {head} option is chosen, e.g. {head}={config_groups()[head][0]} {key}=..."
    depth = 0  # the longest known node above the key
    while depth < len(parts) - 1 and ".".join(parts[: depth + 1]) in tree:
        depth += 1
    node = ".".join(parts[:depth])
    siblings = tree[node]
    guess = closest(parts[depth], siblings)
    if guess is not None:
        guess = ".".join([*parts[:depth], guess, *parts[depth + 1:]])
    else:  # the right name in another group: lr -> optim.lr
        elsewhere = [k for k in _all_keys() if _same_name(parts[-1], k.rsplit(".", 1)[-1])]
        guess = " or ".join(elsewhere) or None
    where = f"keys of {node}" if node else "groups and keys at the top level"
    hint = f"; did you mean {guess}?" if guess and guess != key else ""
    return f"{key}: no such key{hint} ({where}: {', '.join(siblings)})"


def missing_option_message(missing: str, options: Optional[list[str]]) -> str:
    """An option that is not in its group's folder, e.g. `attention/qwen4`."""
    group, _, option = missing.rpartition("/")
    if options is None:
        return f"{group or missing}: no config {missing!r}"
    options = [o for o in options if not o.startswith("_")]
    guess = closest(option, options)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"{group}={option}: no such option in group {group}{hint} (allowed: {', '.join(options)})"


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _unparsable_override(overrides: list[str]) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as e:
            return f"{override}: cannot parse this override ({_first_line(e)}); the form is key=value or group=option"
    return None


def explain(exc: BaseException, overrides: list[str]) -> Optional[str]:
    """One line for an error in the user's command line or config; None for anything else (a bug)."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, QknormError):  # the validator's or the data check's own line
        return str(exc)
    if isinstance(exc, MissingConfigException):
        return missing_option_message(exc.missing_cfg_file or "", list(exc.options) if exc.options is not None else None)
    if isinstance(exc, OverrideParseException):
        return _unparsable_override(overrides) or f"cannot parse the overrides ({_first_line(exc)})"
    if isinstance(exc, ConfigCompositionException):
        unknown = re.match(r"Could not override '([^']+)'", str(exc))
        if unknown and isinstance(exc.__cause__, (ConfigKeyError, ConfigAttributeError)):
            return unknown_key_message(unknown.group(1))
        cause = f" ({_first_line(exc.__cause__)})" if isinstance(exc.__cause__, OmegaConfBaseException) else ""
        return _first_line(exc) + cause
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        key = getattr(exc, "full_key", None)
        return f"{key}: {_first_line(exc)}" if key else _first_line(exc)
    if isinstance(exc, ValueError) and str(exc).startswith("Only one of --run, --multirun"):
        # Hydra's own check of its flags, e.g. `-m ... --cfg job`
        return f"{_first_line(exc)} (--cfg prints the config of a single run: drop -m, or list a sweep with qknorm-sweep)"
    return None


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_app(hydra_main: Callable[[], Any], argv: Optional[list[str]] = None) -> None:
    """Run the @hydra.main function on the command line, with our help page and one-line errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_page())
        sys.exit(0)
    # A user who asks Hydra for full tracebacks gets them; otherwise Hydra raises and we report.
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        try:
            hydra_main()
        except sweeping.JobConfigError as e:  # a job of a multirun that does not compose, found before launching
            raise e.error from e.error.__cause__
    except Exception as e:
        message = None if user_wants_traceback else explain(e, [a for a in args if not a.startswith("-")])
        if message is None:
            raise
        fail(message)
    outcome = sweeping.last_multirun
    if outcome is not None and outcome.failed:  # a script or CI must see it; a diverged run is a result, exit 0
        print(f"{PROG}: error: {outcome.line()}", file=sys.stderr)
        sys.exit(1)


# -- the help page ---------------------------------------------------------------------------------

def _wrapped(text: str, indent: int, width: int = 100) -> str:
    return textwrap.fill(text, width=width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def help_page() -> str:
    groups, defaults = config_groups(), default_options()
    out = [
        f"usage: {PROG} [-m] [GROUP=OPTION ...] [KEY=VALUE ...]",
        "",
        "Train a small decoder language model with the attention stabilizer of your choice. Every value is",
        "checked before anything is built; a wrong one stops the run with one line naming it.",
        "",
        "config groups (GROUP=OPTION; * marks the default):",
    ]
    order = [g for g in GROUPS if g in groups] + [g for g in groups if g not in GROUPS and g != "sweeps"]
    for group in order:
        options, default = groups[group], defaults.get(group)
        out.append(f"  {group:<11}{GROUPS.get(group, '')}")
        out.append(_wrapped(", ".join(o + "*" if o == default else o for o in options), 13))
    out += [
        "",
        "keys: any key of the config, e.g. optim.lr=3e-3 trainer.max_steps=500 attention.softcap=30",
        f"  ({PROG} --cfg job prints them all with their values)",
        "",
        "validation: about trainer.val_points=8 times a run and at its last step, each on at most",
        f"  data.val_token_ratio=0.3 x the tokens trained since the last one, at least {VAL_MIN_TOKENS} tokens (about 10%",
        "  of a run's time); data.val_max_tokens=N: N tokens; data.val_token_ratio=null: the whole held-out split",
        "",
        f"sweeps ({PROG} sweeps=NAME [sweeps.size=smoke|cpu|gpu]; a multirun, 2 jobs at a time):",
    ]
    for name in groups["sweeps"]:
        out.append(f"  {name}")
        out.append(_wrapped(sweep_question(name), 6))
    out += [
        "",
        "multirun: -m runs every combination of comma-separated values, 2 jobs at a time on this machine",
        f"  {PROG} -m attention=baseline,qwen3 optim.lr=1e-3,1e-2",
        "  (hydra.launcher.n_jobs=N: N at a time; hydra/launcher=basic: one at a time; hydra/launcher=submitit_slurm)",
        "  hydra/sweeper=critical_lr: per group of the other axes, search the LR at which runs start to fail",
        f"  {PROG} -m hydra/sweeper=critical_lr attention=baseline,qwen3 seed=0,1",
        "  a multirun's folder is named by its axes and fixed values: the same command resumes there, one LR",
        "  more trains only the new jobs; qknorm-sweep with the same arguments lists them",
        "",
        "outputs: one directory per run, under ./logs (QKNORM_LOG_DIR moves it):",
        "  logs/<task_name>/runs/<time>/  logs/<task_name>/multiruns/<grid>/<job>/  logs/sweeps/<name>/<size>/<job>/",
        "  each with summary.json, metrics.csv, tensorboard/, stability.jsonl, checkpoints/, .hydra/",
        "  tensorboard --logdir logs   (runs are named by their overrides)",
        "",
        "other commands:",
    ]
    out += [f"  {command:<44}{what}" for command, what in COMMANDS.items()]
    out += ["", "Hydra's own options: --hydra-help, --cfg job|hydra|all, --info, --multirun (-m)"]
    return "\n".join(out)


# -- the console scripts ---------------------------------------------------------------------------

@hydra.main(version_base="1.3", config_path="pkg://qknorm.conf", config_name="train")
def hydra_app(cfg: DictConfig) -> Optional[float]:
    """One Hydra job: a stack of jobs (hydra/launcher=stacked) or one run. The job layers are imported
    here, at the entry point, so that the command line and the config are checked before torch loads."""
    announce_job()
    if cfg.get(STACK_KEY) is not None:
        from .stacking import main_stack_job

        return main_stack_job(cfg)
    from .train import run

    return run(cfg)


def main() -> None:
    """qknorm-train."""
    register_defaults()
    run_app(hydra_app)


def sweep_main() -> None:
    """qknorm-sweep: list a sweep's jobs (qknorm.sweeping)."""
    register_defaults()
    sys.exit(sweeping.main())


if __name__ == "__main__":
    main()
