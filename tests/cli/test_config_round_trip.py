"""Config round trip: what `vilbert config show` prints (TOML, or JSON) and what a run saves are
files `--config` reads back to the same configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vilbert.config import PRESETS
from vilbert.recipes import RECIPES

CASES = [(name, None) for name in PRESETS] + [("tiny", recipe) for recipe in RECIPES]


def _shown(run_cli, *args: str) -> dict:
    result = run_cli("config", "show", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("preset", "recipe"), CASES)
@pytest.mark.parametrize("form", ["toml", "json"])
def test_config_show_reads_back_to_the_same_config(run_cli, tmp_path: Path, preset, recipe, form) -> None:
    args = ["--preset", preset, *(["--recipe", recipe] if recipe else []), "--set", "pretrain.lr=3.5e-5"]
    printed = run_cli("config", "show", *args, *(["--json"] if form == "json" else []))
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / f"config.{form}"
    path.write_text(printed.stdout)
    expected = _shown(run_cli, *args)
    # Read back onto another preset: the file alone must carry every key.
    other = "tiny" if preset != "tiny" else "vilbert_original"
    assert _shown(run_cli, "--preset", other, "--config", str(path)) == expected


def test_toml_is_the_default_and_unset_keys_read_back_as_unset(run_cli, tmp_path: Path) -> None:
    printed = run_cli("config", "show", "--preset", "tiny", "--set", "model.text.pretrained=none")
    assert printed.stdout.startswith("[model]") or printed.stdout.startswith("["), printed.stdout[:200]
    assert 'pretrained = "none"' in printed.stdout
    path = tmp_path / "c.toml"
    path.write_text(printed.stdout)
    assert (
        _shown(run_cli, "--preset", "tiny", "--set", "model.text.pretrained=elsewhere", "--config", str(path))["model"][
            "text"
        ]["pretrained"]
        == "elsewhere"
    )  # --set comes after the file
    assert _shown(run_cli, "--config", str(path))["model"]["text"]["pretrained"] is None


def test_a_runs_saved_config_is_accepted_by_config(run_cli, tiny_cache: Path, tmp_path: Path, one_thread) -> None:
    run = tmp_path / "run"
    settings = ["--preset", "tiny", "--device", "cpu", "--set", "data.max_len=32", "--set", "pretrain.batch_size=8",
                "--set", "pretrain.checkpoint_every=0", "--set", "pretrain.lr=7e-4"]  # fmt: skip
    result = run_cli("pretrain", "--data", str(tiny_cache), "--out", str(run), *settings, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["pretrain"]["lr"] == 7e-4
    assert _shown(run_cli, "--preset", "vilbert_original", "--config", str(run / "config.json")) == saved


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"pretrain": {"lrr": 1}}', "'pretrain.lrr'"),
    ],
)
def test_a_bad_config_file_is_one_line_exit_2(run_cli, tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    result = run_cli("config", "show", "--config", str(path))
    assert result.returncode == 2
    assert fragment in result.stderr
    toml = tmp_path / "bad.toml"
    toml.write_text("[pretrain\nlr = 1\n")
    assert "is not valid TOML" in run_cli("config", "show", "--config", str(toml)).stderr
