"""The CLI: version, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vilbert


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilbert", *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"vilbert {vilbert.__version__}"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "pretrain.lrr=1"], "unknown config key 'pretrain.lrr'; valid keys in pretrain:"),
        (["--set", "pretrain.lr=0"], "pretrain.lr=0.0 is invalid; valid: > 0"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--recipe", "gpu"], "unknown recipe 'gpu'; valid: cpu"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(args, fragment):
    result = run_cli("config", "show", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[pretrain]\nlrr = 1\n", "unknown config key 'pretrain.lrr'"),
        ("[pretrain]\nmlm_probability = 1.5\n", "pretrain.mlm_probability=1.5 is invalid; valid: 0 < p < 1"),
    ],
)
def test_config_file_errors_exit_2(tmp_path, toml, fragment):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    result = run_cli("config", "show", "--config", str(path))
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_verbose_shows_traceback():
    result = run_cli("-v", "config", "show", "--set", "pretrain.lrr=1")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_resolved_config_is_printed():
    result = run_cli("config", "show", "--preset", "tiny", "--set", "pretrain.epochs=7")
    assert result.returncode == 0
    assert "\n[pretrain]\n" in result.stdout and "\nepochs = 7\n" in result.stdout


def test_recipes_are_listed_and_applied_before_set():
    listed = run_cli("config", "recipes")
    assert listed.returncode == 0 and "cpu:" in listed.stdout and "--set model.initializer_range=0.07" in listed.stdout
    shown = run_cli("config", "show", "--preset", "tiny", "--recipe", "cpu", "--set", "pretrain.lr=2e-3")
    assert shown.returncode == 0
    assert "initializer_range = 0.07" in shown.stdout and "lr = 0.002" in shown.stdout  # --set wins
