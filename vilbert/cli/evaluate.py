"""`vilbert evaluate`: loss, accuracy and AUROC of a checkpoint on a cache split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vilbert.cli._options import DEVICE_OPTION
from vilbert.cli.console import console
from vilbert.cli.finetune import metrics_table

__all__ = ["evaluate_command", "register"]


def evaluate_command(
    checkpoint: Path = typer.Argument(
        ..., exists=True, help="A run directory, a step-*.pt checkpoint, or an exported model dir."
    ),
    data: Path = typer.Option(..., "--data", exists=True, help="One cache split, e.g. caches/memes/dev_seen."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per forward pass."),
    device: str = DEVICE_OPTION,
    max_batches: int = typer.Option(None, "--max-batches", help="Evaluate only this many batches."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
) -> None:
    """Classifier loss, accuracy and AUROC (labelled caches), the alignment head as a zero-shot classifier,
    and the pretraining tasks' metrics for a pretraining checkpoint."""
    from vilbert.train.evaluate import evaluate

    report = evaluate(checkpoint, data, batch_size=batch_size, device=device, max_batches=max_batches)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        console.print_json(json.dumps(report))
        return
    title = f"{report['kind']} checkpoint {report['checkpoint']} (step {report['step']}) on {report['data']}"
    console.print(f"{title}: {report['rows']:,} rows, split {report['split']}", soft_wrap=True)
    if report["classifier"] is not None:
        note = " (classifier head not trained by pretraining)" if report["kind"] != "finetune" else ""
        rows = [("classifier" + note, report["classifier"]), ("alignment head, zero-shot", report["alignment"])]
        console.print(metrics_table(rows, title="binary classification"))
    if report["pretraining"] is not None:
        console.print(_task_table(report["pretraining"]))


def _task_table(metrics: dict[str, Any]) -> Table:
    table = Table(title="pretraining tasks", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    return table


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
