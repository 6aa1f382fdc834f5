"""`vilbert config`: show the configuration a preset, recipe, file and overrides resolve to; list recipes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vilbert.cli._options import CONFIG_OPTION, PRESET_OPTION, RECIPE_OPTION, SET_OPTION, resolve_config
from vilbert.cli.console import console
from vilbert.overrides import config_to_dict, config_to_toml

config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)


@config_app.command("show")
def show(
    preset_name: str = PRESET_OPTION,
    recipe_name: str = RECIPE_OPTION,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print the resolved configuration as TOML (or JSON); `--config` reads either back."""
    config = resolve_config(preset_name, config_file, overrides, recipe_name)
    if as_json:
        typer.echo(json.dumps(config_to_dict(config), indent=2))
    else:
        typer.echo(config_to_toml(config), nl=False)


@config_app.command("recipes")
def recipes() -> None:
    """List the named recipes `--recipe` takes, and their overrides."""
    from vilbert.recipes import RECIPES

    for item in RECIPES.values():
        console.print(f"[bold]{item.name}[/]: {item.purpose}", highlight=False, soft_wrap=True)
        console.print("  " + " ".join(f"--set {o}" for o in item.overrides), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
