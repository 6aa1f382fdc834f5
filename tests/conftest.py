"""Suite-wide pytest setup: the `gpu` marker skips without CUDA; `run_cli` runs the CLI in-process."""

from __future__ import annotations

import subprocess

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def run_cli(capsys):
    """Run `vilbert ARGS` in this process (the CLI's own entry point, exit code included)."""
    from vilbert.cli.app import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run
