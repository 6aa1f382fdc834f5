"""The preprocess stage: samples -> decoded, normalized pixels and token ids -> one cache per split.

```
source (Sample | Skip, deterministic order)
  -> assign_splits (key hash, sources without splits) -> drop empty captions
  -> fast-forward what a resumed build already holds
  -> chunks of `chunk_size` samples of one split -> worker processes: decode + resize + normalize,
     written straight into a shared-memory slot (no pixel bytes pickled); `2 * workers + 4`
     chunks in flight, plus per split a shard's worth lent to its cache: memory is bounded
     whatever the corpus size
  -> in order: tokenize the chunk (Rust, batched), CacheWriter.write of the slot's rows, lent:
     the shard is written from the slots, which go back to the pool once it is
OUT/<split>/           a cache (see vilbert.cache)
OUT/preprocess-report.json    rows per split, skips by reason with examples, options
OUT/preprocess-skips.jsonl    every image skipped by the workers (split, ordinal, key, reason);
                              a resumed build reads it to fast-forward without decoding again
```

Dirty data is skipped and counted by reason (`malformed-line`, `empty-caption`, `missing-image`,
`unreadable-image`, `outside-root`, `not-a-file`, `not-an-image`, `undecodable`, `too-large`), logged,
and recorded in the report and in each
cache's manifest (`extra["preprocess"]`). A crash leaves no manifest; `mode="resume"` keeps the
completed shards and skips the rows they hold. The same inputs and options give byte-identical
shards whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from vilbert.cache import CacheSpec, CacheWriter, Normalization, normalization
from vilbert.cache.format import write_json_atomic
from vilbert.errors import DataError, UsageError
from vilbert.pipeline._decode_pool import RESIZE_MODES, DecodePool
from vilbert.pipeline._preprocess_io import REPORT_NAME, SKIPS_NAME, BackgroundWriter, SkipLog, remove_stale_caches
from vilbert.pipeline.keys import KeyIndex
from vilbert.pipeline.sources import Sample, Skip, Source, assign_splits
from vilbert.pipeline.text import CaptionEncoder, EncodedCaptions, tokenizer_on_one_thread

__all__ = [
    "PIXEL_DTYPES",
    "REPORT_NAME",
    "SKIPS_NAME",
    "PreprocessOptions",
    "SplitReport",
    "PreprocessReport",
    "parse_normalization",
    "drop_empty_captions",
    "preprocess",
]

log = logging.getLogger(__name__)

PIXEL_DTYPES = ("float16", "uint8")
WRITE_MODES = ("create", "overwrite", "resume")
_EXAMPLES = 20  # skipped keys kept per reason in the report
_LOGGED = 5  # skips logged one by one per reason, then only counted


@dataclass(frozen=True, kw_only=True)
class PreprocessOptions:
    """How samples become cache rows. Everything but `workers` and `chunk_size` shapes the output."""

    image_size: int = 224
    resize_mode: str = "center-crop"
    pixel_dtype: str = "float16"
    """`float16` stores pixels normalized; `uint8` half the disk, normalized on the device later."""
    normalize: str | Normalization = "half"
    """timm's default ViT-B/16 weights were trained with mean = std = 0.5 (`half`), not ImageNet's."""
    max_len: int = 36
    """ViLBERT's caption length in tokens."""
    train_ratio: float = 0.8
    """The thesis split Conceptual Captions 80/20 (only for sources without splits)."""
    workers: int | None = None
    """Decoding processes; None = all cores, 0 = decode in this process."""
    chunk_size: int = 32
    """Images per task sent to a worker (all of one split); `2 * workers + 4` chunks in flight, plus
    per split those of one unwritten shard, exist at most."""
    mode: str = "create"
    """`create`, `overwrite` or `resume` (keep the completed shards of an interrupted build)."""
    target_shard_bytes: int = 128 << 20
    """Half the cache writer's default: one writer per split is open at once, each buffering a shard."""

    def __post_init__(self) -> None:
        checks = (
            (self.pixel_dtype in PIXEL_DTYPES, "pixel_dtype", self.pixel_dtype, ", ".join(PIXEL_DTYPES)),
            (self.resize_mode in RESIZE_MODES, "resize_mode", self.resize_mode, ", ".join(RESIZE_MODES)),
            (self.mode in WRITE_MODES, "mode", self.mode, ", ".join(WRITE_MODES)),
            (self.image_size > 0, "image_size", self.image_size, "> 0"),
            (self.max_len >= 3, "max_len", self.max_len, ">= 3"),
            (0.0 < self.train_ratio < 1.0, "train_ratio", self.train_ratio, "0 < ratio < 1"),
            (self.workers is None or self.workers >= 0, "workers", self.workers, ">= 0"),
            (self.chunk_size > 0, "chunk_size", self.chunk_size, "> 0"),
            (self.target_shard_bytes > 0, "target_shard_bytes", self.target_shard_bytes, "> 0"),
        )
        for ok, name, value, valid in checks:
            if not ok:
                raise UsageError(f"{name}={value!r} is invalid; valid: {valid}")
        object.__setattr__(self, "normalize", parse_normalization(self.normalize))


