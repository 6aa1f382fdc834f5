"""`vilbert export`: a run's newest (or a given) checkpoint as safetensors for `ViLBERT.from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import typer

from vilbert.cli.console import console


def export_command(
    run: Path = typer.Argument(..., exists=True, help="A run directory (its newest checkpoint) or a checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Directory for model.safetensors and config.json."),
) -> None:
    """Export the model weights of RUN to OUT (loadable with ViLBERT.from_pretrained(OUT))."""
    from vilbert.train.checkpoint import export_checkpoint, find_checkpoint  # torch loads only when used

    source = find_checkpoint(run)
    directory = export_checkpoint(source, out)
    console.print(f"exported {source} -> {directory}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
