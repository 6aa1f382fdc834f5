"""A pretraining step fed by the real cache loader, against the same batches already on the device.

The trainer must never wait for data. This script writes a cache of random uint8 images and token
ids (the preset's image size), then times the trainer's step - tasks built on the device (AP swap,
MLM, MIM masks), forward with the MIM target view, backward, clipping, AdamW, schedule - two ways,
alternating step by step so both see the same machine load:

- `loader`: each step takes the next batch from `vilbert.cache.BatchLoader` (background gather into
  pinned buffers, `non_blocking` copy to the device), timing how long `next()` blocks;
- `device`: each step takes one of the same batches, gathered and copied to the device beforehand.

It prints samples/s for both, their ratio, the fraction of the loader step spent waiting for data,
and on a GPU the model FLOPs utilization (FLOPs of one step counted by `FlopCounterMode` / step time /
the GPU's dense bf16 peak). The step runs under bf16 autocast on CUDA, as the trainer does.

    python benchmarks/train_step.py --quick                         # tiny preset, CPU, < 60 s
    python benchmarks/train_step.py --device cuda                   # vilbert_base, bf16
    python benchmarks/train_step.py --device cuda --preset tiny --batch-size 256

Prints a table, then as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vilbert.cache import BatchLoader, CacheReader, CacheSpec, CacheWriter
from vilbert.config import Config, preset
from vilbert.model import ViLBERT
from vilbert.train.masking import SpecialTokens
from vilbert.train.optim import build_optimizer, build_scheduler
from vilbert.train.pixels import PixelNormalizer
from vilbert.train.tasks import PretrainObjective, build_task_batch

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "4090": 165.0,
    "3090": 71.0,
}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts); the first name found in the device's wins."""


