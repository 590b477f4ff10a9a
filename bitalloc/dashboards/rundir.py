"""Finding a search's outputs: the files of a run directory and its Optuna study.

Everything here only reads: storages are opened with ``create=False`` so that a wrong path
gives an error instead of a new, empty study file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitalloc.dashboards.data import frontier_points
from bitalloc.errors import BitallocError
from bitalloc.fileio import read_json, read_json_object
from bitalloc.search.storage import (
    BEST_FILE,
    FRONTIER_FILE,
    PROFILE_FILE,
    SEARCH_FILE,
    STUDY_DB,
    default_run_dir,
    default_storage_url,
    open_storage,
    readable,
    study_names,
)

if TYPE_CHECKING:
    import optuna

#: Where ``bitalloc search`` writes by default (``runs/<study name>``, study ``bitalloc``).
DEFAULT_RUN_DIR = default_run_dir()


def pick_study_name(url: str, names: list[str], study_name: str | None) -> str:
    """``study_name`` checked against the storage's studies, or its only study."""
    if not names:
        raise BitallocError(
            f"storage {url!r} holds no study; run `bitalloc search` first or check --storage"
        )
    if study_name is None:
        if len(names) == 1:
            return names[0]
        raise BitallocError(
            f"storage {url!r} holds {len(names)} studies ({', '.join(sorted(names))}); "
            "choose one with --study NAME"
        )
    if study_name not in names:
        raise BitallocError(
            f"storage {url!r} has no study {study_name!r}; it holds "
            f"{', '.join(sorted(names))}: pass one of them with --study"
        )
    return study_name


def load_study(storage_url: str, study_name: str | None = None) -> optuna.Study:
    """The study ``study_name`` (default: the only one) of an existing storage."""
    import optuna

    from bitalloc.search.study import check_stored

    storage = open_storage(storage_url, create=False)
    name = pick_study_name(storage_url, study_names(storage, storage_url), study_name)
    with readable(storage_url):
        study = optuna.load_study(study_name=name, storage=storage)
        # Everything is read once here, so that a damaged file fails with one message now
        # rather than in the middle of drawing a report.
        check_stored(storage, name)
    return study


def study_location(
    run_dir: str | Path, *, storage: str | None = None, study_name: str | None = None
) -> tuple[str, str | None] | None:
    """(storage URL, study name or None for "the only one") of a run directory's study.

    ``storage`` wins; else the run's ``search.json`` names the storage and study; else the
    default ``study.db`` in the directory. None when the run holds no study.
    """
    if storage:
        return storage, study_name
    run_dir = Path(run_dir)
    search = run_dir / SEARCH_FILE
    if search.is_file():
        meta = read_json_object(search, "measured search summary")
        url = meta.get("storage")
        if not isinstance(url, str) or not url:
            raise BitallocError(
                f"{search} names no storage; pass the search's storage with --storage URL"
            )
        named = meta.get("study")
        return url, study_name or (named if isinstance(named, str) and named else None)
    if (run_dir / STUDY_DB).is_file():
        return default_storage_url(run_dir), study_name
    return None


def load_frontier(path: str | Path) -> dict[str, Any]:
    """A frontier JSON file (``Frontier.to_json``), checked enough to plot."""
    raw = read_json(path, "frontier")
    if not isinstance(raw, dict):
        raise BitallocError(
            f"frontier file {path} is not a JSON object; pass the file written by "
            "`bitalloc frontier --out FILE`"
        )
    frontier_points(raw)
    return raw


def load_run(
    run_dir: str | Path, *, storage: str | None = None, study_name: str | None = None
) -> dict[str, Any]:
    """The report inputs found in a run directory: ``profile`` (profile.safetensors),
    ``allocation`` (best.json), ``frontier`` (frontier.json) and ``study`` (see
    :func:`study_location`); each key is present only when found.

    A missing directory, a storage that cannot be opened, or a storage with several studies
    and no ``study_name`` raises :class:`BitallocError` naming the fix.
    """
    from bitalloc.allocation import Allocation
    from bitalloc.sensitivity import Profile

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BitallocError(
            f"run directory {run_dir} does not exist; pass the --run-dir of a `bitalloc search` "
            "run (or give the inputs as files)"
        )
    inputs: dict[str, Any] = {}
    if (run_dir / PROFILE_FILE).is_file():
        inputs["profile"] = Profile.load(run_dir / PROFILE_FILE)
    if (run_dir / BEST_FILE).is_file():
        inputs["allocation"] = Allocation.load(run_dir / BEST_FILE)
    if (run_dir / FRONTIER_FILE).is_file():
        inputs["frontier"] = load_frontier(run_dir / FRONTIER_FILE)
    location = study_location(run_dir, storage=storage, study_name=study_name)
    if location is not None:
        inputs["study"] = load_study(*location)
    elif study_name is not None:
        raise BitallocError(
            f"--study {study_name!r}: {run_dir} holds no {SEARCH_FILE} or {STUDY_DB}; "
            "pass the search's storage with --storage URL"
        )
    return inputs
