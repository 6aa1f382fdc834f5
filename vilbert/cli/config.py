"""`vilbert config`: show the configuration a preset, file and overrides resolve to."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vilbert.cli._options import CONFIG_OPTION, PRESET_OPTION, SET_OPTION, resolve_config
from vilbert.cli.console import console
from vilbert.config import config_to_dict

config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)


@config_app.command("show")
def show(
    preset_name: str = PRESET_OPTION,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
) -> None:
    """Print the resolved configuration as JSON."""
    config = resolve_config(preset_name, config_file, overrides)
    console.print_json(json.dumps(config_to_dict(config)))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
