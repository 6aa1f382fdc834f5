"""PNG curves of one or several runs from their `metrics.jsonl` (matplotlib, Agg backend).

One panel per metric found in the records: losses (`loss`, `*_loss`), accuracies (`*_acc`, `*_top1`,
`auroc`), and throughput (`samples_per_s`, `data_wait_frac`, `lr`). Train records are drawn as lines
(lightly smoothed), eval records as markers joined by dashes, one colour per run, so several runs
overlay on the same axes. Generic: fine-tuning runs plot the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vilbert.errors import UsageError  # noqa: E402
from vilbert.train.metrics import read_metrics  # noqa: E402

__all__ = ["plot_runs", "FIGURES"]

FIGURES = {
    "losses": lambda k: k == "loss" or k.endswith("_loss"),
    "accuracy": lambda k: k.endswith("_acc") or k.endswith(("_top1", "_auroc")) or k in ("acc", "auroc"),
    "throughput": lambda k: k in ("samples_per_s", "data_wait_frac", "lr", "step_time_s"),
}
"""Figure name -> which metric keys it draws."""


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, smooth: int = 5) -> list[Path]:
    """Write `losses.png`, `accuracy.png`, `throughput.png` and `curves.png` (all panels) to `out_dir`.

    Args:
        run_dirs: Run directories (each with a `metrics.jsonl`) to overlay; labelled by directory name.
        out_dir: Where the PNGs go (created).
        smooth: Moving-average window over train records (1 disables).

    Returns:
        The paths written (a figure with no metric in any run is skipped).

    Raises:
        UsageError: A run directory without `metrics.jsonl`, or no records at all.
    """
    runs = {Path(d).name or str(d): _records(Path(d)) for d in run_dirs}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    all_keys: list[str] = []
    for name, wanted in FIGURES.items():
        keys = sorted({k for recs in runs.values() for r in recs for k in r if wanted(k)}, key=_key_order)
        all_keys += keys
        if keys:
            written.append(_figure(runs, keys, out / f"{name}.png", smooth))
    if not all_keys:
        raise UsageError(f"no plottable metrics in {', '.join(map(str, run_dirs))}")
    written.append(_figure(runs, all_keys, out / "curves.png", smooth))
    return written


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UsageError(f"no metrics.jsonl in {run_dir}; pass a run directory written by `vilbert pretrain`")
    return read_metrics(path)


def _key_order(key: str) -> tuple[int, str]:
    return (0 if key in ("loss", "samples_per_s") else 1, key)


def _figure(runs: dict[str, list[dict[str, Any]]], keys: list[str], path: Path, smooth: int) -> Path:
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, (name, records) in enumerate(runs.items()):
            _draw(ax, records, key, colours[i % len(colours)], name if len(runs) > 1 else "", smooth)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("_loss") or key == "loss":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw(ax: Any, records: list[dict[str, Any]], key: str, colour: str, run: str, smooth: int) -> None:
    for kind, style in (("train", {"linestyle": "-"}), ("eval", {"linestyle": "--", "marker": "o"})):
        points = [(r["step"], r[key]) for r in records if r.get("kind", "train") == kind and _finite(r.get(key))]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        if kind == "train" and smooth > 1:
            values = _moving_average(list(values), smooth)
        label = " ".join(part for part in (run, kind) if part)
        ax.plot(steps, values, color=colour, label=label, alpha=1.0 if kind == "eval" else 0.8, markersize=3, **style)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
