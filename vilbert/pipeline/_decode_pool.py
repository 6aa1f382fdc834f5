"""Preprocess's parallel image stage: decode + resize + normalize into shared memory, in order.

The parent owns one anonymous shared mapping split into slots of `chunk_size` images
(`[slots, chunk, 3, H, W]`, float16 or uint8), and a second one with a stage of `STAGE_BYTES` for
each chunk in flight. It copies a chunk's encoded images into the chunk's stage and sends a worker
the slot, the stage and each image's place in it (an image that does not fit, and a `LocalFile`:
compact, read and checked by the worker, so one file at a time per worker is in memory, go through
the executor's pipe); the worker decodes each image with `vilbert.pipeline.images.decode_resize` and
writes the normalized pixels straight into the slot, so neither pixels nor encoded images are
pickled (the pipe cost more: docs/results.md, appendix C). Results come back in submission order; a
slot is reused only after the consumer releases it (possibly from another thread, once the rows are
written: preprocess lends them to the cache writer until their shard is on disk). At most
`in_flight` chunks are submitted and not yet yielded, and at most `in_flight + lendable` slots
exist, so memory stays bounded. Free slots and stages are reused last-in first-out, so a run that
needs few of them touches few pages.

At-size JPEGs (fetch output) decode to RGBX and split into channel planes by a cast of 32-bit
words (`RGBXImage`: a quarter of the cost of numpy's transposing copy of RGB); anything resized
is HWC RGB, transposed or looked up per channel. Normalization to float16 is a per-channel lookup
table of the 256 possible values, computed in float64 and rounded once: exact to float16
precision, and cheaper than float arithmetic (numpy's float32 -> float16 cast alone costs more),
than a 65,536-entry table of pixel pairs (its 768 KiB miss the cache that two workers and the
other processes share, where the 512-byte table stays in L1), and, on an HWC image, than
reordering it to CHW first (docs/results.md, appendix C).
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import simplejpeg

from vilbert.errors import DataError
from vilbert.pipeline.images import (
    RESIZE_MODES,
    ImageDecodeError,
    decode_resize,
    image_format,
    jpeg_orientation,
    jpeg_output_bytes,
)
from vilbert.pipeline.local_files import LocalFile, LocalFileError

__all__ = ["RESIZE_MODES", "Decoded", "DecodePool", "normalization_lut", "decode_chunk"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Failures = dict[int, tuple[str, str]]
"""Index in the chunk -> (reason, detail) for the images that did not decode."""


@dataclass(frozen=True)
class Decoded(Generic[T]):
    """One decoded chunk: the items, what `prepare` made of them, their pixels and failures."""

    chunk: list[Any]
    prepared: T
    pixels: np.ndarray
    """`[len(chunk), 3, H, W]`, a view into a shared slot: valid until `DecodePool.release`."""
    failures: Failures
    slot: int


def normalization_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float16 `[3, 256]`: `lut[c, v] = (v / 255 - mean[c]) / std[c]`, rounded once from float64."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = np.asarray(mean, np.float64)[:, None]
    std = np.asarray(std, np.float64)[:, None]
    return ((values[None, :] - mean) / std).astype(np.float16)


def decode_chunk(
    images: Sequence[bytes | LocalFile], out: np.ndarray, *, size: int, mode: str, lut: np.ndarray | None
) -> Failures:
    """Decode `images` into `out[i]` (`[3, size, size]`, float16 through `lut`, or uint8 if None)."""
    failures: Failures = {}
    for i, image in enumerate(images):
        try:
            data = image if isinstance(image, bytes) else image.read()  # LocalFile: confined, capped
            rgb = _decode(data, size, mode)  # (H, W, 3) uint8, or this thread's RGBXImage
        except LocalFileError as err:
            failures[i] = (err.reason, str(err))
        except ImageDecodeError as err:  # a dataset file's skip names its listing line
            failures[i] = (err.reason, str(err) if isinstance(image, bytes) else f"{image}: {err}")
        else:
            _store(rgb, out[i], lut)
    return failures


def _decode(data: bytes, size: int, mode: str) -> np.ndarray | RGBXImage:
    """`decode_resize`, with a shortcut for upright JPEGs already at the size (fetch output).

    The shortcut is the same libjpeg-turbo decode `decode_resize` does, minus its identity resize:
    the pixels are equal (tested), at a third of the cost. It decodes into this thread's reusable
    `RGBXImage`, not a fresh array each time (faster in one process: docs/results.md, appendix C),
    valid until this thread's next decode (`_store` copies it at once).
    """
    if image_format(data) == "JPEG":  # the gate, as in decode_resize
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            upright = jpeg_orientation(data) in (None, 1)
            if height == width == size and colorspace in ("YCbCr", "Gray", "RGB") and upright:
                return _rgbx_image(size).decode(data)
        except ValueError:
            pass  # decode_resize names the problem
    return decode_resize(data, size=size, mode=mode)


class RGBXImage:
    """A reusable JPEG output of `size` x `size` pixels, decoded as RGBX, whose `store` writes
    channel planes.

    libjpeg-turbo writes 4 bytes a pixel (R, G, B, then 255) as fast as 3, and 4-byte pixels split
    into planes without numpy's transposing copy, which moves one byte at a time: channel `c` is the
    low byte of the little-endian 32-bit word at byte `c` of each pixel, so casting those words to
    uint8 writes plane `c`, a vectorized pass (docs/results.md, appendix C). The
    buffer starts off the aligned stores (`jpeg_output_bytes`) and has 4 bytes to spare for the last
    word of channels 1 and 2.
    """

    def __init__(self, size: int) -> None:
        n = size * size
        memory = jpeg_output_bytes(4 * n + 4)
        self.size = size
        self.pixels = memory[: 4 * n].reshape(size, size, 4)
        self._channels = [np.ndarray((size, size), "<u4", buffer=memory, offset=c) for c in range(3)]
        self._plane = np.empty((size, size), np.uint8)

    def decode(self, data: bytes) -> RGBXImage:
        simplejpeg.decode_jpeg(data, colorspace="RGBX", buffer=self.pixels)
        return self

    def store(self, out: np.ndarray, lut: np.ndarray | None) -> None:
        """The pixels as `[3, size, size]`: uint8 planes, or float16 through `lut` (`[3, 256]`)."""
        for c in range(3):
            if lut is None:
                out[c] = self._channels[c]  # the cast keeps each word's low byte
            else:
                self._plane[...] = self._channels[c]
                np.take(lut[c], self._plane, out=out[c], mode="clip")  # "clip": writes into `out` directly


_BUFFERS = threading.local()


def _rgbx_image(size: int) -> RGBXImage:
    image = getattr(_BUFFERS, "rgbx", None)
    if image is None or image.size != size:
        image = _BUFFERS.rgbx = RGBXImage(size)
    return image


def _store(rgb: np.ndarray | RGBXImage, out: np.ndarray, lut: np.ndarray | None) -> None:
    if isinstance(rgb, RGBXImage):
        rgb.store(out, lut)
        return
    if lut is None:
        out[...] = rgb.transpose(2, 0, 1)  # (3, H, W)
        return
    for c in range(3):
        # mode="clip" lets numpy write into `out` directly (uint8 indices are always in range).
        np.take(lut[c], rgb[:, :, c], out=out[c], mode="clip")


# ------------------------------------------------------------------------------- worker process

_WORKER: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class _Staged:
    """An encoded image at `stage[start:end]` of its chunk's stage."""

    start: int
    end: int


