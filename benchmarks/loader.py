"""The cache loader against a PIL + torchvision DataLoader over JPEG files, and a memcpy ceiling.

Builds, in a temporary directory, the same N synthetic 224x224 images as
  (a) JPEG files read by a torch DataLoader over a PIL + torchvision ToTensor/Normalize dataset
      (how the thesis loaded data), with 0 and 2 worker processes;
  (b) our cache, float16 (pre-normalized) and uint8, read through `BatchLoader` (CPU, prefetch 2);
  (c) the ceiling: a plain memory copy of the same bytes, batch by batch, into a reused buffer.
Every reader does shuffled full epochs of batch 64 with the page cache warm; each figure is the
median over several epochs, run round-robin so that all of them see the same machine load.
Diagnostic rows: the loader without its thread (`_prefetch0`), and contiguous copies straight from
the mapped shards (`memcpy_mapped_`: the same page-cache memory the loader reads, without the
random row order).

It also measures the loader's anonymous memory (RssAnon: what is not file-backed) for the cache and
for a cache 4x larger, each in a forked child: the mapped shards count as file-backed, so anonymous
memory should stay flat.

    python benchmarks/loader.py --quick      # N=384, under a minute on 2 cores
    python benchmarks/loader.py              # N=4096

Prints a table, then as its last line one JSON object (see `benchmarks/run_all.py`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIZE = 224
BATCH = 64
MAX_LEN = 36
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------ data


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """n photo-like uint8 images [n, 224, 224, 3]: smooth colour blobs (a random 7x7 grid
    upsampled bilinearly) plus mild sensor-like noise; about 10-15 KB as JPEG at quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 4, (2 * SIZE, 2 * SIZE, 3)).astype(np.int16)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        grid = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.int16)
        y, x = rng.integers(0, SIZE, 2)
        images[i] = np.clip(smooth + noise[y : y + SIZE, x : x + SIZE], 0, 255)
    return images


def write_jpegs(images: np.ndarray, directory: Path) -> list[Path]:
    from PIL import Image

    directory.mkdir(parents=True)
    paths = []
    for i, image in enumerate(images):
        path = directory / f"{i:06d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def decode_all(paths: list[Path]) -> np.ndarray:
    """The JPEGs decoded back (what a preprocess step would store): uint8 [n, 3, H, W]."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths])


def build_cache(path: Path, pixels_chw: np.ndarray, dtype: str, repeat: int = 1, shard_mib: int = 256) -> None:
    """A cache of the images (`repeat` times over, with distinct keys); float16 is normalized
    with mean = std = 0.5, as `vilbert preprocess` does by default."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from vilbert.cache import CacheSpec, CacheWriter, normalization

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo"])}
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    n = len(pixels_chw)
    pixels = normalization("half").apply(pixels_chw) if dtype == "float16" else pixels_chw
    ids = np.zeros((BATCH, MAX_LEN), np.int32)
    ids[:, :4] = [2, 5, 6, 3]
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]")).to_str()
    with CacheWriter(
        path,
        CacheSpec(
            split="train",
            image_size=SIZE,
            pixel_dtype=dtype,
            normalization="half",
            max_len=MAX_LEN,
            tokenizer_json=tokenizer,
            special_token_ids=special,
            vocab_size=len(vocab),
            has_labels=True,
            command="benchmarks/loader.py",
            target_shard_bytes=shard_mib << 20,
        ),
    ) as writer:
        for copy in range(repeat):
            for s in range(0, n, BATCH):
                chunk = pixels[s : s + BATCH]
                k = len(chunk)
                writer.write(
                    [f"{copy}-{s + i}" for i in range(k)],
                    chunk,
                    ids[:k],
                    np.full(k, 4, np.int32),
                    np.zeros(k, np.int64),
                    ["a photo"] * k,
                )


# --------------------------------------------------------------------------------- measurements


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its live child processes (DataLoader workers)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue
    return total


