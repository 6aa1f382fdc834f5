"""One GPU check, no internet: the cache loader feeding a GPU and the pretraining step on it.

On one CUDA device, for `vilbert_base` (random weights, a random uint8 cache of its image size):

- `loader`: samples/s of `BatchLoader` delivering batches to the GPU (pinned buffers, `non_blocking`
  copies on a side stream), the model not running;
- `eager`, `compiled` and `compiled_reduce_overhead`: the trainer's step (`benchmarks/train_step.py`'s
  `Stepper`) under bf16 autocast, fed by that loader, without `torch.compile`, with its default mode
  and with `mode="reduce-overhead"` (CUDA graphs: one launch replays the model's kernels, where eager
  PyTorch launches each of several thousand from Python): samples/s, step ms, the fraction of the step
  spent waiting for data, model FLOPs utilization against the card's dense bf16 peak, and peak GPU
  memory.

It prints one JSON line and appends the figures, with the card's name and the command, to
`benchmarks/RESULTS.md`. `--dry-run` does the same on the CPU with the tiny preset and a few steps
(no MFU, no memory; `torch.compile` with its eager backend, as inductor's CPU build takes minutes)
and appends to a temporary file instead, so the tests exercise the script without a GPU.
`benchmarks/gpu_check.sh` wraps it with an 8-minute limit.

    bash benchmarks/gpu_check.sh              # on a GPU machine
    bash benchmarks/gpu_check.sh --dry-run    # CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_step import PEAK_BF16_TFLOPS, Stepper, write_cache  # noqa: E402

from vilbert.cache import BatchLoader, CacheReader  # noqa: E402
from vilbert.config import COMPILE_MODES, Config, preset  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, a few steps; no RESULTS.md")
    parser.add_argument("--preset", default=None, help="default vilbert_base (dry run: tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (dry run: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 30; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; dry run 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes")
    parser.add_argument(
        "--compile-modes", default="default,reduce-overhead", help="torch.compile modes timed, comma-separated"
    )
    parser.add_argument("--results", type=Path, default=None, help="file the figures are appended to")
    args = parser.parse_args()
    args.preset = args.preset or ("tiny" if args.dry_run else "vilbert_base")
    args.batch_size = args.batch_size or (8 if args.dry_run else 64)
    args.steps = args.steps or (2 if args.dry_run else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    args.resident = 2
    args.compile_modes = [] if args.no_compile else [m for m in args.compile_modes.split(",") if m]
    for mode in args.compile_modes:
        if mode not in COMPILE_MODES:
            parser.error(f"--compile-modes: {mode!r} is not a torch.compile mode; valid: {', '.join(COMPILE_MODES)}")
    return args


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --dry-run to exercise the script on the CPU")  # fmt: skip
    return torch.device("cuda")


def offline_config(name: str, batch_size: int) -> Config:
    """The preset with random weights (nothing is downloaded) and the benchmark's batch size."""
    config = preset(name)
    model = dataclasses.replace(
        config.model,
        text=dataclasses.replace(config.model.text, pretrained=None),
        vision=dataclasses.replace(config.model.vision, pretrained=None),
    )
    pretrain = dataclasses.replace(config.pretrain, batch_size=batch_size)
    return dataclasses.replace(config, model=model, pretrain=pretrain)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_samples_per_s(reader: CacheReader, device: torch.device, batch_size: int, batches: int) -> float:
    """Batches delivered on `device` per second (after one warm-up batch), nothing else running."""
    loader = BatchLoader(reader, batch_size, shuffle=True, seed=1, drop_last=True, device=device)
    iterator = iter(loader)
    next(iterator)
    sync(device)
    start, delivered = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        delivered += batch.pixels.shape[0]
    sync(device)
    return delivered / (time.perf_counter() - start)


