"""Options shared by the commands that take a run configuration or run on a device."""

from __future__ import annotations

from pathlib import Path

import typer

from vilbert.config import Config, preset
from vilbert.overrides import load_config
from vilbert.recipes import apply_recipe

PRESET_OPTION = typer.Option("vilbert_base", "--preset", help="Starting point: tiny, vilbert_base, vilbert_original.")
CONFIG_OPTION = typer.Option(
    None, "--config", help="A TOML or JSON config (`vilbert config show`, a run's config.json), after the preset."
)
RECIPE_OPTION = typer.Option(
    None, "--recipe", help="A named recipe applied to the preset, e.g. cpu (see `vilbert config recipes`)."
)
SET_OPTION = typer.Option(None, "--set", help="Override one key, e.g. --set pretrain.lr=1e-4 (repeatable).")
VERIFY_CACHE_OPTION = typer.Option(
    False, "--verify-cache", help="Check every shard's checksum and values before training (data.verify_cache)."
)

DEVICE_OPTION = typer.Option("auto", "--device", help="auto, cpu or cuda.")
MAX_STEPS_OPTION = typer.Option(None, "--max-steps", help="Stop (with a checkpoint) after N optimizer steps.")


def resolve_config(
    preset_name: str, config_file: Path | None, overrides: list[str] | None, recipe_name: str | None = None
) -> Config:
    """The preset, then the recipe, then the TOML file, then the `--set` overrides."""
    return load_config(config_file, overrides or (), base=apply_recipe(preset(preset_name), recipe_name))