class Runner:
    """Times full epochs of several readers round-robin and keeps per-epoch (seconds, cpu)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs: dict[str, list[tuple[float, float]]] = {}
        self.loaders: dict[str, object] = {}

    def run(self, name: str, epoch: Callable[[], int]) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        samples = epoch()
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        assert samples == self.n, (name, samples)
        self.epochs.setdefault(name, []).append((wall, cpu))

    def samples_per_s(self, name: str) -> float:
        return self.n / statistics.median(w for w, _ in self.epochs[name])

    def cpu_s_per_1k(self, name: str) -> float:
        return 1000 * statistics.median(c for _, c in self.epochs[name]) / self.n


def pil_loader(paths: list[Path], workers: int):
    import torch
    from PIL import Image
    from torchvision import transforms

    class JpegDataset(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int):
            with Image.open(paths[index]) as image:
                return self.transform(image.convert("RGB")), index

    return torch.utils.data.DataLoader(
        JpegDataset(), batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )


def epoch_of(iterable) -> Callable[[], int]:
    def epoch() -> int:
        count = 0
        for batch in iterable:
            count += len(batch[1]) if isinstance(batch, list) else len(batch)
        return count

    return epoch


def memcpy_epoch(source: np.ndarray) -> Callable[[], int]:
    """The ceiling: copy each batch's bytes (contiguous, batches shuffled) into one reused buffer."""
    buffer = np.empty((BATCH, *source.shape[1:]), source.dtype)
    rng = np.random.default_rng(0)

    def epoch() -> int:
        count = 0
        for start in rng.permutation(np.arange(0, len(source), BATCH)):
            chunk = source[start : start + BATCH]
            np.copyto(buffer[: len(chunk)], chunk)
            count += len(chunk)
        return count

    return epoch


def memcpy_mapped_epoch(views: list[np.ndarray]) -> Callable[[], int]:
    """Diagnostic: contiguous copies straight from the cache's mapped shards (page-cache memory)
    rather than from anonymous memory."""
    buffer = np.empty((BATCH, *views[0].shape[1:]), views[0].dtype)
    rng = np.random.default_rng(0)

    def epoch() -> int:
        count = 0
        for shard in rng.permutation(len(views)):
            view = views[shard]
            for start in range(0, len(view), BATCH):
                chunk = view[start : start + BATCH]
                np.copyto(buffer[: len(chunk)], chunk)
                count += len(chunk)
        return count

    return epoch


# --------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _memory_probe(path: str, results) -> None:
    from vilbert.cache import BatchLoader, CacheReader

    baseline = _status_kb("RssAnon")
    reader = CacheReader(path)
    loader = BatchLoader(reader, BATCH, prefetch=2)
    peak = 0
    for _ in range(2):
        for _batch in loader:
            peak = max(peak, _status_kb("RssAnon"))
    results.put({"rows": len(reader), "anon_mb": (peak - baseline) / 1024, "file_mb": _status_kb("RssFile") / 1024})


