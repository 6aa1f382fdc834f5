"""`benchmarks/gpu_check.sh --dry-run` runs end to end on the CPU, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~20 s: a loader pass, an eager and two torch.compile'd runs on the CPU
def test_gpu_check_dry_run_prints_figures_and_appends_them(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    repo_results = ROOT / "benchmarks" / "RESULTS.md"
    before = repo_results.read_bytes()
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--results", str(results)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "gpu_check" and figures["device"] == "cpu (dry run)"
    assert figures["preset"] == "tiny"
    assert figures["loader_samples_per_s"] > 0
    for mode in ("eager", "compiled", "compiled_reduce_overhead"):
        assert figures[mode]["samples_per_s"] > 0
        assert 0.0 <= figures[mode]["data_wait_frac"] <= 1.0
    text = results.read_text()
    assert "## gpu_check on cpu (dry run)" in text and "| eager.samples_per_s |" in text
    assert repo_results.read_bytes() == before  # a dry run never touches the project's figures
