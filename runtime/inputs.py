"""Expand the paths named on a command line into one entry per input.

:func:`collect` turns each named path into :class:`Input` entries, so that every
input a user names, directly or through a folder, gets exactly one record
downstream: either a file to read (``reason is None``) or why it is skipped.

* A named file is read whatever its suffix; the reader decides.
* A named folder is searched recursively, in sorted order, without following
  symlinked folders. Its images (a PNG, JPEG, TIFF or DICOM suffix, or the
  DICOM preamble: 'DICM' at byte 128, as in extensionless PACS exports such as
  ``IM0001``) are read; every other member gets an entry with the reason it is
  skipped: not an image, not a regular file, a broken symlink, a symlink loop,
  a symlinked folder, an unreadable folder. A symlink to a file is read like
  the file. Hidden files and folders (names starting with '.') are skipped
  silently. A folder without any entry gets one itself ("folder holds no
  files").
* A glob pattern (``*``, ``?`` or ``[``; ``**`` matches any depth) stands for
  its matches, each taken as if named; one that matches nothing gets an entry.
* A path that does not exist gets an entry ("no such file or folder").

The same file reached twice (the same resolved path) is kept once, at its
first place, and so is the same skipped path with the same reason. This module
must not import torch.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from runtime.imageio import DICOM_MAGIC, SUPPORTED_SUFFIXES

GLOB_CHARS = "*?["
NOT_AN_IMAGE = "not an image (no PNG/JPEG/TIFF suffix and no DICOM preamble)"


@dataclass(frozen=True)
class Input:
    """One input: read ``path`` when ``reason`` is None, otherwise skip it for ``reason``."""

    path: Path
    reason: str | None = None


def _has_dicom_preamble(path: Path) -> bool:
    """Whether the regular file ``path`` holds 'DICM' at byte 128; raises OSError if it cannot be read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return False
        return f.read(132)[128:132] == DICOM_MAGIC


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file with the DICOM preamble ('DICM' at byte 128).

    Reads at most 132 bytes; a file that cannot be read is not DICOM.
    """
    try:
        return _has_dicom_preamble(Path(path))
    except OSError:
        return False


def _link_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken symlink"
    return f"cannot follow symlink ({exc.strerror or exc})"


def _member(path: Path) -> Input:
    """The entry for a non-folder member found in a searched folder."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except OSError as exc:
                return Input(path, _link_problem(exc))
            if stat.S_ISDIR(st.st_mode):
                return Input(path, "symlinked folder not followed")
        if not stat.S_ISREG(st.st_mode):
            return Input(path, "not a regular file")
        if path.suffix.lower() in SUPPORTED_SUFFIXES or _has_dicom_preamble(path):
            return Input(path)
    except OSError as exc:
        return Input(path, f"cannot read file ({exc.strerror or exc})")
    return Input(path, NOT_AN_IMAGE)


def _walk(top: Path) -> list[Input]:
    """Entries for everything under the folder ``top``, sorted by path."""
    entries: list[Input] = []

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else top
        entries.append(Input(where, f"cannot read folder ({exc.strerror or exc})"))

    for here, folders, files in os.walk(top, onerror=unreadable, followlinks=False):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        entries += [Input(Path(here, d), "symlinked folder not followed")
                    for d in folders if os.path.islink(os.path.join(here, d))]
        entries += [_member(Path(here, f)) for f in sorted(files) if not f.startswith(".")]
    if not entries:
        return [Input(top, "folder holds no files")]
    return sorted(entries, key=lambda e: e.path)


def _named(path: Path) -> list[Input]:
    """Entries for a path that exists (or is a symlink): a folder is searched, anything else read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            return [Input(path, _link_problem(exc))]
        return [Input(path, f"cannot read ({exc.strerror or exc})")]
    if stat.S_ISDIR(st.st_mode):
        return _walk(path)
    return [Input(path)]


def _expand(raw: str) -> list[Input]:
    path = Path(raw)
    if os.path.lexists(path):
        return _named(path)
    if any(c in raw for c in GLOB_CHARS):
        matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
        if not matches:
            return [Input(path, "pattern matches no files")]
        return [entry for m in matches for entry in _named(m)]
    return [Input(path, "no such file or folder")]


def _identity(entry: Input) -> tuple[str, str | None]:
    """A file to read is known by its resolved path; a skipped entry by its own path and reason."""
    if entry.reason is not None:
        return os.path.abspath(entry.path), entry.reason
    try:
        return os.path.realpath(entry.path), None
    except (OSError, ValueError):
        return os.path.abspath(entry.path), None


def collect(paths: list[str]) -> list[Input]:
    """One :class:`Input` per input named in ``paths`` (files, folders, glob patterns), in order.

    See the module docstring for the rules; the result is empty only when
    ``paths`` is.
    """
    entries: list[Input] = []
    seen: set[tuple[str, str | None]] = set()
    for raw in paths:
        for entry in _expand(str(raw)):
            key = _identity(entry)
            if key not in seen:
                seen.add(key)
                entries.append(entry)
    return entries
