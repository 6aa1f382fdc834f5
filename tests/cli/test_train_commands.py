"""`vilbert pretrain` as a subprocess: SIGTERM saves a checkpoint, `--resume` continues from it;
`vilbert export` and `vilbert plot` on the run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vilbert.model import ViLBERT
from vilbert.train.checkpoint import load_checkpoint
from vilbert.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

VILBERT = [sys.executable, "-m", "vilbert"]
SETTINGS = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "data.max_len=32",
    "--set",
    "pretrain.batch_size=8",
    "--set",
    "pretrain.log_every=1",
    "--set",
    "pretrain.checkpoint_every=0",
]


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout}s")


def test_sigterm_checkpoints_then_resume_continues(tiny_cache: Path, tmp_path: Path, cli_env: dict) -> None:
    run = tmp_path / "run"
    cmd = [
        *VILBERT,
        "pretrain",
        "--data",
        str(tiny_cache),
        "--out",
        str(run),
        *SETTINGS,
        "--set",
        "pretrain.epochs=100",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env)
    _wait_for_step(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "--resume" in output
    state = load_checkpoint(run)
    stopped_at = state["step"]
    assert stopped_at >= 2 and not state["complete"]
    assert max(r["step"] for r in read_metrics(run)) == stopped_at

    resumed = subprocess.run(
        [*VILBERT, "pretrain", "--resume", str(run), "--max-steps", str(stopped_at + 2)],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert load_checkpoint(run)["step"] == stopped_at + 2
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == list(range(1, stopped_at + 3)), "the resumed run continues the step count without gaps"
    assert "resumed" in (run / "train.log").read_text()


def test_export_and_plot_commands(tiny_cache: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    done = run_cli("pretrain", "--data", str(tiny_cache), "--out", str(run), *SETTINGS, "--max-steps", "2")
    assert done.returncode == 0 and "max_steps at step 2" in done.stdout, done.stderr
    assert "train: step=2" in (run / "train.log").read_text()
    assert run_cli("export", str(run), "--out", str(tmp_path / "export")).returncode == 0
    model = ViLBERT.from_pretrained(tmp_path / "export")
    state = load_checkpoint(run)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert json.loads((tmp_path / "export" / "config.json").read_text())["text"]["vocab_size"] < 1000

    assert run_cli("plot", str(run), "--out", str(tmp_path / "plots")).returncode == 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 5000
    done = run_cli("pretrain", "--resume", str(run), "--preset", "tiny")
    assert done.returncode == 2 and "--preset does not apply to --resume" in done.stderr
    done = run_cli("pretrain", "--data", str(tiny_cache))
    assert done.returncode == 2 and "no run directory" in done.stderr
