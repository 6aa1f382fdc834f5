"""Fixtures for fetch tests: one synthetic corpus per session (helpers live in fetch_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vilbert.pipeline.synthetic import generate_corpus

from .fetch_helpers import CORPUS_SIZE


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("fetch-corpus"), CORPUS_SIZE, seed=0)
