"""`vilbert finetune`: binary classification (Hateful Memes) from a pretraining run or from scratch.

vilbert finetune --data data/memes --init runs/tiny --out runs/ft --preset tiny
torchrun --nproc-per-node 2 -m vilbert finetune --data data/memes --init none --out runs/ft-ddp
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

import vilbert.cli._options as shared
from vilbert.cli.console import ProgressDisplay, add_log_file, console
from vilbert.config import Config, check_frozen_parts, preset
from vilbert.errors import UsageError
from vilbert.overrides import apply_overrides, config_from_dict, load_config
from vilbert.recipes import apply_recipe

__all__ = ["finetune_command", "metrics_table", "register"]


def _base_config(preset_name: str | None, init: Path | None, run: Path, resume: bool) -> Config:
    """`--preset` when given; else the config of the run being resumed, or of the `--init` run."""
    if preset_name is not None:
        return preset(preset_name)
    if resume:
        from vilbert.train.checkpoint import load_checkpoint

        return config_from_dict(load_checkpoint(run)["config"])
    if init is not None:
        from vilbert.train.loading import load_model

        loaded = load_model(init)
        if loaded.config is not None:
            return loaded.config
    return preset("vilbert_base")


def _init_path(init: str) -> Path | None:
    if init.lower() == "none":
        return None
    path = Path(init)
    if not path.exists():
        raise UsageError(
            f"--init {init!r} does not exist; pass a pretraining run directory, a checkpoint, "
            "an exported model directory, or 'none' to train from scratch"
        )
    return path


def _freeze_override(freeze: str | None) -> list[str]:
    if freeze is None:
        return []
    parts = "" if freeze.strip().lower() == "none" else freeze
    return [f"model.freeze=[{parts}]"]


def finetune_command(
    data: Path = typer.Option(
        ..., "--data", exists=True, help="Cache root with train/, dev_seen/, test_seen/ (labelled)."
    ),
    init: str = typer.Option(
        ...,
        "--init",
        help="Pretraining run dir or checkpoint, exported model dir, or 'none' (the encoders from "
        "model.text.pretrained / model.vision.pretrained, new cross layers and heads).",
    ),
    run: Path = typer.Option(..., "--out", help="Run directory (runs/NAME) for checkpoints, metrics, results."),
    preset_name: str = typer.Option(None, "--preset", help="tiny, vilbert_base, vilbert_original (default: --init's)."),
    recipe_name: str = shared.RECIPE_OPTION,
    config_file: Path = shared.CONFIG_OPTION,
    overrides: list[str] = shared.SET_OPTION,
    freeze: str = typer.Option(None, "--freeze", help="Parts kept frozen: e.g. text,vision or none."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    device: str = shared.DEVICE_OPTION,
    max_steps: int = shared.MAX_STEPS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the table."),
    verify_cache: bool = shared.VERIFY_CACHE_OPTION,
) -> None:
    """Fine-tune a binary classifier; accuracy and AUROC on train and dev every epoch, test at the end."""
    init_path = _init_path(init)
    base = apply_recipe(_base_config(preset_name, init_path, run, resume), recipe_name)
    verify = ["data.verify_cache=true"] if verify_cache else []
    config = apply_overrides(load_config(config_file, overrides or (), base=base), _freeze_override(freeze) + verify)
    if init_path is None and not resume:
        check_frozen_parts(config.model)  # the run's own check, here before torch and the model load
    from vilbert.train.finetune import RESULTS_NAME, FinetuneOptions, finetune

    options = FinetuneOptions(data=data, run_dir=run, init=init_path, resume=resume, device=device, max_steps=max_steps)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and prints
    handler = None
    if main_rank:
        run.mkdir(parents=True, exist_ok=True)
        handler = add_log_file(run / "train.log")
    try:
        with _Display() if main_rank else nullcontext() as display:  # other ranks show nothing
            result = finetune(config, options, progress=display.update if display else None)
    finally:
        if handler is not None:
            handler.close()
    if not main_rank:
        return
    if result.stopped != "completed":
        console.print(
            f"stopped ({result.stopped}) at step {result.step}; checkpoint {result.checkpoint}; "
            f"continue with --resume --out {run}",
            soft_wrap=True,
        )
        return
    if as_json:
        console.print_json(json.dumps(result.results))
        return
    console.print(results_table(result.results, title=f"fine-tuning {run} (init: {result.results['init_kind']})"))
    console.print(f"results: {run / RESULTS_NAME}, plots: {run / 'plots'}", soft_wrap=True)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def metrics_table(rows: list[tuple[str, dict[str, float] | None]], title: str = "") -> Table:
    """One row per (name, binary metrics): loss, accuracy, AUROC, n."""
    table = Table(title=title or None, title_justify="left")
    for column in ("split", "loss", "accuracy", "AUROC", "n"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, m in rows:
        m = m or {}
        table.add_row(name, _fmt(m.get("loss")), _fmt(m.get("accuracy")), _fmt(m.get("auroc")), str(m.get("n", "-")))
    return table


def results_table(results: dict[str, Any], title: str = "") -> Table:
    """Per epoch train and dev metrics, then the test split."""
    rows: list[tuple[str, dict[str, float] | None]] = []
    for entry in results["epochs"]:
        rows.append((f"epoch {entry['epoch']} train", entry["train"]))
        if entry.get("dev") is not None:
            rows.append((f"epoch {entry['epoch']} dev", entry["dev"]))
    rows.append(("test", results["final"]["test"]))
    return metrics_table(rows, title)


class _Display:
    """Progress over optimizer steps (a bar, or a line at a steady interval in a batch job); a line per
    evaluation with the train and dev metrics."""

    def __init__(self) -> None:
        self.display = ProgressDisplay("finetune", unit="steps", heartbeat=True)
        self.info = ""

    def __enter__(self) -> _Display:
        self.display.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.display.__exit__(*exc)

    def update(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind == "start":
            self.display.update(record["step"], record["total_steps"])
            trainable = f"{record['trainable']:,}/{record['parameters']:,}"
            self.display.note(
                f"{trainable} parameters trainable on {record['device']}; {record['steps_per_epoch']} steps per epoch"
            )
        elif kind == "step":
            self.display.update(record["step"], record["total_steps"], self.info)
        elif kind == "train":
            self.info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['samples_per_s']:.0f} samples/s"
        elif kind == "eval":
            parts = [f"{k} {v:.4f}" for k, v in record.items() if k.endswith(("_acc", "_auroc", "_loss"))]
            self.display.note(f"epoch {record['epoch']} step {record['step']}: " + "  ".join(parts))


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