def memory_probe(path: Path) -> dict:
    """Peak anonymous memory added by two loader epochs over `path`, in a forked child."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_memory_probe, args=(str(path), results))
    child.start()
    result = results.get(timeout=300)
    child.join()
    return result


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=384 and fewer epochs (under a minute)")
    parser.add_argument("--n", type=int, help="images (default 4096, quick 384)")
    parser.add_argument(
        "--shard-mib",
        type=int,
        default=16,
        help="target shard size; the default 16 MiB spreads every batch over several shards, "
        "as in a full-size cache of thousands of 256 MiB shards (the slower gather path)",
    )
    args = parser.parse_args()
    n = args.n or (384 if args.quick else 4096)
    fast_epochs, pil_epochs = (21, 3) if args.quick else (21, 5)
    started = time.perf_counter()
    import torch  # noqa: F401  (imported once here, before the memory probes fork)

    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        return now

    with tempfile.TemporaryDirectory(prefix="vilbert-loader-bench-") as tmp:
        root = Path(tmp)
        paths = write_jpegs(synthetic_images(n), root / "jpeg")
        pixels = decode_all(paths)
        mark = phase("images", started)
        for dtype in ("float16", "uint8"):
            build_cache(root / dtype, pixels, dtype, shard_mib=args.shard_mib)
        build_cache(root / "float16-4x", pixels, "float16", repeat=4, shard_mib=args.shard_mib)
        mark = phase("caches", mark)
        memory = {"cache_1x": memory_probe(root / "float16"), "cache_4x": memory_probe(root / "float16-4x")}
        mark = phase("memory", mark)
        runner = measure(root, paths, n, fast_epochs, pil_epochs)
        phase("epochs", mark)
        report(runner, memory, n, args.quick, phases, time.perf_counter() - started)


def measure(root: Path, paths: list[Path], n: int, fast_epochs: int, pil_epochs: int) -> Runner:
    import torch

    from vilbert.cache import BatchLoader, CacheReader

    torch.set_num_threads(1)
    runner = Runner(n)
    readers = {dtype: CacheReader(root / dtype) for dtype in ("float16", "uint8")}
    contenders = {}
    for dtype, reader in readers.items():
        runner.loaders[dtype] = BatchLoader(reader, BATCH, prefetch=2, seed=1)
        contenders[f"cache_{dtype}"] = epoch_of(runner.loaders[dtype])
        # Diagnostic: the same loader gathering in the caller's thread (no handoff to a thread).
        contenders[f"cache_{dtype}_prefetch0"] = epoch_of(BatchLoader(reader, BATCH, prefetch=0, seed=1))
        source = np.concatenate(reader.views("pixels"))  # the same bytes, in anonymous memory
        contenders[f"memcpy_{dtype}"] = memcpy_epoch(source)
        contenders[f"memcpy_mapped_{dtype}"] = memcpy_mapped_epoch(reader.views("pixels"))
    for epoch in contenders.values():  # warm-up: page cache, allocator, mappings
        epoch()
    for _ in range(fast_epochs):
        for name, epoch in contenders.items():
            runner.run(name, epoch)
    for workers in (0, 2):
        loader = pil_loader(paths, workers)
        next(iter(loader))  # warm-up: worker start (the JPEGs are in the page cache already)
        for _ in range(pil_epochs):
            runner.run(f"pil_{workers}workers", epoch_of(loader))
        del loader
    return runner


def report(runner: Runner, memory: dict, n: int, quick: bool, phases: dict, wall_s: float) -> None:
    names = [
        "pil_0workers",
        "pil_2workers",
        "cache_float16",
        "cache_uint8",
        "cache_float16_prefetch0",
        "cache_uint8_prefetch0",
        "memcpy_float16",
        "memcpy_uint8",
        "memcpy_mapped_float16",
        "memcpy_mapped_uint8",
    ]
    speed = {k: round(runner.samples_per_s(k), 1) for k in names}
    cpu = {k: round(runner.cpu_s_per_1k(k), 4) for k in names}
    vs_pil = {d: round(speed[f"cache_{d}"] / speed["pil_2workers"], 2) for d in ("float16", "uint8")}
    vs_memcpy = {d: round(speed[f"cache_{d}"] / speed[f"memcpy_{d}"], 3) for d in ("float16", "uint8")}
    print(
        f"loader benchmark: N={n} images 224x224, batch {BATCH}, shuffled epochs, page cache warm, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'reader':<26}{'samples/s':>12}{'cpu s/1k':>10}{'epochs':>8}")
    for name in names:
        print(f"{name:<26}{speed[name]:>12,.0f}{cpu[name]:>10.3f}{len(runner.epochs[name]):>8}")
    for dtype in ("float16", "uint8"):
        print(f"cache {dtype}: {vs_pil[dtype]:.1f}x PIL (2 workers), {vs_memcpy[dtype]:.2f} of the memcpy ceiling")
    print("phases (s): " + ", ".join(f"{k} {v}" for k, v in phases.items()) + f"; total {wall_s:.1f}")
    slots = {dtype: loader.slot_allocations for dtype, loader in runner.loaders.items()}
    shards = {dtype: loader.reader.num_shards for dtype, loader in runner.loaders.items()}
    print(
        f"ring slots allocated over all epochs: {slots} (prefetch 2: 5 when every batch is released); "
        f"shards per cache: {shards}"
    )
    for name, probe in memory.items():
        print(
            f"anonymous memory, {name} ({probe['rows']} rows): +{probe['anon_mb']:.1f} MiB "
            f"(file-backed RSS {probe['file_mb']:.0f} MiB)"
        )
    result = {
        "benchmark": "loader",
        "quick": quick,
        "n": n,
        "batch_size": BATCH,
        "samples_per_s": speed,
        "cpu_s_per_1k": cpu,
        "vs_pil_2workers": vs_pil,
        "vs_memcpy_ceiling": vs_memcpy,
        "anon_mb": {k: round(v["anon_mb"], 1) for k, v in memory.items()},
        "slot_allocations": slots,
        "shards": shards,
        "rss_file_mb": {k: round(v["file_mb"], 1) for k, v in memory.items()},
        "load_average": round(os.getloadavg()[0], 2),
        "phase_s": phases,
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
