"""`vilbert plot`: PNG curves (loss and accuracy per task, throughput) of one run or several overlaid."""

from __future__ import annotations

from pathlib import Path

import typer

from vilbert.cli.console import console


def plot_command(
    runs: list[Path] = typer.Argument(
        ..., exists=True, file_okay=False, help="Run directories (each with metrics.jsonl) to draw together."
    ),
    out: Path = typer.Option(None, "--out", help="Output directory (default: RUN/plots of the first run)."),
    smooth: int = typer.Option(5, "--smooth", help="Moving-average window over train records (1: none)."),
) -> None:
    """Draw the curves of RUN... as losses.png, accuracy.png, throughput.png and curves.png."""
    from vilbert.train.plot import plot_runs  # matplotlib loads only when used

    written = plot_runs(runs, out or runs[0] / "plots", smooth=smooth)
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_command)
