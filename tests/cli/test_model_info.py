"""`vilbert model info`: parameter counts by part, from a preset and overrides, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from vilbert.cli.app import app
from vilbert.config import PRESETS, preset
from vilbert.model import ViLBERT

MODEL_DOC = Path(__file__).resolve().parents[2] / "docs" / "model.md"

runner = CliRunner()


def _info(*args: str) -> dict[str, dict[str, int]]:
    result = runner.invoke(app, ["model", "info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_tiny_report_matches_the_model():
    report = _info("--preset", "tiny", "--set", "model.freeze=text,vision")
    assert report["text"]["trainable"] == report["vision"]["trainable"] == 0
    assert report["cross"]["trainable"] == report["cross"]["total"] > 0
    expected = ViLBERT(preset("tiny").model)  # same shapes, nothing frozen
    assert report["all"]["total"] == expected.parameter_report()["all"]["total"]


def test_table_names_every_part():
    result = runner.invoke(app, ["model", "info", "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    for part in ("text", "vision", "cross", "heads", "all", "trainable params: "):
        assert part in result.output


def test_vilbert_base_frozen_encoders_match_the_thesis():
    # The thesis: 42,705,468 trainable of 237,986,364 (docs/model.md explains the difference).
    # Its frozen part was BertModel (with its 590,592-parameter pooler, unused) + ViT-B/16 without
    # head; ours has no BERT pooler.
    report = _info("--preset", "vilbert_base")
    frozen = report["all"]["total"] - report["all"]["trainable"]
    assert frozen == 237_986_364 - 42_705_468 - 590_592 == 194_690_304
    assert report["text"]["total"] == 108_891_648 and report["vision"]["total"] == 85_798_656
    assert report["cross"]["trainable"] == 4 * 14_175_744
    assert report["heads"]["total"] == 3_780_926  # docs/model.md lists them
    assert report["all"] == {"total": 255_174_206, "trainable": 60_483_902}


def _count(text: str) -> int:
    return int(text.replace(",", ""))


def _documented_counts() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, dict[str, int]]]]:
    """docs/model.md's preset table ({preset: {total, trainable}}) and its `vilbert model info --preset NAME`
    listings ({preset: {part: {total, trainable}}})."""
    doc = MODEL_DOC.read_text()
    row = re.compile(r"^\| `(\w+)` \|[^\n]*\| ([\d,]+) \| ([\d,]+) \|$", re.M)
    table = {name: {"total": _count(t), "trainable": _count(tr)} for name, t, tr in row.findall(doc)}
    listings = {}
    for name, block in re.findall(r"`vilbert model info --preset (\w+)`:\n\n```\n(.*?)```", doc, re.S):
        parts = re.findall(r"│ (\w+) +│ +([\d,]+) │ +([\d,]+) │", block)
        listings[name] = {part: {"total": _count(t), "trainable": _count(tr)} for part, t, tr in parts}
    return table, listings


def test_docs_state_what_model_info_prints():
    table, listings = _documented_counts()
    assert set(table) == set(PRESETS), "docs/model.md's table lists every preset"
    assert listings, "docs/model.md lists at least one preset by part"
    for name, counts in table.items():
        assert _info("--preset", name)["all"] == counts, f"docs/model.md's {name} row"
    for name, parts in listings.items():
        assert len(parts) == 5, f"{name}: text, vision, cross, heads, all"
        assert _info("--preset", name) == parts, f"docs/model.md's `vilbert model info --preset {name}`"
