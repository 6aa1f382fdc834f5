"""`vilbert tokenizer train|encode`: a BERT-style WordPiece tokenizer from the corpus's captions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import typer
from rich.table import Table

from vilbert.cli.console import console
from vilbert.errors import UsageError
from vilbert.pipeline.sources import iter_captions
from vilbert.pipeline.text import load_tokenizer, tokenizer_fingerprint, train_wordpiece

tokenizer_app = typer.Typer(help="Train and try tokenizers.", no_args_is_help=True)


@tokenizer_app.command("train")
def train(
    sources: list[Path] = typer.Argument(
        ...,
        help="Fetch output directories, Hateful Memes directories (train.jsonl), text/TSV/JSONL files of captions, "
        "webdataset tar shards or parquet files (or directories, quoted globs of them).",
    ),
    fmt: str = typer.Option("auto", "--format", help="auto (each source by what it is), webdataset or parquet."),
    caption_col: str = typer.Option(
        None, "--caption-col", help="webdataset/parquet: caption field(s), as for `vilbert preprocess`."
    ),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Tokens in the vocabulary, specials included."),
    out: Path = typer.Option(..., "--out", help="Where to write tokenizer.json."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Least occurrences for a merge."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Train BERT-style uncased WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK]) on the captions."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    counted = _Counter(iter_captions(sources, fmt, caption_col))
    tokenizer = train_wordpiece(counted, vocab_size, min_frequency=min_frequency)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    console.print(
        f"trained on {counted.count:,} captions: {tokenizer.get_vocab_size():,} tokens -> {out} "
        f"(fingerprint {tokenizer_fingerprint(tokenizer)[:12]})",
        soft_wrap=True,
    )


@tokenizer_app.command("encode")
def encode(
    tokenizer: str = typer.Argument(..., help="A tokenizer.json, vocab.txt, directory or hub name."),
    texts: list[str] = typer.Argument(..., help="Captions to encode."),
) -> None:
    """Show the tokens and ids of a few captions."""
    tok = load_tokenizer(tokenizer)
    table = Table("caption", "tokens", "ids")
    for text in texts:
        encoding = tok.encode(text)
        table.add_row(text, " ".join(encoding.tokens), " ".join(map(str, encoding.ids)))
    console.print(table)


class _Counter:
    """Passes captions through, counting them."""

    def __init__(self, items: Iterable[str]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            yield item


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")
