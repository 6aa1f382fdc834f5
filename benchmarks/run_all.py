"""Run every benchmark and gather their figures into benchmarks/RESULTS.md.

Each benchmark script in this folder runs ours and the baseline in the same run and prints, as its
last line, one JSON object with its figures and ratios. This script runs them one after another
(never in parallel: they share the cores), reads those lines, and writes RESULTS.md with the
machine, the library versions and every figure. Absolute numbers are context; ratios are the result.

    python benchmarks/run_all.py --quick        # about a minute per benchmark
    python benchmarks/run_all.py                # the full sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("loader", "preprocess", "fetch", "model", "train_step")
PACKAGES = ("vilbert", "torch", "numpy", "pyarrow", "timm", "tokenizers", "pillow", "simplejpeg", "aiohttp")


def run_one(name: str, quick: bool, timeout_s: float) -> dict:
    """Run `benchmarks/<name>.py` and return its JSON line (or why there is none)."""
    command = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    elapsed = time.perf_counter() - start
    sys.stdout.write(result.stdout)
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {result.returncode}: {tail}", "wall_s": round(elapsed, 1)}
    try:
        figures = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"last line is not JSON: {lines[-1][:120]}", "wall_s": round(elapsed, 1)}
    figures["wall_s"] = round(elapsed, 1)
    return figures


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    for package in PACKAGES:
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def _flatten(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render(results: dict[str, dict], info: dict[str, str], quick: bool) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "--quick" if quick else "full"
    out = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/run_all.py{' --quick' if quick else ''}` on {stamp} ({mode} sizes).",
        "Each benchmark runs ours and its baseline in the same run; ratios are the result, absolute",
        "figures are context (the machine is shared and noisy).",
        "",
        "## Machine",
        "",
        "| what | value |",
        "|---|---|",
    ]
    out += [f"| {key} | {value} |" for key, value in info.items()]
    for name, figures in results.items():
        out += ["", f"## {name}", "", f"`python benchmarks/{name}.py{' --quick' if quick else ''}`", ""]
        if "error" in figures:
            out.append(f"Did not produce figures: {figures['error']}")
            continue
        ratios = [(k, v) for k, v in _flatten(figures) if "vs_" in k or "ratio" in k]
        if ratios:
            out += ["Ratios:", ""] + [f"- **{k}**: {_fmt(v)}" for k, v in ratios] + [""]
        out += ["| figure | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(figures)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ~1 minute size of each benchmark")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--timeout-s", type=float, default=None, help="per benchmark (default 900 quick, 3600 full)")
    args = parser.parse_args()
    timeout_s = args.timeout_s or (900.0 if args.quick else 3600.0)
    results = {}
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        results[name] = run_one(name, args.quick, timeout_s)
    args.out.write_text(render(results, machine(), args.quick))
    print(f"wrote {args.out}")
    print(json.dumps({name: ("error" not in figures) for name, figures in results.items()}))


if __name__ == "__main__":
    main()
