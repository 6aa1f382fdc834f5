"""Packaging: one source of the version, the license and the type marker declared where installs pick them up."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import metadata, version
from pathlib import Path

import vilbert

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_cli_version_equals_the_package_metadata() -> None:
    out = subprocess.run([sys.executable, "-m", "vilbert", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"vilbert {version('vilbert')}"
    assert version("vilbert") == vilbert.__version__


def test_the_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vilbert.__version__"}
    assert f"## {vilbert.__version__}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_license_and_type_marker_ship() -> None:
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert metadata("vilbert")["Name"] == "vilbert"
    assert (ROOT / "vilbert" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["vilbert"]