def write_cache(root: Path, config: Config, rows: int) -> Path:
    """A uint8 cache of random pixels and captions with a WordPiece vocabulary of the model's size."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    vocab_size, max_len, size = config.model.text.vocab_size, config.data.max_len, config.data.image_size
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, max_len + 1, rows).astype(np.int32)
    ids = rng.integers(5, vocab_size, (rows, max_len)).astype(np.int32)
    ids[:, 0] = 2
    ids[np.arange(rows), lengths - 1] = 3
    ids[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
    with CacheWriter(
        root / "train",
        CacheSpec(
            split="train",
            image_size=size,
            pixel_dtype="uint8",
            normalization="half",
            max_len=max_len,
            tokenizer_json=tokenizer.to_str(),
            special_token_ids=dict(zip(("pad", "unk", "cls", "sep", "mask"), range(5), strict=True)),
            vocab_size=vocab_size,
            has_labels=False,
            command="benchmarks/train_step.py",
        ),
    ) as writer:
        for start in range(0, rows, 256):
            stop = min(start + 256, rows)
            pixels = rng.integers(0, 256, (stop - start, 3, size, size), dtype=np.uint8)
            keys = [f"r{i}" for i in range(start, stop)]
            writer.write(keys, pixels, ids[start:stop], lengths[start:stop], None, [""] * (stop - start))
    return root / "train"


class Stepper:
    """The trainer's step on given batches (see `vilbert.train.pretrain`)."""

    def __init__(self, config: Config, device: torch.device, compile_model: bool) -> None:
        torch.manual_seed(0)
        self.config, self.device = config, device
        self.model = ViLBERT(config.model).to(device).train()
        if compile_model:
            self.model.compile()
        self.objective = PretrainObjective(self.model, config.pretrain)
        cfg = config.pretrain
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=10, total_steps=10_000, schedule="linear")
        self.special = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
        self.normalizer = PixelNormalizer(self.model.image_mean, self.model.image_std, device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def __call__(self, batch) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a new training step for CUDA graphs (reduce-overhead)
        tasks = build_task_batch(
            batch.pixels,
            batch.input_ids,
            batch.num_tokens,
            config=self.config.pretrain,
            special=self.special,
            vocab_size=self.config.model.text.vocab_size,
            num_patches=self.model.num_patches,
            normalizer=self.normalizer,
            generator=self.generator,
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.objective(tasks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.pretrain.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self, batch) -> float:
        """FLOPs of one step's forward and backward (matmuls, attention, convolutions)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self(batch)
        return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(stepper: Stepper, reader: CacheReader, args: argparse.Namespace, device: torch.device) -> dict:
    loader = BatchLoader(reader, args.batch_size, shuffle=True, seed=0, drop_last=True, device=device)
    resident = [b for _, b in zip(range(args.resident), iter(loader), strict=False)]  # on the device already
    batches = iter(loader)
    times: dict[str, list[float]] = {"loader": [], "device": []}
    waits: list[float] = []
    for i in range(args.warmup + args.steps):
        for mode in ("loader", "device"):
            sync(device)
            start = time.perf_counter()
            if mode == "loader":
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                wait = time.perf_counter() - start
            else:
                batch = resident[i % len(resident)]
            stepper(batch)
            sync(device)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - start)
                if mode == "loader":
                    waits.append(wait)
    return {"times": times, "waits": waits, "sample": resident[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps: under a minute on 2 cores")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--preset", default=None, help="default: vilbert_base on CUDA, tiny on CPU")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None, help="rows in the benchmark cache")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared CPU: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    name = args.preset or ("vilbert_base" if cuda and not args.quick else "tiny")
    args.batch_size = args.batch_size or (64 if cuda else 16)
    args.steps = args.steps or (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.resident = 4
    rows = args.rows or max(args.batch_size * (args.steps + args.warmup + args.resident + 2), 512)

    config = preset(name)
    model_config = dataclasses.replace(
        config.model,
        text=dataclasses.replace(config.model.text, pretrained=None),
        vision=dataclasses.replace(config.model.vision, pretrained=None),
    )
    pretrain_config = dataclasses.replace(config.pretrain, batch_size=args.batch_size)
    config = dataclasses.replace(config, model=model_config, pretrain=pretrain_config)
    with tempfile.TemporaryDirectory(prefix="vilbert-train-step-") as tmp:
        start = time.perf_counter()
        reader = CacheReader(write_cache(Path(tmp), config, rows))
        setup_s = time.perf_counter() - start
        stepper = Stepper(config, device, args.compile)
        result = measure(stepper, reader, args, device)
        flops = stepper.flops(result["sample"]) if cuda else None
    report(name, device, args, result, flops, setup_s)


def report(
    name: str, device: torch.device, args: argparse.Namespace, result: dict, flops: float | None, setup_s: float
) -> None:
    loader_s = statistics.median(result["times"]["loader"])
    device_s = statistics.median(result["times"]["device"])
    wait_frac = sum(result["waits"]) / sum(result["times"]["loader"])
    figures = {
        "benchmark": "train_step",
        "preset": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "loader_samples_per_s": round(args.batch_size / loader_s, 2),
        "device_samples_per_s": round(args.batch_size / device_s, 2),
        "loader_vs_device": round(device_s / loader_s, 3),
        "data_wait_frac": round(wait_frac, 4),
        "cache_setup_s": round(setup_s, 1),
    }
    if flops is not None:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in figures["device"]), None)
        figures["tflops_per_step"] = round(flops / 1e12, 3)
        figures["achieved_tflops"] = round(flops / loader_s / 1e12, 1)
        figures["mfu"] = round(flops / loader_s / (peak * 1e12), 4) if peak else None
        figures["peak_bf16_tflops"] = peak
        figures["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(f"train step, {name} on {figures['device']}, batch {args.batch_size}, median of {args.steps} steps")
    print(f"{'feed':<22}{'step ms':>10}{'samples/s':>12}")
    print(f"{'real loader':<22}{loader_s * 1e3:>10.1f}{figures['loader_samples_per_s']:>12.1f}")
    print(f"{'batches on device':<22}{device_s * 1e3:>10.1f}{figures['device_samples_per_s']:>12.1f}")
    print(
        f"loader/device throughput ratio {figures['loader_vs_device']:.3f}; "
        f"waiting for data {100 * wait_frac:.2f}% of the loader step"
    )
    if flops is not None:
        tflops, achieved, mfu = figures["tflops_per_step"], figures["achieved_tflops"], figures["mfu"]
        print(f"{tflops} TFLOP per step, {achieved} TFLOP/s, MFU {mfu}")
    print(json.dumps(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
