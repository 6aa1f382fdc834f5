"""`docs/fidelity.md`: its "ours" columns are what `vilbert_base()` and `vilbert_original()` build, and every
key on which the two presets differ has a row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vilbert.config import Config, vilbert_base, vilbert_original
from vilbert.overrides import apply_overrides, config_to_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
PRESETS = {"vilbert_base": vilbert_base, "vilbert_original": vilbert_original}


def _table() -> list[dict[str, str]]:
    """The rows of the doc's one table, as {column: cell}."""
    lines = [line.strip() for line in DOC.read_text().splitlines() if line.strip().startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(PRESETS) <= set(header) and {"key", "thesis", "Lu et al."} <= set(header), header
    assert set(lines[1].replace("|", "").replace("-", "").strip()) <= {""}, "the second line separates the header"
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _code(cell: str) -> str:
    assert cell.startswith("`") and cell.endswith("`") and cell.count("`") == 2, f"not one `value`: {cell!r}"
    return cell[1:-1]


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _keyed_rows() -> list[dict[str, str]]:
    return [row for row in _table() if row["key"] != "-"]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_ours_cell_is_what_the_preset_builds(name: str) -> None:
    config = PRESETS[name]()
    rows = _keyed_rows()
    assert len(rows) >= 30
    for row in rows:
        key, cell = _code(row["key"]), _code(row[name])
        # The cell goes through the same parser as `--set`, so `[]`, `none` and `3e-5` mean what they say there.
        written = _get(apply_overrides(config, [f"{key}={cell}"]), key)
        assert written == _get(config, key), (
            f"docs/fidelity.md says {name} {key}={cell}; the preset has {_get(config, key)!r}"
        )


def test_every_key_on_which_the_presets_differ_has_a_row() -> None:
    base, original = (_flat(config_to_dict(preset())) for preset in PRESETS.values())
    differ = {key for key in base if base[key] != original[key]}
    listed = {_code(row["key"]) for row in _keyed_rows()}
    assert differ - listed == set(), f"keys that differ between the presets without a row: {sorted(differ - listed)}"


def test_every_row_says_both_sources_and_why_where_ours_differs() -> None:
    for row in _table():
        assert row["thesis"] and row["Lu et al."] and row["why ours differs"], row
    choices = {row["choice"] for row in _table()}
    for needed in (
        "residual and LayerNorm in a co-layer",
        "AP sampling",
        "MIM target",
        "MIM negatives",
        "augmentation",
        "MIM stop-gradient",
        "ITC projection",
        "poolers",
        "pixel normalization",
        "optimizer",
        "schedule",
    ):
        assert needed in choices, needed


def test_a_wrong_cell_would_fail() -> None:
    """The comparison can fail: a value other than the preset's parses to something else."""
    config = vilbert_base()
    assert _get(apply_overrides(config, ["pretrain.lr=1e-4"]), "pretrain.lr") != _get(config, "pretrain.lr")
    assert _get(apply_overrides(config, ["model.freeze=[]"]), "model.freeze") != _get(config, "model.freeze")
