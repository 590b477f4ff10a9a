"""Output paths checked before any work starts.

A command that profiles for an hour and then finds that ``--out`` names a directory, or a
folder it may not write, has wasted that hour. Every CLI command (and :func:`bitalloc.search`)
checks its output paths with these helpers first: the path has the expected kind (a file is
not an existing directory and the reverse), its nearest existing ancestor is a directory in
which a file can really be created, and an output directory holds nothing it would clobber.
Nothing is created by a check except a temporary probe file, removed at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from bitalloc.errors import BitallocError


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (the one a mkdir -p would start in)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(directory: Path, option: str, target: Path) -> None:
    """Create and remove a temporary file in ``directory``: permissions, read-only file
    systems and quotas all show up here, which ``os.access`` alone would miss (e.g. as root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".bitalloc-probe-", dir=directory)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BitallocError(
            f"{option} {target}: cannot write in {directory} ({reason}); choose a path in a "
            "directory you can write"
        ) from None
    os.close(fd)
    Path(name).unlink(missing_ok=True)


def _check_ancestors(path: Path, option: str) -> None:
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise BitallocError(
            f"{option} {path}: {base} is a file, so no directory can be created there; choose "
            "another path"
        )
    _probe_writable(base, option, path)


def check_output_file(
    path: str | os.PathLike[str] | None, option: str, *, example: str = "out.json"
) -> None:
    """Fail at once unless ``path`` can be written as a file (None: nothing to check).

    An existing file is fine (it is replaced atomically); an existing directory is not, nor a
    path under a file, nor a directory this process cannot write.
    """
    if path is None:
        return
    path = Path(path)
    if not path.name or path.is_dir():
        raise BitallocError(
            f"{option} {path} is a directory; give a file name inside it, such as {path / example}"
        )
    if path.exists() and not path.is_file():
        raise BitallocError(f"{option} {path} exists and is not a regular file; choose a file")
    _check_ancestors(path, option)


def check_output_dir(
    path: str | os.PathLike[str] | None,
    option: str,
    *,
    may_replace: Callable[[Path], bool] | None = None,
    must_be_empty: bool = True,
) -> None:
    """Fail at once unless ``path`` can be used as an output directory (None: nothing to check).

    With ``must_be_empty`` an existing directory must be empty, or hold what this command
    wrote before (``may_replace(directory)`` true), so that unrelated files are never mixed in
    or overwritten.
    """
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BitallocError(f"{option} {path} is a file; give a directory (new or empty)")
    if path.is_dir():
        if must_be_empty and any(path.iterdir()) and not (may_replace and may_replace(path)):
            raise BitallocError(
                f"{option} {path} is not empty; choose a new or empty directory (nothing was "
                "written)"
            )
        _probe_writable(path, option, path)
        return
    _check_ancestors(path, option)
