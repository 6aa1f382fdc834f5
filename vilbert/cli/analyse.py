"""`vilbert analyse`: per-cross-layer similarity of the pooled streams, and retrieval recall@k."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from vilbert.cli._options import DEVICE_OPTION
from vilbert.cli.console import ProgressDisplay, console

__all__ = ["analyse_command", "register"]


def analyse_command(
    checkpoint: Path = typer.Argument(
        ..., exists=True, help="A run directory, a step-*.pt checkpoint, or an exported model dir."
    ),
    data: Path = typer.Option(
        ..., "--data", exists=True, help="One cache split of caption/image pairs, e.g. caches/cc/test."
    ),
    pairs: int = typer.Option(1000, "--pairs", help="Pairs for the similarity analysis (a seeded sample)."),
    retrieval_pairs: int = typer.Option(
        None, "--retrieval-pairs", help="Pairs for retrieval, M^2 forward passes (default: 1000 on CUDA, 200 on CPU)."
    ),
    seed: int = typer.Option(0, "--seed", help="Chooses the sample and the mismatching derangement."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per forward pass (retrieval uses 4x)."),
    device: str = DEVICE_OPTION,
    out: Path = typer.Option(
        None,
        "--out",
        help="Directory for analysis.json and analysis.png (default: beside the checkpoint, in RUN/analysis).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
) -> None:
    """Before the cross stack and after every cross layer: mean cosine(pooled text, pooled image) of
    aligned and of mismatched pairs, their gap, and each layer's gap against the before row's;
    image->text and text->image recall@1/5/10 scored by the alignment head."""
    from vilbert.train.splits import open_cache

    open_cache(data)  # a wrong --data answers before torch and the model load
    from vilbert.train.analyse import analyse, plot_analysis
    from vilbert.train.distributed import resolve_device

    dev = resolve_device(device)
    if retrieval_pairs is None:
        retrieval_pairs = 1000 if dev.type == "cuda" else 200
    with ProgressDisplay("analyse", unit="captions", heartbeat=True) as display:

        def progress(record: dict) -> None:
            if record.get("kind") == "retrieval":
                display.update(record["done"], record["total"], "retrieval")

        report = analyse(
            checkpoint,
            data,
            pairs=pairs,
            retrieval_pairs=retrieval_pairs,
            seed=seed,
            batch_size=batch_size,
            device=str(dev),
            progress=progress,
        )
    out = out or _default_out(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    png = plot_analysis(report, out / "analysis.png")
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
        return
    console.print(_similarity_table(report))
    console.print(_retrieval_table(report))
    console.print(f"report: {out / 'analysis.json'}, plot: {png}", soft_wrap=True)


def _default_out(checkpoint: Path) -> Path:
    run = checkpoint.parent.parent if checkpoint.is_file() else checkpoint
    return run / "analysis"


def _similarity_table(report) -> Table:
    title = f"cosine(pooled text, pooled image), {report.pairs} pairs; vs before: gap - the before row's gap"
    table = Table(title=title, title_justify="left")
    for column in ("layer", "aligned", "mismatched", "gap", "s.e.", "vs before", "s.e. "):
        table.add_column(column, justify="left" if column == "layer" else "right")
    before = [report.before] if report.before is not None else []
    for s in [*before, *report.layers]:
        first = s.kind == "before"
        table.add_row(
            s.kind if first else f"{s.layer} {s.kind}",
            f"{s.aligned:.4f}",
            f"{s.mismatched:.4f}",
            f"{s.gap:+.4f}",
            f"{s.gap_stderr:.4f}",
            "" if first else f"{s.gap_vs_before:+.4f}",
            "" if first else f"{s.gap_vs_before_stderr:.4f}",
        )
    return table


def _retrieval_table(report) -> Table:
    table = Table(title=f"retrieval by the alignment head, {report.retrieval_pairs} pairs", title_justify="left")
    for column in ("recall", "image->text", "text->image", "chance"):
        table.add_column(column, justify="left" if column == "recall" else "right")
    for k in (1, 5, 10):
        table.add_row(
            f"R@{k}",
            f"{report.retrieval[f'i2t_r{k}']:.3f}",
            f"{report.retrieval[f't2i_r{k}']:.3f}",
            f"{report.chance[f'r{k}']:.3f}",
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("analyse")(analyse_command)
