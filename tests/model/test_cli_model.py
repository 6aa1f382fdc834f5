"""`vilbert model info`: parameter counts by part, from a preset and overrides, offline."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vilbert.cli.app import app
from vilbert.config import preset
from vilbert.model import ViLBERT

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


@pytest.mark.slow
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