@dataclass
class SplitReport:
    """What one split's cache received."""

    path: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per shard file, in reading order (sources read from several): `rows` and skips by reason. The
    split's rows are in this order, so row `i` came from the file whose running row count passes `i`."""


@dataclass
class PreprocessReport:
    """The outcome of a run (also written to `OUT/preprocess-report.json`)."""

    out: str
    source: str
    splits: dict[str, SplitReport]
    skipped: dict[str, int]
    examples: dict[str, list[str]]
    """Up to 20 skipped keys (or FILE:LINE) with details, per reason."""
    rows_resumed: int
    seconds: float
    options: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rows": self.rows}


def parse_normalization(value: str | Normalization) -> Normalization:
    """A preset name (`half`, `imagenet`, `clip`) or `mean=R,G,B:std=R,G,B`.

    Raises:
        UsageError: an unknown name or malformed values.
    """
    if isinstance(value, Normalization):
        return value
    text = value.strip()
    if "=" not in text:
        return normalization(text)
    try:
        parts = dict(part.split("=", 1) for part in text.split(":"))
        mean, std = (tuple(float(v) for v in parts[k].split(",")) for k in ("mean", "std"))
    except (ValueError, KeyError) as err:
        raise UsageError(
            f"normalization {value!r} is malformed; valid: half, imagenet, clip, "
            "or mean=R,G,B:std=R,G,B (e.g. mean=0.5,0.5,0.5:std=0.5,0.5,0.5)"
        ) from err
    return normalization((mean, std))


def drop_empty_captions(items: Iterable[Sample | Skip]) -> Iterator[Sample | Skip]:
    """Turn samples whose caption is blank into `Skip(reason="empty-caption")`."""
    for item in items:
        if isinstance(item, Sample) and not item.caption.strip():
            item = Skip(
                item.key, "empty-caption", "caption is empty or whitespace", item.split, item.source, item.member
            )
        yield item


# ------------------------------------------------------------------------------------------- run


