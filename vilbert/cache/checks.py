"""Range checks of cache rows: what the reader hands out and what `verify_cache` reads in full.

A shard corrupted in place keeps its size, so opening a cache does not notice it; an out-of-range
token id then crashes the embedding on CPU and is a device-side assert on CUDA, far from its cause.
`first_bad_row` finds such values with a few vectorized reductions over a batch (no copy), so the
reader refuses a batch before any step uses it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["first_bad_row"]

_Check = tuple[np.ndarray, Callable[[int], str]]


def first_bad_row(
    columns: dict[str, np.ndarray], vocab_size: int, max_len: int, num_labels: int | None = None
) -> tuple[int, str] | None:
    """The first row holding a value no valid cache holds, and what it holds; None when all are valid.

    Args:
        columns: `input_ids` `[N, max_len]`, `num_tokens` `[N]`, `label` `[N]`, `pixels` `[N, ...]`;
            any subset.
        vocab_size: Token ids must lie in `[0, vocab_size)`.
        max_len: `num_tokens` must lie in `[2, max_len]` ([CLS] and [SEP] at least).
        num_labels: Labels must lie in `[0, num_labels)`; None: `>= 0` only.
    """
    checks: list[_Check] = []
    ids = columns.get("input_ids")
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = (ids < 0) | (ids >= vocab_size)
        checks.append((bad.any(axis=1), lambda i: f"token id {ids[i][bad[i]][0]} outside [0, vocab_size={vocab_size})"))
    lengths = columns.get("num_tokens")
    if lengths is not None and lengths.size and (lengths.min() < 2 or lengths.max() > max_len):
        rows = (lengths < 2) | (lengths > max_len)
        checks.append((rows, lambda i: f"num_tokens {lengths[i]} outside [2, max_len={max_len}]"))
    labels = columns.get("label")
    high = num_labels if num_labels is not None else np.iinfo(np.int64).max
    if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= high):
        rows = (labels < 0) | (labels >= high)
        valid = "[0, inf)" if num_labels is None else f"[0, num_labels={num_labels})"
        checks.append((rows, lambda i: f"label {labels[i]} outside {valid}"))
    pixels = columns.get("pixels")
    if pixels is not None and pixels.dtype == np.float16 and pixels.size:
        checks += _non_finite(pixels.reshape(len(pixels), -1))
    if not checks:
        return None
    position = min(int(np.flatnonzero(rows)[0]) for rows, _ in checks)
    return position, next(describe(position) for rows, describe in checks if rows[position])


def _non_finite(pixels: np.ndarray) -> list[_Check]:
    # A float16 is inf or NaN when its exponent bits are all set: its bits read as uint16 are
    # >= 0xFC00 when negative, or read as int16 >= 0x7C00 when positive. Two integer reductions
    # over the batch, no temporary (np.isfinite on float16 is 15x slower here).
    unsigned, signed = pixels.view(np.uint16), pixels.view(np.int16)
    if unsigned.max() < 0xFC00 and signed.max() < 0x7C00:
        return []
    rows = (unsigned.max(axis=1) >= 0xFC00) | (signed.max(axis=1) >= 0x7C00)
    return [(rows, lambda i: f"float16 pixel {pixels[i][~np.isfinite(pixels[i])][0]} (not finite)")]
