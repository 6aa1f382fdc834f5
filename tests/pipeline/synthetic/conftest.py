"""Small synthetic corpora shared by the synthetic-data tests (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vilbert.pipeline.synthetic import generate_corpus

CORPUS_N = 60  # > 40 (one full block of file variants) and enough planned failures for every kind


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("synth") / "corpus", CORPUS_N, seed=0)
