"""Preprocess's image stage (`vilbert/pipeline/_decode_pool.py`): the same pixels as `decode_resize`."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vilbert.pipeline._decode_pool import DecodePool, _stage, decode_chunk, normalization_lut
from vilbert.pipeline.images import decode_resize, encode_jpeg
from vilbert.pipeline.local_files import LocalFile

SIZE = 32


def _images() -> list[bytes]:
    rng = np.random.default_rng(3)
    jpegs = [encode_jpeg(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), quality=90) for _ in range(4)]
    larger = encode_jpeg(rng.integers(0, 256, (SIZE * 2, SIZE + 9, 3), dtype=np.uint8), quality=90)
    grey = io.BytesIO()  # at the size too: the shortcut decodes it to RGBX like the colour ones
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), "L").save(grey, "JPEG", quality=90)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(png, "PNG")
    return [*jpegs, grey.getvalue(), larger, png.getvalue(), b"\xff\xd8\xff\xe0 not a jpeg"]


def test_each_row_holds_its_own_image_and_failures_are_named():
    # The at-size JPEGs decode into one reused buffer: every row must still be its own image.
    images = _images()
    out = np.zeros((len(images), 3, SIZE, SIZE), np.uint8)
    failures = decode_chunk(images, out, size=SIZE, mode="center-crop", lut=None)
    assert list(failures) == [len(images) - 1] and failures[len(images) - 1][0] == "undecodable"
    for i, image in enumerate(images[:-1]):
        np.testing.assert_array_equal(out[i], decode_resize(image, size=SIZE).transpose(2, 0, 1))
    assert len({out[i].tobytes() for i in range(len(images) - 1)}) == len(images) - 1


def test_float16_rows_are_the_lookup_of_the_uint8_rows_on_worker_processes():
    images = _images()[:-1]
    lut = normalization_lut((0.48, 0.45, 0.41), (0.27, 0.26, 0.28))
    chunks = [images[:3], images[3:]]
    pool = DecodePool(workers=2, chunk_size=4, image_size=SIZE, resize_mode="center-crop", pixel_dtype="float16",
                      mean=(0.48, 0.45, 0.41), std=(0.27, 0.26, 0.28))  # fmt: skip
    with pool:
        results = [(r.chunk, r.pixels.copy(), r.failures) for r in pool.map_ordered(chunks, lambda x: x, len)]
    assert [chunk for chunk, _, _ in results] == chunks and all(not f for _, _, f in results)
    pixels = np.concatenate([p for _, p, _ in results])
    for i, image in enumerate(images):
        rgb = decode_resize(image, size=SIZE)
        expected = np.stack([lut[c][rgb[:, :, c]] for c in range(3)])
        np.testing.assert_array_equal(pixels[i], expected)


def test_staged_piped_and_local_images_decode_alike_while_stages_are_reused(tmp_path, monkeypatch):
    # A stage smaller than the chunk's images: the first images are staged in shared memory, the
    # ones that no longer fit and every LocalFile travel through the pipe; six chunks through two
    # stages reuse each stage while the other chunk decodes.
    images = _images()
    (tmp_path / "local.jpg").write_bytes(images[0])
    local = LocalFile(tmp_path.resolve(), "local.jpg", where="list.txt:1")
    chunks = [[*images[i % 2 :], local] for i in range(6)]
    monkeypatch.setattr(DecodePool, "STAGE_BYTES", sum(map(len, images[:3])))
    staged = [type(s).__name__ for s in _stage(chunks[0], np.zeros(DecodePool.STAGE_BYTES, np.uint8))]
    assert staged[:3] == ["_Staged"] * 3 and "bytes" in staged and staged[-1] == "LocalFile"
    pool = DecodePool(workers=2, chunk_size=len(images) + 1, image_size=SIZE, resize_mode="center-crop",
                      pixel_dtype="uint8", mean=(0.5,) * 3, std=(0.5,) * 3, in_flight=2)  # fmt: skip
    with pool:
        results = []
        for result in pool.map_ordered(chunks, lambda x: x, len):
            results.append((result.pixels.copy(), result.failures))
            pool.release(result)
    for chunk, (pixels, failures) in zip(chunks, results, strict=True):
        expected = np.zeros_like(pixels)
        assert failures == decode_chunk(chunk, expected, size=SIZE, mode="center-crop", lut=None)
        assert [i for i, _ in failures.items()] == [len(chunk) - 2]  # the broken JPEG, by index
        np.testing.assert_array_equal(pixels, expected)
