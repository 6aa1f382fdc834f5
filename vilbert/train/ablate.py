"""The thesis's task-combination experiment: which pretraining tasks help the downstream task?

    for each setting (none | all = mlm+ap+mim | all+itc | mlm+ap | ap) and each seed s:
        pretrain on CORPUS with the setting's tasks and pretrain.seed = s   (skipped for `none`)
        fine-tune on MEMES from that run (or from scratch) with finetune.seed = s
    -> per setting: mean +- std over seeds of dev and test accuracy and AUROC

OUT/pretrain-<setting>-s<seed>/ and OUT/finetune-<setting>-s<seed>/ are ordinary run directories;
OUT/ablation.json holds every run's numbers and the summary. Re-running with the same OUT continues:
finished fine-tuning runs are read back from their results.json, unfinished runs resume from their
newest checkpoint (a finished pretraining run resumes to an immediate end).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vilbert.config import Config
from vilbert.errors import UsageError
from vilbert.overrides import apply_overrides
from vilbert.train.checkpoint import CheckpointManager
from vilbert.train.finetune import RESULTS_NAME, FinetuneOptions, finetune
from vilbert.train.pretrain import PretrainOptions, pretrain

__all__ = ["SETTINGS", "METRICS", "AblationOptions", "run_ablation", "summarize_runs"]

log = logging.getLogger(__name__)

SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "all": ("mlm", "ap", "mim"),
    "all+itc": ("mlm", "ap", "mim", "itc"),
    "mlm+ap": ("mlm", "ap"),
    "ap": ("ap",),
}
"""The thesis's four rows (no pretraining, all three tasks, MLM + AP, AP only) and `all+itc`: the three
with the image-text contrastive task, which from scratch is what lets AP leave chance with MIM on."""
METRICS = ("dev_acc", "dev_auroc", "test_acc", "test_auroc")
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class AblationOptions:
    """The grid and where it runs.

    Attributes:
        corpus: Pretraining cache root (`train/`, `test/`).
        memes: Fine-tuning cache root (`train/`, `dev_seen/`, `test_seen/`), same tokenizer.
        out: Directory for all runs and `ablation.json`.
        settings: Names from `SETTINGS`, in table order.
        seeds: Seeds 0..seeds-1 for each setting (pretraining and fine-tuning).
        device: `auto`, `cpu` or `cuda`.
    """

    corpus: Path
    memes: Path
    out: Path
    settings: tuple[str, ...] = tuple(SETTINGS)
    seeds: int = 3
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise UsageError(f"unknown ablation setting(s) {unknown or '(none given)'}; valid: {', '.join(SETTINGS)}")
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, got {self.seeds}")


def _pretrain_run(config: Config, options: AblationOptions, setting: str, seed: int, progress: Progress | None) -> Path:
    run_dir = options.out / f"pretrain-{setting}-s{seed}"
    tasks = ",".join(SETTINGS[setting])
    cfg = apply_overrides(config, [f"pretrain.tasks=[{tasks}]", f"pretrain.seed={seed}"])
    resume = CheckpointManager(run_dir).latest() is not None
    result = pretrain(
        cfg,
        PretrainOptions(data=options.corpus, run_dir=run_dir, resume=resume, device=options.device),
        _steps_only(progress, f"pretrain {setting} seed {seed}"),
    )
    if result.stopped != "completed":
        raise UsageError(f"pretraining {run_dir} stopped ({result.stopped}); run the ablation again to continue")
    if progress is not None:
        progress(
            {"kind": "pretrained", "setting": setting, "seed": seed, "run": str(run_dir), "eval": result.last_eval}
        )
    return run_dir


def _steps_only(progress: Progress | None, run: str) -> Progress | None:
    """The inner run's optimizer steps, tagged with the run, for the ablation's progress display."""
    if progress is None:
        return None
    return lambda record: progress({**record, "run": run}) if record.get("kind") == "step" else None


def _finetune_run(
    config: Config,
    options: AblationOptions,
    setting: str,
    seed: int,
    init: Path | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    run_dir = options.out / f"finetune-{setting}-s{seed}"
    if (run_dir / RESULTS_NAME).is_file():
        log.info("%s is done; reading its results", run_dir)
        return json.loads((run_dir / RESULTS_NAME).read_text())
    cfg = apply_overrides(config, [f"finetune.seed={seed}"])
    resume = CheckpointManager(run_dir).latest() is not None
    result = finetune(
        cfg,
        FinetuneOptions(
            data=options.memes, run_dir=run_dir, init=init, resume=resume, device=options.device, plots=False
        ),
        _steps_only(progress, f"finetune {setting} seed {seed}"),
    )
    if result.stopped != "completed":
        raise UsageError(f"fine-tuning {run_dir} stopped ({result.stopped}); run the ablation again to continue")
    return result.results


def _run_metrics(results: dict[str, Any]) -> dict[str, float]:
    final = results["final"]
    out = {}
    for split in ("dev", "test"):
        metrics = final.get(split) or {}
        out[f"{split}_acc"] = metrics.get("accuracy", math.nan)
        out[f"{split}_auroc"] = metrics.get("auroc", math.nan)
    return out


def summarize_runs(runs: Sequence[dict[str, Any]], settings: Sequence[str]) -> list[dict[str, Any]]:
    """Per setting: `{"setting", "tasks", "seeds", "<metric>_mean", "<metric>_std"}` (sample std, 0 for
    one seed) over the runs of that setting, and the difference of the means to `none` if present."""
    rows = []
    baseline: dict[str, float] = {}
    for setting in settings:
        chosen = [r for r in runs if r["setting"] == setting]
        row: dict[str, Any] = {"setting": setting, "tasks": list(SETTINGS[setting]), "seeds": len(chosen)}
        for metric in METRICS:
            values = [r[metric] for r in chosen if math.isfinite(r[metric])]
            mean = sum(values) / len(values) if values else math.nan
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, math.sqrt(var)
        if setting == "none":
            baseline = {m: row[f"{m}_mean"] for m in METRICS}
        rows.append(row)
    for row in rows:
        for metric in METRICS:
            row[f"{metric}_vs_none"] = row[f"{metric}_mean"] - baseline[metric] if baseline else None
    return rows


def run_ablation(config: Config, options: AblationOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Pretrain and fine-tune every (setting, seed); returns (and writes `OUT/ablation.json`)
    `{"runs": [...], "summary": [...], "options": {...}}`."""
    options.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for setting in options.settings:
        for seed in range(options.seeds):
            if progress is not None:
                progress({"kind": "run", "setting": setting, "seed": seed})
            init = _pretrain_run(config, options, setting, seed, progress) if SETTINGS[setting] else None
            results = _finetune_run(config, options, setting, seed, init, progress)
            record = {"setting": setting, "seed": seed, "init": str(init) if init else None, **_run_metrics(results)}
            runs.append(record)
            if progress is not None:
                progress({"kind": "finetuned", **record})
    report = {
        "runs": runs,
        "summary": summarize_runs(runs, options.settings),
        "options": {
            "corpus": str(options.corpus),
            "memes": str(options.memes),
            "out": str(options.out),
            "settings": list(options.settings),
            "seeds": options.seeds,
        },
    }
    (options.out / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
