"""Suite-wide pytest setup: the `gpu` marker skips without CUDA; `run_cli` runs the CLI in-process;
`one_thread`, `cli_env`, and synthetic caches from `vilbert.pipeline.synthetic.caches`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


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
    """Run `vilbert ARGS` in this process (the CLI's own entry point, exit code included). The CLI
    routes the `vilbert` loggers to this test's captured stderr; they are put back after each call, so
    no later test logs into a closed stream (or, with propagation off, past `caplog`)."""
    from vilbert.cli.app import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        logger = logging.getLogger("vilbert")
        saved = (list(logger.handlers), logger.level, logger.propagate)
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


@pytest.fixture
def one_thread():
    """Torch on one thread: on 2 cores shared with other jobs, a second intra-op thread mostly spins
    (here: 3x the CPU time for the same steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `vilbert` subprocesses: this venv first, one thread per process, unbuffered."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="session")
def cache_builder():
    """`scene_caches` for tests that need a cache of their own."""
    from vilbert.pipeline.synthetic.caches import scene_caches

    return scene_caches


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory: pytest.TempPathFactory, cache_builder) -> Path:
    """~250 train / ~60 test synthetic scenes, uint8, 64x64."""
    return cache_builder(tmp_path_factory.mktemp("small-cache"), 320, seed=11)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, cache_builder) -> Path:
    """~48 train / ~12 test scenes: a few batches per epoch, for loop mechanics."""
    return cache_builder(tmp_path_factory.mktemp("tiny-cache"), 60, seed=5)