def train_step_figures(
    config: Config, reader: CacheReader, device: torch.device, args, compile_mode: str | None, flops: float | None
) -> tuple[dict, float | None]:
    """The loader-fed step: samples/s, step ms, data-wait fraction, MFU and peak memory (CUDA).

    FLOPs are counted on the eager model (`flops=None`) and passed to the compiled run: the same math.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    stepper = Stepper(config, device, compile_model=False)
    if compile_mode:  # inductor on the GPU; the dry run takes the same path with the eager backend (no mode)
        stepper.model.compile(backend="inductor" if device.type == "cuda" else "eager", mode=compile_mode)
    loader = BatchLoader(reader, args.batch_size, shuffle=True, seed=0, drop_last=True, device=device)
    batches = iter(loader)
    times, waits = [], []
    sample = None
    for i in range(args.warmup + args.steps):
        sync(device)
        begin = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        waited = time.perf_counter() - begin
        stepper(batch)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - begin)
            waits.append(waited)
        sample = batch
    first_steps_s = time.perf_counter() - start - sum(times)
    step_s = statistics.median(times)
    figures = {
        "samples_per_s": round(args.batch_size / step_s, 2),
        "step_ms": round(1e3 * step_s, 2),
        "data_wait_frac": round(sum(waits) / sum(times), 4),
        "setup_and_warmup_s": round(first_steps_s, 1),
    }
    if device.type == "cuda":
        figures["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        flops = flops if flops is not None else stepper.flops(sample)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        figures["tflop_per_step"] = round(flops / 1e12, 3)
        figures["achieved_tflops"] = round(flops / step_s / 1e12, 1)
        figures["mfu"] = round(flops / step_s / (peak * 1e12), 4) if peak else None
    return figures, flops


def append_results(path: Path, figures: dict, command: str) -> None:
    """A dated section with the card, the command and every figure, at the end of `path`."""
    lines = [
        "",
        f"## gpu_check on {figures['device']} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}`",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key, value in figures.items():
        if isinstance(value, dict):
            lines += [f"| {key}.{k} | {v} |" for k, v in value.items()]
        else:
            lines.append(f"| {key} | {value} |")
    with path.open("a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    device = pick_device(args.dry_run)
    torch.manual_seed(0)
    config = offline_config(args.preset, args.batch_size)
    rows = args.batch_size * (args.warmup + args.steps + 4)
    figures: dict = {
        "benchmark": "gpu_check",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="vilbert-gpu-check-") as tmp:
        reader = CacheReader(write_cache(Path(tmp), config, rows))
        figures["loader_samples_per_s"] = round(
            loader_samples_per_s(reader, device, args.batch_size, args.warmup + args.steps), 1
        )
        progress("loader_samples_per_s", figures["loader_samples_per_s"])
        figures["eager"], flops = train_step_figures(config, reader, device, args, None, None)
        progress("eager", figures["eager"])
        for mode in args.compile_modes:
            name = "compiled" if mode == "default" else "compiled_" + mode.replace("-", "_")
            try:
                figures[name], _ = train_step_figures(config, reader, device, args, mode, flops)
            except Exception as error:  # noqa: BLE001 - a compiler failure is a figure of this card, not a crash
                figures[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            progress(name, figures[name])
        command = "bash benchmarks/gpu_check.sh " + " ".join(sys.argv[1:])
        results = args.results or (Path(tmp) / "RESULTS.md" if args.dry_run else HERE / "RESULTS.md")
        append_results(results, figures, command.strip())
        figures["results_file"] = str(results) if args.results or not args.dry_run else None
    print(json.dumps(figures), flush=True)
    if any("error" in value for value in figures.values() if isinstance(value, dict)):
        raise SystemExit(
            "gpu_check: torch.compile failed on this card (an `error` among the figures); the others stand"
        )


def progress(stage: str, value) -> None:
    """One line on stderr as each stage ends, so a run cut off by the time limit still leaves its figures."""
    print(f"gpu_check: {stage} {json.dumps(value)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
