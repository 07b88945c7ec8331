"""qknorm-data: build or check the token cache a run would use, ahead of the run.

usage: qknorm-data prepare [GROUP=OPTION ...] [KEY=VALUE ...]
       qknorm-data verify  [GROUP=OPTION ...] [KEY=VALUE ...]

The overrides are qknorm-train's (only the data keys matter); the config is composed and checked the
same way, and the cache is the one a run with these overrides uses (QKNORM_CACHE_DIR or data.cache_dir).

  prepare  trains the tokenizer and writes the token shards, under the cache's lock: the same code a run
           starts with, so a sweep's jobs find the cache built and never race to tokenize. A killed
           prepare resumes from its last sealed shard. data.workers=N encodes in N processes (default:
           every core).
  verify   recomputes the checksum of the tokenizer and of every token shard. A corrupt or truncated
           shard is reported and unsealed: the next run (or prepare) rebuilds from it. Exit code 1 when
           anything was wrong or the cache is not complete.

examples:
  qknorm-data prepare data=text_files data.paths=[my_corpus/] data.vocab_size=8192
  qknorm-data prepare data=hf_text data.name=HuggingFaceFW/fineweb-edu data.config_name=sample-10BT \\
      data.streaming=true data.max_tokens=1000000000 data.vocab_size=32768
  qknorm-data verify data=text_files data.paths=[my_corpus/] data.vocab_size=8192
"""

from __future__ import annotations

import logging
import sys
import time
from typing import NoReturn, Optional

from .cli import explain
from .config import QknormError, RunConfig, load_run_config
from .hydra_wiring import register_defaults

PROG = "qknorm-data"
ACTIONS = ("prepare", "verify")


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The run config qknorm-train would compose from these overrides, validated."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        raw = compose(config_name="train", overrides=overrides)
    tree = OmegaConf.to_container(raw, resolve=True)
    assert isinstance(tree, dict)  # a composed config is a mapping
    return load_run_config({str(k): v for k, v in tree.items()})


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    action, overrides = args[0], args[1:]
    if action not in ACTIONS:
        fail(f"{action}: no such command; allowed: {', '.join(ACTIONS)} (qknorm-data --help)")
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        fail(f"{flags[0]}: no such option; {PROG} takes overrides only (KEY=VALUE, GROUP=OPTION)")
    try:
        cfg = compose_run_config(overrides)
    except QknormError as e:
        fail(str(e))
    except Exception as e:
        message = explain(e, overrides)
        if message is None:
            raise
        fail(message)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if action == "prepare":
            _prepare(cfg)
        else:
            _verify(cfg)
    except QknormError as e:
        fail(str(e))


def _prepare(cfg: RunConfig) -> None:
    from .data.tokens import prepare_tokens

    t0 = time.perf_counter()
    tokenized = prepare_tokens(cfg.data)
    train, val = tokenized.train_tokens(), tokenized.val_tokens()
    print(f"{tokenized.folder}: {len(train):,} training tokens in {len(train.paths)} shards, {len(val):,} validation "
          f"tokens in {len(val.paths)}, vocabulary {tokenized.tokenizer.vocab_size} ({train.dtype.name}); "
          f"ready in {time.perf_counter() - t0:.1f} s")


def _verify(cfg: RunConfig) -> None:
    from .data.tokens import verify_cache

    ok, lines = verify_cache(cfg.data)
    for line in lines:
        print(line)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
