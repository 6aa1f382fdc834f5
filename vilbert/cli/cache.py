"""`vilbert cache inspect|verify`: what a cache holds, and whether every byte of it is sound."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vilbert.cache import MANIFEST_NAME, CacheReader, verify_cache
from vilbert.cli.console import console, err_console

cache_app = typer.Typer(help="Inspect and verify tensor caches.", no_args_is_help=True)

DIR_ARGUMENT = typer.Argument(..., exists=True, file_okay=False, help=f"A cache directory (holding {MANIFEST_NAME}).")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@cache_app.command("inspect")
def inspect(
    directory: Path = DIR_ARGUMENT,
    samples: int = typer.Option(3, "--samples", "-n", help="How many captions to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead."),
) -> None:
    """Show what a cache holds: rows, shards, dtype, normalization, tokenizer, a few captions."""
    reader = CacheReader(directory)
    manifest = reader.manifest
    if as_json:
        console.print_json(json.dumps(manifest.to_dict()))
        return
    sizes = [s.bytes for s in manifest.shards]
    table = Table(title=f"cache {directory}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [
        ("split", manifest.split),
        ("rows", f"{manifest.num_rows:,}"),
        (
            "shards",
            f"{len(sizes)} ({_size(sum(sizes))} total, {_size(max(sizes, default=0))} largest, "
            f"{manifest.rows_per_shard:,} rows each)",
        ),
        (
            "pixels",
            f"{manifest.pixel_dtype} {manifest.layout} {manifest.channels}x{manifest.image_size}x{manifest.image_size}",
        ),
        ("normalization", manifest.normalization.describe()),
        ("tokenizer", f"{manifest.tokenizer_fingerprint[:19]}... vocab {manifest.vocab_size:,}"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in manifest.special_token_ids.items())),
        ("max_len", str(manifest.max_len)),
        ("labels / captions", f"{manifest.has_labels} / {manifest.has_captions}"),
        ("format", f"{manifest.format} v{manifest.format_version}"),
        ("created", manifest.created_at),
        ("command", manifest.command),
    ]
    rows += [(f"extra.{k}", _short(json.dumps(v))) for k, v in manifest.extra.items()]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    _print_samples(reader, min(samples, len(reader)))


def _print_samples(reader: CacheReader, count: int) -> None:
    if count <= 0:
        return
    indices = list(range(count))
    table = Table(title="first rows", title_justify="left")
    for column in ("key", "tokens", "label", "caption"):
        table.add_column(column)
    gathered = reader.gather(indices)
    lengths, labels = gathered["num_tokens"], gathered.get("label")
    captions = reader.captions(indices) if reader.manifest.has_captions else [""] * count
    for i, key in enumerate(reader.keys(indices)):
        label = "" if labels is None else str(labels[i])
        table.add_row(key, str(lengths[i]), label, captions[i])
    console.print(table)


@cache_app.command("verify")
def verify(directory: Path = DIR_ARGUMENT) -> None:
    """Check every shard's checksum, schema and contents; exit 1 naming the first bad shard."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("verifying", total=None)

        def progress(event: dict) -> None:
            bar.update(task, completed=event["bytes"], total=event["total_bytes"], description=event["shard"])

        report = verify_cache(directory, progress=progress)
    report.raise_if_bad()
    algorithms = sorted({s.checksum.split(":", 1)[0] for s in report.manifest.shards}) if report.manifest else []
    console.print(
        f"OK {directory}: {report.shards_checked} shard{'' if report.shards_checked == 1 else 's'}, "
        f"{report.rows:,} rows, "
        f"{_size(report.bytes)} verified ({', '.join([*algorithms, 'schema', 'contents'])})"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
