"""`vilbert analyse`: the derangement, the random-model control (gap about zero), retrieval, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vilbert.cache import CacheReader
from vilbert.config import tiny
from vilbert.model import ViLBERT
from vilbert.train.analyse import analyse_model, fixed_derangement, layer_similarity, load_pairs
from vilbert.train.pixels import pixel_normalizer


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_fixed_derangement_is_a_seeded_permutation_without_fixed_points(n: int) -> None:
    perm = fixed_derangement(n, seed=3)
    assert sorted(perm.tolist()) == list(range(n))
    assert (perm != np.arange(n)).all()
    np.testing.assert_array_equal(perm, fixed_derangement(n, seed=3))
    if n > 3:
        assert not np.array_equal(perm, fixed_derangement(n, seed=4))
    with pytest.raises(ValueError, match="at least 2"):
        fixed_derangement(1)


def _random_model(reader: CacheReader, seed: int) -> ViLBERT:
    config = tiny().model
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=reader.manifest.vocab_size))
    torch.manual_seed(seed)
    return ViLBERT(config).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_model_gap_is_about_zero(small_cache: Path, seed: int) -> None:
    reader = CacheReader(small_cache / "train")
    model = _random_model(reader, seed)
    report = analyse_model(model, reader, pairs=96, retrieval_pairs=24, seed=seed, batch_size=48)
    assert [s.kind for s in report.layers] == list(model.config.cross.pattern)
    assert report.before is not None and report.before.kind == "before" and report.before.layer == -1
    for layer in [report.before, *report.layers]:
        assert 0.0 < layer.aligned < 1.0  # ReLU poolers: cosines are >= 0, and far from 0 on average
        assert layer.gap == pytest.approx(layer.aligned - layer.mismatched)
        assert abs(layer.gap) < 0.01, layer
        assert layer.gap_stderr > 0.0  # the mismatched pass really paired other images
    assert report.pairs == 96 and report.retrieval_pairs == 24
    assert report.chance == {"r1": 1 / 24, "r5": 5 / 24, "r10": 10 / 24}
    assert set(report.retrieval) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert report.retrieval["i2t_r10"] >= report.retrieval["i2t_r1"]


def test_mismatched_pairs_use_the_derangement(small_cache: Path) -> None:
    """A model whose pooled text ignores the image: the mismatched cosine of pair i must equal the
    aligned cosine of caption i with image perm[i], computed by hand."""
    reader = CacheReader(small_cache / "train")
    model = _random_model(reader, 0)
    pairs = load_pairs(reader, 12, seed=0)
    normalizer = pixel_normalizer(reader, model, torch.device("cpu"))
    perm = torch.from_numpy(fixed_derangement(12, seed=5))
    with torch.no_grad():
        out = model(
            pairs.input_ids, pairs.attention_mask, normalizer.model_input(pairs.pixels[perm]), output_layers=True
        )
    expected = [torch.cosine_similarity(t, v, dim=-1).mean().item() for t, v in out.layer_pooled]
    before, measured = layer_similarity(model, pairs, normalizer, seed=5, batch_size=5)
    assert [s.mismatched for s in measured] == pytest.approx(expected, abs=1e-5)
    # The before row: the unimodal first tokens through the same poolers.
    unimodal = model.text_pooler(out.unimodal_text_tokens), model.vision_pooler(out.unimodal_vision_tokens)
    assert before.mismatched == pytest.approx(torch.cosine_similarity(*unimodal, dim=-1).mean().item(), abs=1e-5)
    for layer in measured:
        assert layer.gap_vs_before == pytest.approx(layer.gap - before.gap, abs=1e-9)
        assert layer.gap_vs_before_stderr > 0.0


def test_the_before_row_sees_the_streams_before_any_co_attention(small_cache: Path) -> None:
    """Changing the cross layers' weights moves every layer's row but not the before row."""
    reader = CacheReader(small_cache / "train")
    model = _random_model(reader, 0)
    pairs = load_pairs(reader, 16, seed=0)
    normalizer = pixel_normalizer(reader, model, torch.device("cpu"))
    before, layers = layer_similarity(model, pairs, normalizer, seed=1)
    with torch.no_grad():
        for p in model.cross.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before_again, layers_again = layer_similarity(model, pairs, normalizer, seed=1)
    assert before_again == before
    assert all(a.aligned != b.aligned for a, b in zip(layers, layers_again, strict=True))


def test_cli_writes_json_and_png(small_cache: Path, tmp_path: Path, run_cli) -> None:
    reader = CacheReader(small_cache / "test")
    export = _random_model(reader, 0).save_pretrained(tmp_path / "export")
    out = tmp_path / "analysis"
    options = ["--pairs", "40", "--retrieval-pairs", "16", "--device", "cpu", "--out", str(out)]
    proc = run_cli("analyse", str(export), "--data", str(small_cache / "test"), *options)
    assert proc.returncode == 0, proc.stderr
    assert "mismatched" in proc.stdout and "R@10" in proc.stdout
    assert "before" in proc.stdout and "vs before" in proc.stdout
    report = json.loads((out / "analysis.json").read_text())
    assert report["pairs"] == 40 and len(report["layers"]) == 4
    assert report["before"]["kind"] == "before" and "gap_vs_before" in report["layers"][0]
    assert (out / "analysis.png").stat().st_size > 1000
    proc = run_cli("analyse", str(export), "--data", str(small_cache), *options)
    assert proc.returncode == 1
    assert "not a cache directory" in proc.stderr and "test, train" in proc.stderr
