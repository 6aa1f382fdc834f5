"""`vilbert demo`: the whole chain on the synthetic corpus, then one summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vilbert.cli._options import DEVICE_OPTION
from vilbert.cli.console import ProgressDisplay, add_log_file, console


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for everything the demo makes."),
    quick: bool = typer.Option(False, "--quick", help="Smaller corpus and fewer epochs: about two minutes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo in --out."),
    device: str = DEVICE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seeds the corpus, the server's failure plan and training."),
    recipe_name: str = typer.Option("cpu", "--recipe", help="The named recipe applied to the tiny preset."),
) -> None:
    """Generate, serve, fetch, preprocess, pretrain, fine-tune and analyse; write OUT/report.md."""
    from vilbert.demo import LOG_NAME, DemoOptions, remove_previous_demo, run_demo

    if overwrite:
        remove_previous_demo(out)
    sizes = DemoOptions.quick if quick else DemoOptions
    options = sizes(out=out, device=device, seed=seed, recipe=recipe_name)
    out.mkdir(parents=True, exist_ok=True)
    add_log_file(out / LOG_NAME)
    with ProgressDisplay("demo", unit="steps") as display:  # no heartbeat: preprocess forks its workers
        stage = ["start"]

        def progress(name: str, info: dict[str, Any]) -> None:
            if name != "progress":
                stage[0] = name
                display.note(f"{name} ...")
            elif info.get("kind") == "step":
                display.update(info["step"], info["total_steps"], stage[0])
            elif "done" in info and "total" in info:
                display.update(info["done"], info["total"], stage[0])

        report = run_demo(options, progress)
    table = Table(title="vilbert demo", show_lines=True)
    for column in ("stage", "what it did", "seconds", "speed", "result"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for s in report.stages:
        table.add_row(s.stage, s.did, f"{s.seconds:.1f}", s.speed, s.result)
    console.print(table)
    console.print(f"report: {report.report_path}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
