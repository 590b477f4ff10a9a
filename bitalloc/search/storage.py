"""Where searches are stored: Optuna storages named by one string, opened with clear errors.

A storage string is one of:

- an Optuna RDB URL (``sqlite:///path/study.db``, ``postgresql://...``, ``mysql://...``):
  every finished trial is committed as it is told, so a killed search loses none. A SQLite
  file is switched to write-ahead logging (see :func:`_fast_sqlite`): a trial writes one row
  per unit, and SQLite's default journal syncs the disk on every one of those commits;
- ``journal:PATH``: Optuna's journal file (append-only, file-locked), for clusters whose
  workers share a file system but no database server.

By default a search keeps its study in SQLite inside its run directory
(:func:`default_storage_url`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitalloc.errors import BitallocError

JOURNAL_PREFIX = "journal:"
_ATTEMPTS = 3
#: The files of a search's run directory (``runs/<study>`` by default): the default SQLite
#: study, the summary naming the storage and study, the profile, the measured seeds as a
#: frontier, and the best allocation within the budget.
STUDY_DB = "study.db"
SEARCH_FILE = "search.json"
PROFILE_FILE = "profile.safetensors"
FRONTIER_FILE = "frontier.json"
BEST_FILE = "best.json"
DEFAULT_STUDY = "bitalloc"


def default_run_dir(study_name: str = DEFAULT_STUDY) -> Path:
    """``runs/<study name>`` under the current directory."""
    return Path("runs") / study_name


def default_storage_url(run_dir: str | Path) -> str:
    """The SQLite URL of the study file in ``run_dir``."""
    return f"sqlite:///{Path(run_dir).resolve() / STUDY_DB}"


def open_storage(url: str, *, create: bool = True) -> Any:
    """An Optuna storage object for ``url`` (see the module docstring).

    With ``create=False`` a local file (SQLite database or journal) must already exist, so
    that reading a study never creates an empty one. Any failure to open the storage (bad URL,
    missing driver, unwritable directory, a file that is not a database) raises
    :class:`BitallocError` naming the URL.
    """
    import optuna

    if not isinstance(url, str) or not url.strip():
        raise BitallocError("give a storage URL, e.g. sqlite:///runs/study.db or journal:FILE")
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :]).expanduser()
        if not path.name:
            raise BitallocError(f"storage {url!r}: give a journal file, e.g. journal:runs/j.log")
        _check_local_file(url, path, create)
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:  # noqa: BLE001 - any backend failure is the URL's fault here
            raise BitallocError(f"cannot open journal storage {url!r}: {exc}") from None
    if "://" not in url:
        raise BitallocError(
            f"storage {url!r} is neither an RDB URL (sqlite:///FILE, postgresql://...) nor "
            "journal:FILE"
        )
    sqlite_path = None
    if url.startswith("sqlite:///"):
        sqlite_path = Path(url[len("sqlite:///") :]).expanduser()
        _check_local_file(url, sqlite_path, create)
    for attempt in range(_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(url)
            if sqlite_path is not None:
                _fast_sqlite(storage, sqlite_path)
            return storage
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy, drivers and schema checks vary
            # Two processes opening a new database at once (a search and its dashboard) race
            # to create the schema; the loser sees "table already exists" and succeeds on retry.
            if attempt + 1 < _ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BitallocError(f"cannot open storage {url!r}: {first}") from None
    raise AssertionError("unreachable")


def _fast_sqlite(storage: Any, path: Path) -> None:
    """Write-ahead logging with ``synchronous=NORMAL`` for a SQLite study.

    Optuna stores every suggested parameter in its own transaction, so a trial over the 210
    units of the default model is hundreds of commits; in SQLite's default rollback-journal
    mode each one waits for the disk, which made suggesting a trial take seconds (6x faster in
    WAL mode here). A commit in WAL mode is still on disk when it returns as far as any other
    process or a killed search is concerned; only a power loss or an operating-system crash can
    lose the last commits, never corrupt the file. WAL needs the readers on the same machine
    (shared memory beside the file), true of the local run directories SQLite is meant for;
    searches spread over machines use ``journal:FILE`` or a database server. A file that
    cannot be switched (read-only, another process mid-write) is used as it is.
    """
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as connection:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()
    except sqlite3.Error:
        return
    if mode and str(mode[0]).lower() == "wal":
        event.listen(storage.engine, "connect", pragmas)
        # Connections opened while Optuna created or checked the schema lack the pragma.
        storage.engine.dispose()


def close_storage(storage: Any) -> None:
    """Fold a SQLite study's write-ahead log back into its file and close its connections, so
    that the study file alone holds every trial once a search is done (a run directory copied
    file by file, or a study file mailed on its own, is then complete). Other storages are left
    as they are; a study interrupted before this keeps its log beside the file, which SQLite
    replays when the study is next opened."""
    engine = getattr(storage, "engine", None)
    if engine is None or engine.name != "sqlite":
        return
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception:  # noqa: BLE001 - a busy reader only delays the fold; nothing is lost
        pass
    engine.dispose()


def _check_local_file(url: str, path: Path, create: bool) -> None:
    if path.exists() and not path.is_file():
        raise BitallocError(f"storage {url!r}: {path} is not a file")
    if not path.exists():
        if not create:
            raise BitallocError(
                f"storage {url!r}: {path} does not exist (no search has been stored there); "
                "check the path or run `bitalloc search` first"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BitallocError(f"storage {url!r}: cannot create {path.parent}: {exc}") from None


def study_names(storage: Any, url: str | None = None) -> list[str]:
    """Names of the studies held by an opened storage (``url`` names it in errors).

    A damaged file (a SQLite page or a journal line that no longer parses) raises
    :class:`BitallocError` rather than the driver's own exception.
    """
    with readable(url or "the storage"):
        return [s.study_name for s in storage.get_all_studies()]


@contextmanager
def readable(url: str) -> Iterator[None]:
    """Turn any failure to read a storage's contents into :class:`BitallocError`.

    SQLAlchemy, SQLite, the journal's JSON lines and Optuna's own decoding of stored
    attributes all raise their own types when a file is damaged; none of them is the user's
    fix to guess, so they become one message naming the storage.
    """
    try:
        yield
    except BitallocError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring: the types vary by driver
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise BitallocError(
            f"cannot read storage {url!r} ({detail[:200]}); the file may be damaged: restore "
            "it from a copy or start a new study with another --storage or --run-dir"
        ) from None
