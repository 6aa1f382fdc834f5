"""Fixtures for fetch tests: one synthetic corpus per session (helpers live in fetch_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vilbert.pipeline.synthetic import generate_corpus

from .fetch_helpers import CORPUS_SIZE


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("fetch-corpus"), CORPUS_SIZE, seed=0)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch honours HTTP(S)_PROXY; a machine's own must not send these loopback tests elsewhere."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
