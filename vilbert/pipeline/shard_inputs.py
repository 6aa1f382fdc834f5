"""What the copies researchers already hold share: shard files named by paths, directories or globs,
and the fields that hold each sample's image, caption, label and key.

Used by `vilbert.pipeline.webdataset` (tar shards) and `vilbert.pipeline.parquet` (parquet files).
A field list names alternatives, first present wins: `jpg,png` is the `jpg` member (or column) of
a sample, else its `png`. In a tar shard a field is a member's extension, or `json.NAME` for a field
of the sample's `json` member (img2dataset writes `url`, `caption`, `key`, `status`, sizes there).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vilbert.errors import UsageError

__all__ = ["KEY_PREFIXES", "Columns", "expand_shards", "key_prefixes", "describe_shards"]

KEY_PREFIXES = ("none", "source")
"""`none`: keys as the source has them; `source`: `<shard path>/<key>` (the path relative to the
shards' common directory, without its extension): unique across sources whose keys collide."""


@dataclass(frozen=True)
class Columns:
    """Where a sample's parts are: a tuple of alternatives for each (first present wins)."""

    image: tuple[str, ...]
    caption: tuple[str, ...]
    label: tuple[str, ...] = ()
    """Empty: the source has no labels."""
    key: tuple[str, ...] = ()
    """Empty: the format's own key (a tar member's name; a parquet file's row number)."""

    @classmethod
    def parse(
        cls,
        defaults: Columns,
        *,
        image: str | None = None,
        caption: str | None = None,
        label: str | None = None,
        key: str | None = None,
    ) -> Columns:
        """`defaults` with the given comma-separated lists in place of its own.

        Raises:
            UsageError: an empty list or an empty name.
        """
        chosen = {}
        for name, value in (("image", image), ("caption", caption), ("label", label), ("key", key)):
            if value is None:
                chosen[name] = getattr(defaults, name)
                continue
            names = tuple(part.strip() for part in value.split(","))
            if not names or not all(names):
                raise UsageError(f"--{name}-col {value!r} is malformed; valid: NAME or NAME,NAME,... (alternatives)")
            chosen[name] = names
        return cls(**chosen)

    def describe(self) -> str:
        parts = [f"image={','.join(self.image)}", f"caption={','.join(self.caption)}"]
        parts += [f"label={','.join(self.label)}"] if self.label else []
        parts += [f"key={','.join(self.key)}"] if self.key else []
        return " ".join(parts)


def expand_shards(paths: Sequence[str | os.PathLike[str]], suffixes: Sequence[str], what: str) -> tuple[Path, ...]:
    """The shard files `paths` name: files, directories (their files ending in `suffixes`, sorted) and
    glob patterns (sorted matches), in the order given.

    Raises:
        UsageError: nothing given, a path or pattern that names no shard, or a file given twice.
    """
    if not paths:
        raise UsageError(f"no source given; pass {what} files, directories of them, or glob patterns")
    files: list[Path] = []
    for entry in paths:
        text = str(entry)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))
            if not found:
                raise UsageError(f"directory {path} holds no {what} ({', '.join('*' + s for s in suffixes)})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text)) if Path(p).is_file())
            if not found:
                raise UsageError(f"pattern {text!r} matches no file")
        else:
            raise UsageError(f"{what} {path} does not exist")
        files.extend(found)
    resolved: dict[Path, Path] = {}
    for file in files:
        first = resolved.setdefault(file.resolve(), file)
        if first is not file:
            raise UsageError(f"{what} {file} is given twice (also as {first})")
    return tuple(files)


def key_prefixes(files: Sequence[Path], mode: str, suffixes: Sequence[str]) -> dict[Path, str]:
    """Each shard's key prefix under `mode` (see `KEY_PREFIXES`); empty strings for `none`.

    Raises:
        UsageError: an unknown mode.
    """
    if mode not in KEY_PREFIXES:
        raise UsageError(f"unknown key prefix {mode!r}; valid: {', '.join(KEY_PREFIXES)}")
    if mode == "none":
        return dict.fromkeys(files, "")
    absolute = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    prefixes = {}
    for file, full in zip(files, absolute, strict=True):
        relative = full.relative_to(root).as_posix()
        suffix = next((s for s in suffixes if relative.endswith(s)), "")
        prefixes[file] = relative[: len(relative) - len(suffix)] + "/"
    seen: dict[str, Path] = {}
    for file, prefix in prefixes.items():
        if seen.setdefault(prefix, file) is not file:
            raise UsageError(f"{seen[prefix]} and {file} would give their keys the same prefix {prefix!r}")
    return prefixes


def describe_shards(kind: str, files: Sequence[Path], columns: Columns, key_prefix: str) -> str:
    """One line naming what a source reads (logs, the report, and the resume check's identity)."""
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    return f"{kind} {files[0].resolve()}{more} ({columns.describe()}, key prefix {key_prefix})"