def preprocess(
    source: Source,
    out: str | os.PathLike[str],
    tokenizer: Tokenizer,
    options: PreprocessOptions | None = None,
    *,
    command: str = "vilbert.pipeline.preprocess",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> PreprocessReport:
    """Turn `source` into one cache per split under `out`.

    Args:
        source: Where samples come from (see `vilbert.pipeline.sources`).
        out: Root directory; caches go to `out/<split>`.
        tokenizer: Encodes captions; stored in every cache.
        options: Image, text, split and parallelism settings.
        command: The command line, recorded in each manifest.
        progress: Called after each chunk with `done` (items read), `total` (or None), `rows`,
            `skipped` and `splits` (rows per split).

    Returns:
        Rows per split and skips by reason.

    Raises:
        UsageError: `out` exists without `overwrite`/`resume`, or a resume with other inputs.
        DataError: no sample could be used.
    """
    options = options or PreprocessOptions()
    out, started = Path(out), time.perf_counter()
    encoder = CaptionEncoder(tokenizer, options.max_len)
    run = _RunState(out, source, encoder, options, command)
    items = drop_empty_captions(assign_splits(source, options.train_ratio))
    total = source.size_hint()
    norm = options.normalize
    workers = _default_workers(options.workers)
    pool = DecodePool(workers=workers, chunk_size=options.chunk_size,
                      image_size=options.image_size, resize_mode=options.resize_mode,
                      pixel_dtype=options.pixel_dtype, mean=norm.mean, std=norm.std,
                      lendable=run.lent_slots())  # fmt: skip
    one_thread = tokenizer_on_one_thread() if workers > 0 else nullcontext()  # the pool has the cores
    try:
        with one_thread, pool, BackgroundWriter(max_queued=pool.slots) as background:
            chunks = _batched(run.plan(items), options.chunk_size)
            prepare = lambda chunk: encoder([s.caption for _, s in chunk])  # noqa: E731 - tokenize while decoding

            def on_wait() -> None:  # every slot is lent or queued: more splits than the slots allow for
                background.check()
                background.submit(run.detach, done=lambda: None)

            results = pool.map_ordered(chunks, image=lambda item: item[1].image, prepare=prepare, on_wait=on_wait)
            for result in results:
                hold = _SlotHold(partial(pool.release, result))
                writes = run.take_chunk(result.chunk, result.prepared, result.pixels, result.failures, hold)
                background.submit(writes, done=hold.returned)
                if progress is not None:
                    progress(run.progress(total))
        report = run.finish(time.perf_counter() - started)
    except BaseException:
        run.abort()
        raise
    finally:
        run.close()
    if report.rows == 0:
        raise DataError(
            f"no usable sample in {source.description}: skipped {report.skipped or 'nothing'}; see {out / REPORT_NAME}"
        )
    return report


def _default_workers(workers: int | None) -> int:
    if workers is not None:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _batched(items: Iterable[tuple[int, Sample]], size: int) -> Iterator[list[tuple[int, Sample]]]:
    """Chunks of `size` samples of one split each, as they fill (each split keeps its order), then
    each split's last, shorter chunk. A chunk's slot is lent to one cache, and only until that
    split's shard is written: a chunk mixing splits would wait for the slowest split to fill one."""
    pending: dict[str, list[tuple[int, Sample]]] = {}
    for item in items:
        batch = pending.setdefault(item[1].split, [])
        batch.append(item)
        if len(batch) == size:
            yield pending.pop(item[1].split)
    yield from pending.values()


class _SlotHold:
    """A decoded chunk's slot: given back once the write job has run and every cache that borrowed
    rows from it has written (or copied) them. Lent from the main thread, returned from the writer's."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._count = 1  # the write job's own hold, returned when it has run
        self._lock = threading.Lock()

    def lend(self) -> Callable[[], None]:
        with self._lock:
            self._count += 1
        return self.returned

    def returned(self) -> None:
        with self._lock:
            self._count -= 1
            done = self._count == 0
        if done:
            self._release()


class _RunState:
    """Writers per split, skip accounting, the resume log and the report of one run."""

    def __init__(
        self, out: Path, source: Source, encoder: CaptionEncoder, options: PreprocessOptions, command: str
    ) -> None:
        self.out, self.source, self.encoder, self.options, self.command = out, source, encoder, options, command
        self.option_record = _option_record(options)
        identity = json.dumps([source.description, self.option_record, encoder.fingerprint], sort_keys=True)
        run_id = hashlib.sha256(identity.encode()).hexdigest()
        self.log = SkipLog(out, run_id, options.mode)
        self.writers: dict[str, CacheWriter] = {}
        self.open_writers = ExitStack()
        """Each writer is entered (locked, its directory prepared) when its split first appears."""
        self.labelled: dict[str, bool] = {}
        self.ordinals: Counter[str] = Counter()
        self.fast_forwarded: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.skipped: dict[str | None, Counter[str]] = {}
        self.examples: dict[str, list[str]] = {}
        self.by_source: dict[str | None, dict[str, Counter[str]]] = {}
        """split -> shard file -> rows and skips by reason, for sources read from several files."""
        self.keys = KeyIndex()
        self.done = 0

    # ------------------------------------------------------------------------ planning (in order)

    def plan(self, items: Iterable[Sample | Skip]) -> Iterator[tuple[int, Sample]]:
        """Samples to decode, tagged with their ordinal in their split; skips are counted here."""
        for item in items:
            self.done += 1
            if isinstance(item, Skip):
                self.count_skip(item)
                continue
            writer = self.writers[item.split] if item.split in self.writers else self._open_writer(item.split)
            if not self.keys.add(item.split, item.key):
                raise DataError(
                    f"key {item.key!r} ({item.where}) comes twice in split {item.split!r}: keys must be unique "
                    "in a cache. Sources whose keys collide (two img2dataset outputs) need distinct keys: "
                    "--key-prefix source for webdataset and parquet"
                )
            ordinal = self.ordinals[item.split]
            self.ordinals[item.split] += 1
            logged = self.log.skipped.get((item.split, ordinal))
            if logged is not None:
                self.count_skip(Skip(item.key, logged[0], logged[1], item.split, item.source, item.member))
            elif self.fast_forwarded[item.split] < writer.rows_done:
                self.fast_forwarded[item.split] += 1
                self.count_rows(item.split, [item])
            else:
                yield ordinal, item

    def _spec(self, split: str, has_labels: bool) -> CacheSpec:
        return self.encoder.cache_spec(
            split=split,
            image_size=self.options.image_size,
            pixel_dtype=self.options.pixel_dtype,
            normalization=self.options.normalize,
            has_labels=has_labels,
            has_captions=True,
            command=self.command,
            target_shard_bytes=self.options.target_shard_bytes,
        )

    def lent_slots(self) -> int:
        """Slots the caches may borrow at once: per split, the chunks of one unwritten shard (plus one
        that straddles two shards), for the source's splits (2 if it does not say). With more splits,
        the pool runs short and the caches copy what they borrowed (`detach`)."""
        names = self.source.split_names()
        rows = self._spec("train", has_labels=False).rows_per_shard
        assert rows is not None
        return (len(names) if names else 2) * (-(-rows // self.options.chunk_size) + 1)

    def _open_writer(self, split: str) -> CacheWriter:
        spec = self._spec(split, self.labelled.setdefault(split, self._has_labels(split)))
        writer = self.open_writers.enter_context(CacheWriter(self.out / split, spec, mode=self.options.mode))
        if writer.rows_done:
            log.info("%s: resuming after %d rows in completed shards", self.out / split, writer.rows_done)
        self.writers[split] = writer
        return writer

    def _has_labels(self, split: str) -> bool:
        names = self.source.split_names()
        if names is not None and split not in names:
            raise DataError(f"{self.source.description} yielded split {split!r} outside its splits {names}")
        return self.source.has_labels(split)

    def count_skip(self, skip: Skip) -> None:
        self.skipped.setdefault(skip.split, Counter())[skip.reason] += 1
        if skip.source is not None:
            self.by_source.setdefault(skip.split, {}).setdefault(skip.source, Counter())[skip.reason] += 1
        examples = self.examples.setdefault(skip.reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(f"{skip.where}: {skip.detail}" if skip.detail else skip.where)
        if len(examples) <= _LOGGED:
            log.warning("skipped %s (%s)%s", skip.where, skip.reason, f": {skip.detail}" if skip.detail else "")

    def count_rows(self, split: str, samples: list[Sample]) -> None:
        self.rows[split] += len(samples)
        for sample in samples:
            if sample.source is not None:
                self.by_source.setdefault(split, {}).setdefault(sample.source, Counter())["rows"] += 1

    # ----------------------------------------------------------------------- writing (in order)

    def take_chunk(
        self,
        samples: list[tuple[int, Sample]],
        encoded: EncodedCaptions,
        pixels: np.ndarray,
        failures: dict[int, tuple[str, str]],
        hold: _SlotHold,
    ) -> Callable[[], None]:
        """Log the chunk's skips now; return the writes of its rows to run later, split by split and
        run by run of consecutive rows, each lending its view of the slot `hold` stands for."""
        for index, (reason, detail) in sorted(failures.items()):
            ordinal, sample = samples[index]
            self.log.append(sample.split, ordinal, sample.key, reason, detail)
            self.count_skip(Skip(sample.key, reason, detail, sample.split, sample.source, sample.member))
        self.log.sync()  # durable before the rows are written: a committed shard's skips are on disk
        ids, num_tokens = encoded
        by_split: dict[str, list[int]] = {}
        for index, (_, sample) in enumerate(samples):
            if index not in failures:
                by_split.setdefault(sample.split, []).append(index)
        writes = []
        for split, rows in by_split.items():
            writer = self.writers[split]
            for take in _runs(rows):
                chosen = [sample for _, sample in samples[take]]
                labels = np.array([s.label for s in chosen], np.int64) if self.labelled[split] else None
                args = ([s.key for s in chosen], pixels[take], ids[take], num_tokens[take], labels)
                writes.append(partial(writer.write, *args, [s.caption for s in chosen], release=hold.lend()))
            self.count_rows(split, [samples[i][1] for i in rows])
        return partial(_run_all, writes)

    def detach(self) -> None:
        """Have every cache copy the rows it borrowed, giving their slots back (on the writer thread)."""
        copied = sum(writer.detach() for writer in list(self.writers.values()))
        if copied:
            log.info("copied %d borrowed rows: the decode slots ran short (%d splits)", copied, len(self.writers))

    def progress(self, total: int | None) -> dict[str, Any]:
        skipped = sum(sum(c.values()) for c in self.skipped.values())
        return {
            "done": self.done,
            "total": total,
            "rows": sum(self.rows.values()),
            "skipped": skipped,
            "splits": dict(self.rows),
        }

    # ---------------------------------------------------------------------------------- finish

    def finish(self, seconds: float) -> PreprocessReport:
        if self.options.mode == "overwrite":
            remove_stale_caches(self.out, keep=set(self.writers))
        splits, extras = {}, {}
        for split in sorted(self.writers):
            skipped = dict(sorted(self.skipped.get(split, Counter()).items()))
            sources = {name: dict(counts) for name, counts in self.by_source.get(split, {}).items()}
            extras[split] = {
                "source": self.source.description,
                "rows": self.rows[split],
                "skipped": skipped,
                "options": self.option_record,
            } | ({"sources": sources} if sources else {})
            splits[split] = SplitReport(
                path=str(self.out / split), rows=self.rows[split], skipped=skipped, sources=sources
            )
        # Each split's last shard is written, hashed and synced at once (all of it releases the GIL).
        with ThreadPoolExecutor(len(self.writers) or 1, thread_name_prefix="preprocess-finish") as finishing:
            done = [finishing.submit(w.finish, extra={"preprocess": extras[s]}) for s, w in self.writers.items()]
        for future in done:
            future.result()
        total: Counter[str] = Counter()
        for counter in self.skipped.values():
            total.update(counter)
        report = PreprocessReport(
            out=str(self.out),
            source=self.source.description,
            splits=splits,
            skipped=dict(sorted(total.items())),
            examples=self.examples,
            rows_resumed=sum(self.fast_forwarded.values()),
            seconds=round(seconds, 3),
            options=self.option_record,
        )
        write_json_atomic(self.out / REPORT_NAME, report.to_dict(), ensure_ascii=False)
        for reason, count in sorted(total.items()):
            log.info("skipped %d samples: %s", count, reason)
        return report

    def abort(self) -> None:
        """After a failure: drop unflushed rows, keep completed shards (for resume), no manifest."""
        for writer in self.writers.values():
            writer.abort()

    def close(self) -> None:
        self.open_writers.close()  # finished or aborted by now: this only releases them
        self.log.close()


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _runs(rows: list[int]) -> Iterator[slice]:
    """`rows` (ascending) as slices of consecutive rows: views of the chunk's pixels, no copy."""
    start = previous = rows[0]
    for row in rows[1:]:
        if row != previous + 1:
            yield slice(start, previous + 1)
            start = row
        previous = row
    yield slice(start, previous + 1)


def _option_record(options: PreprocessOptions) -> dict[str, Any]:
    norm = options.normalize
    assert isinstance(norm, Normalization)
    return {
        "image_size": options.image_size,
        "resize_mode": options.resize_mode,
        "pixel_dtype": options.pixel_dtype,
        "normalization": norm.to_dict(),
        "max_len": options.max_len,
        "train_ratio": options.train_ratio,
    }
