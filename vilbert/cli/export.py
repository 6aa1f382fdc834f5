"""`vilbert export`: a run as a model directory others can load, and each stream in its home library's format."""

from __future__ import annotations

from pathlib import Path

import typer

from vilbert.cli.console import console


def export_command(
    run: Path = typer.Argument(..., exists=True, help="A run directory (its newest checkpoint) or a checkpoint file."),
    out: Path = typer.Option(
        ..., "--out", help="Directory for model.safetensors, config.json, tokenizer.json, the card."
    ),
    cache: Path = typer.Option(
        None, "--cache", help="The cache the run trained on, for its tokenizer (default: the run's --data)."
    ),
    text_as_bert: Path = typer.Option(
        None, "--text-as-bert", help="Also write the text stream as a transformers BertModel directory here."
    ),
    vision_as_timm: Path = typer.Option(
        None, "--vision-as-timm", help="Also write the vision stream as a timm safetensors file here."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write over a non-empty --out."),
) -> None:
    """Export RUN to OUT: ViLBERT.from_pretrained(OUT) loads it; its tokenizer and normalization travel with it."""
    from vilbert.train.export import export_run  # torch loads only when used

    result = export_run(
        run, out, cache=cache, text_as_bert=text_as_bert, vision_as_timm=vision_as_timm, overwrite=overwrite
    )
    console.print(f"exported {result.checkpoint} -> {result.directory}", highlight=False, soft_wrap=True)
    if result.bert_directory is not None:
        console.print(f"text stream (BertModel.from_pretrained): {result.bert_directory}", highlight=False)
    if result.timm_file is not None:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in result.timm_kwargs.items())
        console.print(
            f"vision stream (timm): timm.create_model({result.timm_name!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(result.timm_file)!r}), {kwargs})",
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
