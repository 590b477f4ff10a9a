"""Atomic file writes and checked JSON reads, shared by every layer (imports nothing above it).

Files are written to a temporary file beside the target and renamed into place, so an
interrupted write never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from bitalloc.errors import BitallocError

Schema = TypeVar("Schema", bound=BaseModel)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary binary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        # mkstemp creates 0600; a finished file gets the usual 0644 (or keeps the old mode).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (no NaN/inf) atomically."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Load a JSON file, turning missing files and syntax errors into :class:`BitallocError`."""
    path = Path(path)
    if not path.is_file():
        raise BitallocError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitallocError(f"{what} file {path} is not valid JSON: {exc}") from None


def read_model(path: str | os.PathLike[str], schema: type[Schema], what: str) -> Schema:
    """Load a JSON file into the pydantic ``schema``; a missing file, bad JSON or a schema
    violation becomes :class:`BitallocError` naming the first offending field."""
    raw = read_json(path, what)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BitallocError(
            f"{what} file {path} is malformed at {where or 'top level'}: {first['msg']}"
        ) from None
