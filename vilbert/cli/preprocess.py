"""`vilbert preprocess`: images and captions into one memory-mapped cache per split."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vilbert.cli.console import ProgressDisplay, console
from vilbert.errors import UsageError
from vilbert.pipeline.local_files import DEFAULT_MAX_FILE_BYTES
from vilbert.pipeline.preprocess import REPORT_NAME, PreprocessOptions, PreprocessReport, preprocess
from vilbert.pipeline.sources import SOURCE_FORMATS, open_source
from vilbert.pipeline.text import load_tokenizer

DEFAULT_TOKENIZER = "bert-base-uncased"
"""The text stream's default BERT; offline, pass a local tokenizer.json or vocab.txt."""


def preprocess_command(
    sources: list[Path] = typer.Argument(
        ...,
        help="Fetch output directories; one directory for --format hateful-memes / folder; tar shards or "
        "parquet files, directories of them or quoted glob patterns for --format webdataset / parquet.",
    ),
    out: Path = typer.Option(..., "--out", "--to-mmap", help="Output root: one cache per split in OUT/<split>."),
    fmt: str = typer.Option("fetch", "--format", help=f"Source layout: {', '.join(SOURCE_FORMATS)}."),
    listing: Path = typer.Option(
        None, "--listing", exists=True, dir_okay=False, help="--format folder: TSV or JSONL of image, caption[, label]."
    ),
    image_col: str = typer.Option(
        None,
        "--image-col",
        help="webdataset/parquet: image field(s), first present wins "
        "(default: jpg,jpeg,png,webp in tars; jpg,png,webp,jpeg,image,img in parquet).",
    ),
    caption_col: str = typer.Option(
        None,
        "--caption-col",
        help="webdataset/parquet: caption field(s); json.NAME is a field of the json member "
        "(default: txt,json.caption in tars; caption,txt,text in parquet).",
    ),
    label_col: str = typer.Option(None, "--label-col", help="webdataset/parquet: label field (default: no labels)."),
    key_col: str = typer.Option(
        None,
        "--key-col",
        help="webdataset/parquet: key field (default: the member name in tars; key,id, else FILE/ROW in parquet).",
    ),
    key_prefix: str = typer.Option(
        "none", "--key-prefix", help="webdataset/parquet: none, or source (keys SHARD/KEY: sources whose keys collide)."
    ),
    max_image_bytes: int = typer.Option(
        DEFAULT_MAX_FILE_BYTES,
        "--max-image-bytes",
        help="hateful-memes / folder / webdataset: larger image files or tar members are skipped unread.",
    ),
    tokenizer: str = typer.Option(
        DEFAULT_TOKENIZER,
        "--tokenizer",
        help="A tokenizer.json, a BERT vocab.txt, a directory holding one, or a hub name (online only).",
    ),
    max_len: int = typer.Option(36, "--max-len", help="Tokens per caption, [CLS] and [SEP] included."),
    pixel_dtype: str = typer.Option(
        "float16", "--pixel-dtype", help="float16 (normalized) or uint8 (half the disk; normalized on the device)."
    ),
    normalize: str = typer.Option(
        "half", "--normalize", help="half (timm ViT-B/16), imagenet, clip, or mean=R,G,B:std=R,G,B."
    ),
    image_size: int = typer.Option(224, "--image-size", help="Side of the stored square images."),
    resize_mode: str = typer.Option("center-crop", "--resize-mode", help="center-crop, pad or stretch."),
    train_ratio: float = typer.Option(0.8, "--train-ratio", help="Train share for sources without splits."),
    workers: int = typer.Option(None, "--workers", help="Decoding processes (default: all cores; 0: none)."),
    shard_mb: float = typer.Option(128, "--shard-mb", help="Approximate shard size, MiB (one writer per split)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild the caches under OUT."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into OUT."),
) -> None:
    """Decode, normalize and tokenize SOURCE... into caches under OUT (one per split)."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other")
    columns = {"image": image_col, "caption": caption_col, "label": label_col, "key": key_col}
    source = open_source(
        sources,
        fmt,
        str(listing) if listing is not None else None,
        columns=columns,
        key_prefix=key_prefix,
        max_file_bytes=max_image_bytes,
    )
    options = PreprocessOptions(
        image_size=image_size,
        resize_mode=resize_mode,
        pixel_dtype=pixel_dtype,
        normalize=normalize,
        max_len=max_len,
        train_ratio=train_ratio,
        workers=workers,
        target_shard_bytes=int(shard_mb * (1 << 20)),
        mode="overwrite" if overwrite else "resume" if resume else "create",
    )
    tok = load_tokenizer(tokenizer)
    command = "vilbert " + shlex.join(sys.argv[1:])
    with ProgressDisplay("preprocess", total=source.size_hint(), unit="items") as display:
        report = preprocess(source, out, tok, options, command=command, progress=lambda state: _show(display, state))
    _print_summary(report)


def _show(display: ProgressDisplay, state: dict[str, Any]) -> None:
    display.update(state["done"], state["total"], info=f"{state['rows']:,} rows, {state['skipped']:,} skipped")


def _print_summary(report: PreprocessReport) -> None:
    table = Table(title=f"caches in {report.out}", title_justify="left")
    for column in ("split", "rows", "skipped", "path"):
        table.add_column(column, justify="right" if column in ("rows", "skipped") else "left")
    for split, info in report.splits.items():
        table.add_row(split, f"{info.rows:,}", f"{sum(info.skipped.values()):,}", info.path)
    console.print(table)
    if report.skipped:
        skips = Table(title="skipped by reason", title_justify="left")
        for column in ("reason", "count", "first example"):
            skips.add_column(column, justify="right" if column == "count" else "left", overflow="fold")
        for reason, count in report.skipped.items():
            skips.add_row(reason, f"{count:,}", (report.examples.get(reason) or [""])[0])
        console.print(skips)
    resumed = f", {report.rows_resumed:,} kept from completed shards" if report.rows_resumed else ""
    console.print(
        f"{report.rows:,} rows in {report.seconds:.1f} s{resumed}; report: {Path(report.out) / REPORT_NAME}",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("preprocess")(preprocess_command)
