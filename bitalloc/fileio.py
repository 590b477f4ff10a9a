"""Atomic, durable file writes and checked JSON reads, shared by every layer (imports nothing
above it).

Writes go to a temporary file beside the target, which is flushed and fsynced, renamed into
place, and then the directory is fsynced: an interrupted write never leaves a half-written file
where a finished one is expected, and a file reported written survives a power loss.

Temporary names are ``.{name}.{pid}.{random}.tmp``. A writer killed with ``kill -9`` cannot
remove its temporary, so every write first removes the temporaries of the same target whose
writer process is gone; a temporary of a live process is never touched. Two processes writing
the same target at once each rename a complete file of their own: the last rename wins, whole.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from bitalloc.errors import BitallocError

Schema = TypeVar("Schema", bound=BaseModel)

#: Temporaries named by an earlier version (no PID in the name) are removed once this old:
#: nothing writes one file for an hour, so such a temporary was left by a killed writer.
LEGACY_TEMP_AGE_S = 3600.0

#: fsync of a directory fails with these on file systems that do not support it; the rename
#: is then as durable as that file system makes it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _temp_pattern(name: str) -> re.Pattern[str]:
    # mkstemp's random part is 8 characters of [a-z0-9_]; excluding dots keeps the pattern from
    # matching the temporaries of another target whose name starts with this one's.
    return re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but belongs to someone else (or cannot be asked): keep its file
    return True


def sweep_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed; returns them.

    A temporary whose writer process no longer exists is stale. One named by an earlier version
    (without a PID) is stale once older than :data:`LEGACY_TEMP_AGE_S`.
    """
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid = match.group(1)
        try:
            if pid is not None:
                stale = not _process_alive(int(pid))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > LEGACY_TEMP_AGE_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue  # its writer just renamed or removed it
        except OSError:
            continue  # cannot remove it: leave it; the write itself does not depend on it
    return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        return  # a write-only directory cannot be opened to sync; nothing more can be done
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary binary file beside ``path``, fsync it, rename it to
    ``path`` and fsync the directory. An error leaves ``path`` as it was; an operating-system
    error (disk full, no permission, ``path`` is a directory) raises :class:`BitallocError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; a finished file gets the usual 0644 (or keeps the old mode).
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    return path


def _write_error(path: Path, exc: OSError) -> BitallocError:
    reason = exc.strerror or str(exc)
    return BitallocError(f"cannot write {path}: {reason}; choose a path you can write")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (no NaN/inf) atomically."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (the files hold finite numbers only)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} overflows a 64-bit float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would keep the last of two equal keys: which one the writer meant is unknown.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_json(text: str | bytes, where: str) -> Any:
    """Parse JSON text strictly: NaN, Infinity, numbers that overflow a float and a key given
    twice in one object are refused, and anything malformed (bad syntax, bad UTF-8, nesting too
    deep to parse, a number too long) raises :class:`BitallocError` naming ``where``."""
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise BitallocError(
            f"{where} is not valid JSON: nested too deeply to be a file this project wrote"
        ) from None
    except MemoryError:
        raise BitallocError(f"{where} is not valid JSON: too large to parse") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, ours
        message = str(exc).splitlines()[0][:200]
        raise BitallocError(f"{where} is not valid JSON: {message}") from None


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Load a JSON file strictly (see :func:`parse_json`); a missing or unreadable file raises
    :class:`BitallocError`. The caller checks the top-level type (or uses
    :func:`read_json_object`)."""
    path = Path(path)
    if not path.is_file():
        raise BitallocError(f"{what} file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BitallocError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    return parse_json(data, f"{what} file {path}")


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """:func:`read_json`, refusing a file whose top level is not a JSON object."""
    raw = read_json(path, what)
    if not isinstance(raw, dict):
        raise BitallocError(
            f"{what} file {path} holds a JSON {_json_type(raw)}, not an object; it is not "
            f"a {what} file"
        )
    return raw


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


#: The JSON files this project writes, each told apart by a format tag or by the fields only it
#: has together: (what it is, tag or required fields), first match wins.
_KINDS: tuple[tuple[str, str | frozenset[str]], ...] = (
    ("solver problem file", "bitalloc.problem"),
    ("packed model manifest", "bitalloc-packed"),
    ("RL policy description", "bitalloc-rl-policy"),
    ("allocation", frozenset({"units", "avg_bits", "total_bits", "budget"})),
    ("profile", frozenset({"units", "formats", "loss"})),
    ("set of interaction terms", frozenset({"pairs", "pair_increase", "single_increase"})),
    ("solver solution", frozenset({"choice", "objective", "status"})),
    ("measured search summary", frozenset({"storage", "study", "status"})),
    ("frontier", frozenset({"method", "points"})),
)


def file_kind(raw: Any) -> str | None:
    """What kind of bitalloc file the parsed JSON ``raw`` is (``"allocation"``, ``"profile"``,
    ``"solver problem file"``, ...), or None when it looks like none of them."""
    if not isinstance(raw, dict):
        return None
    for kind, mark in _KINDS:
        if isinstance(mark, str) and raw.get("format") == mark:
            return kind
        if isinstance(mark, frozenset) and mark <= raw.keys():
            return kind
    return None


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiouAEIOU" else f"a {noun}"


def wrong_kind_error(path: str | os.PathLike[str], raw: Any, what: str) -> BitallocError | None:
    """The error for a bitalloc file of another kind given where a ``what`` file was expected
    ("alloc.json is an allocation, not a profile; ..."), or None when ``raw`` is of no known
    kind or of the expected one."""
    kind = file_kind(raw)
    if kind is None or kind == what:
        return None
    return BitallocError(
        f"{Path(path).name} is {_a(kind)}, not {_a(what)}; give the path of {_a(what)} file"
    )


def read_model(
    path: str | os.PathLike[str],
    schema: type[Schema],
    what: str,
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Schema:
    """Load a JSON file into the pydantic ``schema``; a missing file, bad JSON, a top level
    that is not an object, a file of another bitalloc kind or a schema violation becomes
    :class:`BitallocError` naming the first offending field.

    Values are validated strictly: a string where a number belongs, a fraction where a count
    belongs or a number where text belongs is refused, not converted. ``upgrade`` rewrites an
    older version's document before validation.
    """
    raw = read_json_object(path, what)
    if upgrade is not None:
        raw = upgrade(raw)  # an older version's document, in this version's terms
    try:
        # Strict JSON validation converts arrays to tuples but nothing else: ``"3"`` is not 3.
        return schema.model_validate_json(json.dumps(raw, allow_nan=False), strict=True)
    except ValidationError as exc:
        wrong = wrong_kind_error(path, raw, what)
        if wrong is not None:
            raise wrong from None
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BitallocError(
            f"{what} file {path} is malformed at {where or 'top level'}: {first['msg']}"
        ) from None


def decode_two_byte_values(text: str, what: str, kind: str) -> bytes:
    """``text`` decoded from base64, checked to hold a whole, non-zero number of two-byte
    values (``kind``: ``float16``, ``bfloat16``); :class:`BitallocError` naming ``what``
    otherwise. For the vectors records carry inside JSON."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BitallocError(f"{what} are not valid base64") from None
    if not raw or len(raw) % 2:
        raise BitallocError(
            f"{what} decode to {len(raw)} bytes, not a whole number of {kind} values"
        )
    return raw
