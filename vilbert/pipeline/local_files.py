"""Image files named by a dataset listing, read only if they are what they claim, where they claim.

A listing (Hateful Memes jsonl, a folder's TSV/JSONL) comes from a stranger's archive, so a path in
it is hostile until checked: `../secret.png`, `/etc/shadow`, a symlink under `img/` pointing out of
the dataset, `/dev/zero` (endless bytes), a FIFO (a read that never returns), a directory, a file
of many gigabytes. `LocalFile.read` checks at the moment of reading, in the process that reads:

1. the path, symlinks resolved, lies inside the dataset root (else `outside-root`);
2. it is a regular file (else `not-a-file`; FIFOs, devices and directories are never opened);
3. its size is at most `max_bytes` (else `too-large`, before a byte is read);

then opens it without following a symlink that appeared since, without blocking, checks that the
opened file is the one examined, and reads at most `max_bytes`. Failures raise `LocalFileError`
with one of those reasons (or `missing-image`, `unreadable-image`); preprocess counts them as skips.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vilbert.errors import DataError

__all__ = ["DEFAULT_MAX_FILE_BYTES", "LOCAL_FILE_REASONS", "LocalFile", "LocalFileError"]

DEFAULT_MAX_FILE_BYTES = 64 << 20
"""No image a model sees needs more: a 24 MP photo is a few MB as JPEG, ~70 MB as a raw TIFF."""
LOCAL_FILE_REASONS = ("outside-root", "not-a-file", "too-large", "missing-image", "unreadable-image")

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class LocalFileError(DataError):
    """A listed file that is not read; `.reason` is one of `LOCAL_FILE_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file a listing names, relative to the dataset root (small: sent to decode workers as is).

    Attributes:
        root: The dataset root, resolved (`Path.resolve()`).
        name: The path as the listing gives it.
        max_bytes: Larger files are refused before reading.
        where: `FILE:LINE` of the listing entry, for messages.
    """

    root: Path
    name: str
    max_bytes: int = DEFAULT_MAX_FILE_BYTES
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.name}" if self.where else self.name

    def read(self) -> bytes:
        """The file's bytes, after the checks of the module docstring.

        Raises:
            LocalFileError: `outside-root`, `not-a-file`, `too-large`, `missing-image` or `unreadable-image`.
        """
        path = self._confined_path()
        try:
            before = os.stat(path)
            self._check_kind_and_size(path, before)
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise LocalFileError("missing-image", f"{self}: no such file") from None
        except OSError as err:
            raise LocalFileError("unreadable-image", f"{self}: {err.strerror or err}") from err
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise LocalFileError("unreadable-image", f"{self}: the file changed while being opened")
            self._check_kind_and_size(path, opened)
            return self._read_at_most(fd)
        except OSError as err:
            raise LocalFileError("unreadable-image", f"{self}: {err.strerror or err}") from err
        finally:
            os.close(fd)

    def _confined_path(self) -> str:
        if "\x00" in self.name:
            raise LocalFileError("not-a-file", f"{self.where}: the image path contains a NUL byte")
        resolved = os.path.realpath(os.path.join(self.root, self.name))
        root = str(self.root)
        if resolved == root or os.path.commonpath([resolved, root]) != root:
            raise LocalFileError("outside-root", f"{self}: resolves to {resolved}, outside the dataset root {root}")
        return resolved

    def _check_kind_and_size(self, path: str, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise LocalFileError("not-a-file", f"{self}: {path} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > self.max_bytes:
            raise LocalFileError(
                "too-large", f"{self}: {info.st_size} bytes, above the cap of {self.max_bytes} (--max-image-bytes)"
            )

    def _read_at_most(self, fd: int) -> bytes:
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, self.max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_bytes:  # it grew since fstat
                raise LocalFileError("too-large", f"{self}: more than the cap of {self.max_bytes} bytes")
        return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"
