"""Fetch fits its requests in flight to the open-file limit (`run._fit_open_files`), in a subprocess
whose limits are set before it starts (they are per process)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = """
import logging, resource
from vilbert.pipeline.fetch import FetchOptions, NetworkOptions
from vilbert.pipeline.fetch.run import _fit_open_files
logging.basicConfig(level=logging.WARNING, format="%(message)s")
fitted = _fit_open_files(FetchOptions(network=NetworkOptions(max_in_flight=1024)))
print(fitted.network.max_in_flight, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _run(soft: int, hard: int) -> tuple[list[str], str]:
    limits = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # noqa: E731
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                            preexec_fn=limits, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split(), result.stderr


def test_a_low_soft_limit_is_raised_to_what_the_requests_need():
    current = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4096 if current == resource.RLIM_INFINITY else min(current, 4096)
    (in_flight, soft), stderr = _run(300, hard)
    assert (int(in_flight), int(soft)) == (min(1024, hard - 256), min(1280, hard))
    assert (stderr == "") == (hard >= 1280)


def test_a_hard_limit_below_it_means_fewer_requests_and_one_line_saying_so():
    (in_flight, soft), stderr = _run(600, 600)
    assert (in_flight, soft) == ("344", "600")
    assert stderr.strip().splitlines() == [
        "the open-file limit (ulimit -n: 600, hard limit 600) allows 344 requests in flight, not 1024; "
        "raise it to fetch faster (see the README, 'Fetching at scale')"
    ]
