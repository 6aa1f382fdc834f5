"""`vilbert model info`: what a configuration builds, parameters by part (total and trainable)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from vilbert.cli._options import CONFIG_OPTION, PRESET_OPTION, SET_OPTION, resolve_config
from vilbert.cli.console import console
from vilbert.config import CrossConfig

model_app = typer.Typer(help="Inspect the ViLBERT model a configuration builds.", no_args_is_help=True)

_PART_NOTES = {
    "text": "BERT embeddings + encoder",
    "vision": "timm ViT (patch embed, blocks, norm)",
    "cross": "co-attention / dual self-attention layers",
    "heads": "poolers, MLM, alignment, MIM projection, classifier, mask token",
    "all": "",
}


def _placement(cross: CrossConfig) -> str:
    if not cross.before_text_layer and not cross.before_vision_layer:
        return "after both encoders"
    text = ",".join(map(str, cross.before_text_layer)) or "end"
    vision = ",".join(map(str, cross.before_vision_layer)) or "end"
    return f"before text layers {text} / vision blocks {vision}"


@model_app.command("info")
def info(
    preset_name: str = PRESET_OPTION,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Build the model without weights (offline, on the meta device) and count its parameters by part."""
    from vilbert.model import parameter_counts  # torch and timm load only for this command

    config = resolve_config(preset_name, config_file, overrides).model
    report = parameter_counts(config)
    if as_json:
        console.print_json(json.dumps(report))
        return
    cross = config.cross
    table = Table(
        title=f"ViLBERT ({preset_name}): cross {'/'.join(cross.pattern)} {_placement(cross)}; "
        f"frozen: {', '.join(config.freeze) or 'nothing'}",
        title_justify="left",
    )
    for name, justify in (
        ("part", "left"),
        ("total", "right"),
        ("trainable", "right"),
        ("frozen", "right"),
        ("what", "left"),
    ):
        table.add_column(name, justify=justify)
    for part, counts in report.items():
        total, trainable = counts["total"], counts["trainable"]
        style = "bold" if part == "all" else None
        table.add_row(
            part,
            f"{total:,}",
            f"{trainable:,}",
            f"{total - trainable:,}",
            _PART_NOTES[part],
            style=style,
            end_section=part == "heads",
        )
    console.print(table)
    everything = report["all"]
    console.print(f"trainable params: {everything['trainable']}/{everything['total']}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
