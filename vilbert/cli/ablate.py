"""`vilbert ablate`: pretrain with none / all / MLM+AP / AP only, fine-tune each, several seeds.

Without `--corpus`/`--memes` it first builds the synthetic setting under OUT/data with the real
pipeline (`pipeline.synthetic.caches.prepare_synthetic`: corpus and memes from the same scene
generator, so pretraining can transfer, one WordPiece tokenizer, 64 px caches) and applies the `cpu`
recipe. Every step is skipped when its output already exists, so a second run reuses the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from vilbert.cli._options import CONFIG_OPTION, DEVICE_OPTION, RECIPE_OPTION, SET_OPTION
from vilbert.cli.console import ProgressDisplay, console
from vilbert.config import preset
from vilbert.errors import UsageError
from vilbert.overrides import apply_overrides, load_config
from vilbert.recipes import apply_recipe

__all__ = [
    "SyntheticScale",
    "SYNTHETIC_OVERRIDES",
    "QUICK",
    "FULL",
    "ablate_command",
    "summary_table",
    "register",
]


@dataclass(frozen=True, kw_only=True)
class SyntheticScale:
    """Sizes and budgets of a synthetic ablation (`--quick` or the full one)."""

    corpus: int
    memes: int
    overrides: tuple[str, ...]
    """`--set` overrides applied to the tiny preset before the user's own."""


SYNTHETIC_OVERRIDES = ("pretrain.log_every=20", "pretrain.checkpoint_every=0")
"""On top of the recipe (`cpu` by default): logging every 20 steps and checkpointing only at epoch ends."""
QUICK = SyntheticScale(
    corpus=800, memes=600, overrides=(*SYNTHETIC_OVERRIDES, "pretrain.epochs=3", "finetune.epochs=3")
)
FULL = SyntheticScale(
    corpus=3000, memes=4000, overrides=(*SYNTHETIC_OVERRIDES, "pretrain.epochs=13", "finetune.epochs=4")
)
"""The chain test's scale: ~1,000 pretraining steps (AP needs about that many to leave chance), 200 dev memes."""


def ablate_command(
    quick: bool = typer.Option(False, "--quick", help="A small synthetic grid that runs in minutes on a CPU."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per setting (pretraining and fine-tuning)."),
    settings: str = typer.Option(
        "none,all,all+itc,mlm+ap,ap", "--settings", help="Comma-separated: none, all, all+itc, mlm+ap, ap."
    ),
    corpus: Path = typer.Option(
        None, "--corpus", exists=True, help="Pretraining cache root (train/, test/); default: synthetic."
    ),
    memes: Path = typer.Option(
        None, "--memes", exists=True, help="Fine-tuning cache root (train/, dev_seen/, test_seen/)."
    ),
    out: Path = typer.Option(None, "--out", help="Runs and ablation.json (default: runs/ablate[-quick])."),
    preset_name: str = typer.Option("tiny", "--preset", help="Model and training preset."),
    recipe_name: str = RECIPE_OPTION,
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print ablation.json instead of the table."),
) -> None:
    """The thesis's task-combination experiment, ending in a mean +- std table of downstream accuracy and AUROC."""
    from vilbert.pipeline.synthetic.caches import prepare_synthetic
    from vilbert.train.ablate import AblationOptions, run_ablation

    if (corpus is None) != (memes is None):
        raise UsageError("pass both --corpus and --memes (cache roots built with the same tokenizer), or neither")
    out = out or Path("runs/ablate-quick" if quick else "runs/ablate")
    scale = QUICK if quick else FULL
    base = preset(preset_name)
    if corpus is None:
        base = apply_overrides(apply_recipe(base, recipe_name or "cpu"), scale.overrides)
        console.print(f"synthetic data: {scale.corpus} corpus images, {scale.memes} memes under {out / 'data'}")
        corpus, memes = prepare_synthetic(
            out / "data",
            corpus=scale.corpus,
            memes=scale.memes,
            image_size=base.data.image_size,
            max_len=base.data.max_len,
        )
    else:
        base = apply_recipe(base, recipe_name)
    config = load_config(config_file, overrides or (), base=base)
    options = AblationOptions(
        corpus=corpus, memes=memes, out=out, settings=tuple(_names(settings)), seeds=seeds, device=device
    )
    with ProgressDisplay("ablate", unit="steps", heartbeat=True) as display:
        report = run_ablation(config, options, progress=lambda record: _progress(display, record))
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(summary_table(report["summary"]))
    console.print(f"runs and ablation.json in {out}", soft_wrap=True)


def _names(settings: str) -> list[str]:
    return [s.strip() for s in settings.split(",") if s.strip()]


def _progress(display: ProgressDisplay, record: dict[str, Any]) -> None:
    kind = record["kind"]
    if kind == "step":
        display.update(record["step"], record["total_steps"], record["run"])
    elif kind == "pretrained":
        shown = {k: round(v, 3) for k, v in (record.get("eval") or {}).items() if k.endswith(("_acc", "_top1"))}
        display.note(f"pretrained {record['setting']} seed {record['seed']}: {shown}")
    elif kind == "finetuned":
        display.note(
            f"fine-tuned {record['setting']} seed {record['seed']}: dev AUROC {record['dev_auroc']:.4f} "
            f"acc {record['dev_acc']:.4f}, test AUROC {record['test_auroc']:.4f} acc {record['test_acc']:.4f}"
        )


def _pm(row: dict[str, Any], metric: str) -> str:
    return f"{100 * row[f'{metric}_mean']:.1f} ± {100 * row[f'{metric}_std']:.1f}"


def summary_table(summary: list[dict[str, Any]]) -> Table:
    """Mean ± std (in %) per setting of dev/test accuracy and AUROC, and the AUROC change over `none`."""
    table = Table(
        title="downstream after pretraining with each task set (mean ± std over seeds, %)", title_justify="left"
    )
    for column in (
        "pretraining tasks",
        "seeds",
        "dev acc",
        "dev AUROC",
        "test acc",
        "test AUROC",
        "test AUROC vs none",
    ):
        table.add_column(column, justify="left" if column == "pretraining tasks" else "right")
    for row in summary:
        delta = row.get("test_auroc_vs_none")
        shown = "-" if row["setting"] == "none" or delta is None else f"{100 * delta:+.1f}"
        name = "none (from scratch)" if row["setting"] == "none" else "+".join(row["tasks"])
        table.add_row(
            name,
            str(row["seeds"]),
            _pm(row, "dev_acc"),
            _pm(row, "dev_auroc"),
            _pm(row, "test_acc"),
            _pm(row, "test_auroc"),
            shown,
        )
    return table


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate_command)