Sent = bytes | LocalFile | _Staged
"""An image as a worker receives it."""


def _init_worker(pixels: np.ndarray, stages: np.ndarray, size: int, mode: str, lut: np.ndarray | None) -> None:
    # `pixels` and `stages` view the parent's anonymous shared mappings, inherited through fork.
    # One thread per worker: the pool already uses every core (decode_resize may run torch ops).
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _WORKER.update(pixels=pixels, stages=stages, size=size, mode=mode, lut=lut)


def _worker_chunk(slot: int, stage: int, sent: list[Sent]) -> Failures:
    w = _WORKER
    staged = w["stages"][stage]
    images = [staged[i.start : i.end].tobytes() if isinstance(i, _Staged) else i for i in sent]
    return decode_chunk(images, w["pixels"][slot], size=w["size"], mode=w["mode"], lut=w["lut"])


def _stage(images: list[bytes | LocalFile], stage: np.ndarray) -> list[Sent]:
    """Copy the images that fit into `stage`, in order; the rest (and every `LocalFile`) go as they are."""
    sent: list[Sent] = []
    at = 0
    for image in images:
        if isinstance(image, bytes) and at + len(image) <= len(stage):
            stage[at : at + len(image)] = np.frombuffer(image, np.uint8)
            sent.append(_Staged(at, at + len(image)))
            at += len(image)
        else:
            sent.append(image)
    return sent


