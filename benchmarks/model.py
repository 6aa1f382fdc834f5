"""ViLBERT forward+backward throughput: fused SDPA attention against plain matmul-softmax attention.

For the `tiny` and `vilbert_base` presets (random weights, the preset's freezing: `vilbert_base`
trains only the cross layers and heads, as in the thesis) the script times one training step
without the optimizer: forward, the MLM head at 15% of the real tokens, the alignment head, and
backward. Each model runs with every attention (ours and timm's) on `F.scaled_dot_product_attention`
and on the plain reference (`q @ k.T`, masked softmax, `@ v`), alternating step by step so both see
the same machine load; the figure is the median step time, reported as samples per second.

    python benchmarks/model.py --quick      # about a minute on 2 CPU cores
    python benchmarks/model.py              # more steps, larger batches
    python benchmarks/model.py --device cuda
    python benchmarks/model.py --quick --threads 1   # on a CPU shared with other jobs

On CUDA the step runs under bf16 autocast. Prints a table, then as its last line one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from vilbert.config import ModelConfig, preset
from vilbert.model import ViLBERT, set_fused_attention

TEXT_LEN = 36  # ViLBERT's caption length (data.max_len)


def make_batch(config: ModelConfig, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, TEXT_LEN), generator=g)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    lengths = torch.randint(8, TEXT_LEN + 1, (batch,), generator=g)
    mask[torch.arange(TEXT_LEN)[None, :] >= lengths[:, None]] = 0  # realistic padding
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mlm = (torch.rand(batch, TEXT_LEN, generator=g) < 0.15) & mask.bool()
    mlm[:, 1] = True  # at least one position per row
    tensors = {"input_ids": ids, "attention_mask": mask, "pixels": pixels, "mlm_positions": mlm}
    return {k: v.to(device) for k, v in tensors.items()}


def step(model: ViLBERT, batch: dict[str, torch.Tensor], device: str) -> float:
    """One forward+backward; returns seconds."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixels"])
        logits = model.mlm_logits(out.text[batch["mlm_positions"]])
        loss = logits.float().logsumexp(-1).mean() + model.alignment_logits(out).float().logsumexp(-1).mean()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench(name: str, batch_size: int, steps: int, device: str) -> dict[str, float]:
    config = preset(name).model
    config = dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, pretrained=None),
        vision=dataclasses.replace(config.vision, pretrained=None),
    )
    torch.manual_seed(0)
    model = ViLBERT(config).to(device).train()
    batch = make_batch(config, batch_size, device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(steps + 1):  # the first round warms up both paths and is dropped
        for fused in (True, False):
            set_fused_attention(model, fused)
            elapsed = step(model, batch, device)
            if i:
                times[fused].append(elapsed)
    fused_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
    report = model.parameter_report()["all"]
    return {
        "batch": batch_size,
        "steps": steps,
        "trainable_params": report["trainable"],
        "fused_samples_per_s": round(batch_size / fused_s, 2),
        "plain_samples_per_s": round(batch_size / plain_s, 2),
        "fused_over_plain": round(plain_s / fused_s, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="tiny,vilbert_base")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = args.device == "cpu"
    sizes = {  # (batch, timed steps)
        "tiny": (16, 5) if args.quick else (64, 20),
        "vilbert_base": ((2, 2) if args.quick else (4, 5)) if cpu else ((16, 5) if args.quick else (64, 20)),
    }
    results: dict[str, object] = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "seq_len": TEXT_LEN,
        "autocast": "bf16" if args.device == "cuda" else "off",
    }
    print(f"{'preset':<14}{'batch':>6}{'fused samples/s':>17}{'plain samples/s':>17}{'fused/plain':>13}")
    for name in args.presets.split(","):
        batch, steps = sizes.get(name, (4, 3))
        r = bench(name, batch, steps, args.device)
        results[name] = r
        print(
            f"{name:<14}{batch:>6}{r['fused_samples_per_s']:>17}{r['plain_samples_per_s']:>17}"
            f"{r['fused_over_plain']:>13}",
            flush=True,
        )
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
