"""Validation sized to the run: by default a validation reads at most data.val_token_ratio times the tokens
trained since the last one (at least VAL_MIN_TOKENS), so a short run is not mostly validation; an explicit
cap or a null ratio (the whole held-out split) still mean what they say, and --help states the default."""

from __future__ import annotations

from omegaconf import OmegaConf

from qknorm.cli import help_page
from qknorm.config import VAL_MIN_TOKENS, default_tree
from qknorm.rundir import identity

from .conftest import compose_config, compose_raw


def test_the_default_cap_is_a_share_of_the_tokens_trained_between_validations():
    short = compose_config(["model=nano", "trainer.max_steps=30"])  # a validation every 4 steps of 32 x 256 tokens
    assert short.trainer.val_every_n_steps == 4
    assert short.data.val_max_tokens == round(0.3 * 4 * 32 * 256) + 1  # ceil(9830.4)
    quick_start = compose_config([])  # 350 steps: every 44 steps, more than Hamlet's 67,707 tokens
    assert quick_start.data.val_max_tokens == 108_135
    tiny_interval = compose_config(["trainer.val_every_n_steps=1", "data.batch_size=4", "data.seq_len=64"])
    assert tiny_interval.data.val_max_tokens == VAL_MIN_TOKENS


def test_an_explicit_cap_or_a_null_ratio_means_what_it_says():
    assert compose_config(["data.val_max_tokens=4096"]).data.val_max_tokens == 4096
    assert compose_config(["data.val_token_ratio=null"]).data.val_max_tokens is None  # the whole held-out split
    assert default_tree()["data"]["val_token_ratio"] == 0.3


def test_the_concrete_cap_is_the_identity_not_the_ratio_that_gave_it():
    def ident(overrides):
        return identity(OmegaConf.to_container(compose_raw(["paths.cache_dir=/tmp/unused", *overrides]), resolve=True))

    a = ident(["data.val_token_ratio=0.3"])
    assert "data.val_token_ratio" not in a and a["data.val_max_tokens"] == 108_135
    assert ident(["data.val_token_ratio=0.3", "data.val_max_tokens=108135"]) == a  # one run, however spelled
    assert ident(["data.val_token_ratio=0.2"]) != a


def test_sweeps_validate_on_the_whole_split_unless_their_grid_caps_it():
    cpu = compose_config(["sweeps=lr_tolerance", "sweeps.size=cpu", "model=tiny", "trainer.max_steps=200"])
    assert cpu.data.val_max_tokens is None
    assert compose_config(["sweeps=lr_tolerance", "sweeps.size=smoke"]).data.val_max_tokens == 8192


def test_help_states_the_default_cap():
    page = help_page()
    assert "data.val_token_ratio=0.3" in page and f"at least {VAL_MIN_TOKENS} tokens" in page and "about 10%" in page