def _ready() -> None:
    pass


def _can_fork() -> bool:
    # fork: workers start in milliseconds, import nothing and inherit the shared pixel mapping.
    # spawn/forkserver would re-import the caller's __main__ in every worker (for the `vilbert`
    # console script: the whole CLI, torch included: seconds and hundreds of MB each). The pool
    # is started before this process starts any thread of its own.
    return "fork" in multiprocessing.get_all_start_methods()


# ------------------------------------------------------------------------------------------ pool


class DecodePool:
    """Decodes chunks of images on `workers` processes (0: in this process), results in order.

    Args:
        workers: Worker processes; 0 decodes in the calling process.
        chunk_size: Most images per chunk.
        image_size: Output side.
        resize_mode: One of `RESIZE_MODES`.
        pixel_dtype: `float16` (normalized with `normalization`) or `uint8`.
        mean: Per-channel mean (of pixel / 255) for float16 output.
        std: Per-channel standard deviation for float16 output.
        in_flight: Chunks submitted and not yet yielded, at most (default `2 * workers + 4`).
        lendable: Slots beyond `in_flight`, for chunks the consumer holds after they are yielded.
    """

    IN_FLIGHT_PER_WORKER = 2
    """Chunks per worker in flight (plus 4) by default: one decoding, one queued."""
    STAGE_BYTES = 8 << 20
    """Encoded images a chunk in flight may stage in shared memory (a chunk of 224x224 JPEGs fills a
    small part of it); pages are touched only as far as chunks fill them."""
    WAIT_S = 0.25
    """How long `map_ordered` waits for a free slot, with nothing in flight, before calling `on_wait`."""

    def __init__(
        self,
        *,
        workers: int,
        chunk_size: int,
        image_size: int,
        resize_mode: str,
        pixel_dtype: str,
        mean: Sequence[float],
        std: Sequence[float],
        in_flight: int | None = None,
        lendable: int = 0,
    ) -> None:
        self.workers = workers
        self.in_flight = in_flight or self.IN_FLIGHT_PER_WORKER * max(workers, 1) + 4
        self.slots = self.in_flight + lendable
        self.shape = (self.slots, chunk_size, 3, image_size, image_size)
        self.dtype = np.dtype(pixel_dtype)
        self.lut = normalization_lut(mean, std) if pixel_dtype == "float16" else None
        self.image_size, self.resize_mode = image_size, resize_mode
        self._free: queue.LifoQueue[int] = queue.LifoQueue()
        for slot in reversed(range(self.slots)):
            self._free.put(slot)
        self._executor: ProcessPoolExecutor | None = None
        self.pixels: np.ndarray | None = None
        self._stages: np.ndarray | None = None

    def __enter__(self) -> DecodePool:
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.workers > 0 and not _can_fork():
            log.warning("no fork() on this platform: decoding in this process (--workers 0)")
            self.workers = 0
        if self.workers == 0:
            self.pixels = np.empty(self.shape, self.dtype)
            return self
        # Anonymous shared memory: no name to leak in /dev/shm if the run is killed, and it is
        # unmapped only when the last array viewing it is gone (a view in a traceback stays valid).
        self.pixels = np.frombuffer(mmap.mmap(-1, nbytes), self.dtype).reshape(self.shape)
        stages = mmap.mmap(-1, self.in_flight * self.STAGE_BYTES)
        self._stages = np.frombuffer(stages, np.uint8).reshape(self.in_flight, self.STAGE_BYTES)
        self._executor = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(self.pixels, self._stages, self.image_size, self.resize_mode, self.lut),
        )
        # Start every worker now, before this process uses the tokenizer's threads.
        for future in [self._executor.submit(_ready) for _ in range(self.workers)]:
            future.result()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.pixels = self._stages = None

    def map_ordered(
        self,
        chunks: Iterable[list[Any]],
        image: Callable[[Any], bytes | LocalFile],
        prepare: Callable[[list[Any]], T],
        on_wait: Callable[[], None] | None = None,
    ) -> Iterator[Decoded[T]]:
        """Decode each chunk's images; yield a `Decoded` per chunk, in order.

        `prepare(chunk)` runs in this process while the workers decode (tokenization goes there).
        Each result's `pixels` (`[len(chunk), 3, H, W]`) is a view into a slot that stays reserved
        until `release(result)` is called (from any thread); with every slot reserved, the next
        submission waits for a release, calling `on_wait()` every `WAIT_S` seconds while nothing is
        in flight (to raise the consumer's error, or to have it give slots back).
        """
        assert self.pixels is not None, "use DecodePool as a context manager"
        pending: deque[tuple[list[Any], int, int, Future[Failures], T]] = deque()
        free_stages = list(range(self.in_flight))  # a chunk's stage is free again once it is decoded
        source = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.in_flight:
                slot = self._next_slot(wait=not pending, on_wait=on_wait)
                if slot is None:
                    break
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    self._free.put(slot)
                    break
                stage = free_stages.pop()
                future = self._submit(slot, stage, [image(item) for item in chunk])
                pending.append((chunk, slot, stage, future, prepare(chunk)))
            if not pending:
                return
            chunk, slot, stage, future, prepared = pending.popleft()
            try:
                failures = future.result()
            except BrokenProcessPool as err:
                raise DataError(
                    "a decode worker died (killed for memory, or a crash in an image decoder); completed "
                    "shards are kept: rerun with --resume, with fewer --workers if memory is short"
                ) from err
            free_stages.append(stage)
            yield Decoded(chunk, prepared, self.pixels[slot, : len(chunk)], failures, slot)

    def _next_slot(self, *, wait: bool, on_wait: Callable[[], None] | None) -> int | None:
        """A free slot; None if there is none and not `wait`."""
        while True:
            try:
                return self._free.get(block=wait, timeout=self.WAIT_S if wait else None)
            except queue.Empty:
                if not wait:
                    return None
                if on_wait is not None:
                    on_wait()

    def release(self, result: Decoded[Any]) -> None:
        """Give `result`'s slot back for reuse (its `pixels` must not be read afterwards)."""
        self._free.put(result.slot)

    def _submit(self, slot: int, stage: int, images: list[bytes | LocalFile]) -> Future[Failures]:
        if self._executor is not None:
            assert self._stages is not None
            return self._executor.submit(_worker_chunk, slot, stage, _stage(images, self._stages[stage]))
        future: Future[Failures] = Future()
        out = self.pixels[slot]
        future.set_result(decode_chunk(images, out, size=self.image_size, mode=self.resize_mode, lut=self.lut))
        return future
