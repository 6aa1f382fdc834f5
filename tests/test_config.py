"""Config: thesis defaults, validation, TOML and --set overrides."""

from __future__ import annotations

import dataclasses

import pytest

from vilbert.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    preset,
    tiny,
    vilbert_base,
)
from vilbert.errors import ConfigError


def test_thesis_defaults():
    config = vilbert_base()
    assert config.model.text.hidden_size == 768
    assert config.model.text.vocab_size == 30522
    assert config.model.text.num_layers == 12
    assert config.model.text.num_heads == 12
    assert config.model.text.dropout == 0.1
    assert config.model.vision.image_size == 224
    assert config.pretrain.lr == 3e-5
    assert config.pretrain.batch_size == 32
    assert config.data.train_ratio == 0.8


def test_configs_are_frozen_and_keyword_only():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pretrain = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        type(config.pretrain)(4)  # type: ignore[misc]


def test_overrides_coerce_types():
    config = apply_overrides(
        tiny(),
        ["pretrain.lr=1e-4", "pretrain.tasks=mlm,ap", "model.cross.pattern=[co, co]", "model.text.pretrained=none"],
    )
    assert config.pretrain.lr == 1e-4
    assert config.pretrain.tasks == ("mlm", "ap")
    assert config.model.cross.pattern == ("co", "co")
    assert config.model.text.pretrained is None
    assert config.model.text.hidden_size == tiny().model.text.hidden_size


def test_overrides_are_validated_together_in_any_order():
    # Each alone would be refused against tiny's batch 64 / the other's old value; together they fit.
    config = apply_overrides(
        tiny(), ["pretrain.batch_size=16", "pretrain.ap_batch_size=12", "pretrain.lr=1", "pretrain.lr=2"]
    )
    assert (config.pretrain.batch_size, config.pretrain.ap_batch_size) == (16, 12)
    assert config.pretrain.lr == 2.0  # the last value of a repeated key
    with pytest.raises(ConfigError, match="ap_batch_size=24 is invalid"):
        apply_overrides(tiny(), ["pretrain.ap_batch_size=24", "pretrain.batch_size=16"])
    with pytest.raises(ConfigError, match="pretrain is also set as a value"):
        apply_overrides(tiny(), ["pretrain=3", "pretrain.lr=1"])
    with pytest.raises(ConfigError, match="also given as a section"):
        apply_overrides(tiny(), ["pretrain.lr=1", "pretrain=3"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("pretrain.lrr=1", "unknown config key 'pretrain.lrr'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("pretrain.lr=-1", "pretrain.lr=-1.0 is invalid; valid: > 0"),
        ("pretrain.epochs=two", "expects int"),
        ("pretrain.schedule=steep", "one of linear, cosine, constant"),
        ("model.text.num_heads=5", "a divisor of text.hidden_size"),
        ("pretrain=3", "is a section"),
        ("no-equals-sign", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key_and_valid_range(override, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides(vilbert_base(), [override])
    assert fragment in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"pretrain": {"lrr": 1}})
    assert "valid keys in pretrain:" in str(info.value)
    assert "lr" in str(info.value)


def test_toml_file_with_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[pretrain]\nepochs = 2\n[model.cross]\npattern = ["co"]\n')
    config = load_config(path, ["pretrain.epochs=3"])
    assert config.model.text.hidden_size == tiny().model.text.hidden_size
    assert config.pretrain.epochs == 3
    assert config.model.cross.pattern == ("co",)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_round_trip_through_dict():
    config = apply_overrides(tiny(), ["pretrain.tasks=ap"])
    assert config_from_dict(config_to_dict(config), base=Config()) == config


def test_unknown_preset():
    with pytest.raises(ConfigError, match="valid: vilbert_base, vilbert_original, tiny"):
        preset("huge")


def test_itc_needs_a_sub_batch_of_two_rows():
    with pytest.raises(ConfigError, match=r"pretrain.itc_batch_size=1 is invalid; valid: >= 2"):
        apply_overrides(tiny(), ["pretrain.tasks=[mlm,itc]", "pretrain.itc_batch_size=1"])
    assert apply_overrides(tiny(), ["pretrain.itc_batch_size=1"]).pretrain.itc_batch_size == 1  # itc is off


def test_a_removed_key_loads_from_a_saved_config_but_not_from_set() -> None:
    saved = config_from_dict({"model": {"itc_projection_dim": 256, "num_labels": 3}})
    assert saved.model.num_labels == 3  # the rest of the saved config still applies
    with pytest.raises(ConfigError, match="model.itc_projection_dim no longer exists: ITC.s projections map"):
        apply_overrides(tiny(), ["model.itc_projection_dim=128"])
