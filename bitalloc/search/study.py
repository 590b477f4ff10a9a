"""The Optuna study of a search: created once, checked on every resume, read by reports.

A bitalloc study minimises two objectives, ``avg_bits`` and ``perplexity`` (their metric
names, so optuna-dashboard shows them), and records in its user attributes what it searched
(``"bitalloc"``: model fingerprint, palette, budget, evaluation windows, search space, units)
and the uniform baselines measured on the same windows. Each trial records its per-unit
formats, loss, KL, predicted loss, where it came from (``source``) and the process that ran it
(``owner``), so that a later ``--resume`` can tell a trial abandoned by a killed process from
one that another process is still evaluating.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from bitalloc.errors import BitallocError

STUDY_VERSION = 1
METRIC_NAMES = ("avg_bits", "perplexity")
#: The study attributes that must match for a resume to continue the same search.
IDENTITY_KEYS = ("model_fingerprint", "palette", "budget", "eval_tokens", "seq_len", "units")


def owner_tag() -> str:
    """``host:pid`` of this process (recorded on the trials it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(tag: str | None) -> bool | None:
    """Whether the process named by ``tag`` still runs; None when it ran on another host."""
    if not tag or ":" not in tag:
        return False
    host, _, pid = tag.rpartition(":")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid() or None


def create_study(storage: Any, name: str, sampler: Any, identity: Mapping[str, Any]) -> Any:
    """A new two-objective study named ``name``; fails if one of that name exists."""
    import optuna

    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            directions=["minimize", "minimize"],
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise BitallocError(
            f"a study named {name!r} already exists in this storage; continue it with --resume "
            "or choose another --study name (nothing was changed)"
        ) from None
    with warnings.catch_warnings():
        # Metric names are what optuna-dashboard shows; the API is stable in practice.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(METRIC_NAMES))
    study.set_user_attr("bitalloc", {"version": STUDY_VERSION, **identity})
    return study


def load_study(storage: Any, name: str, sampler: Any, identity: Mapping[str, Any]) -> Any:
    """The existing study ``name``, checked to be this search (same objectives, model, palette,
    budget, evaluation windows and units)."""
    import optuna

    try:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        raise BitallocError(
            f"--resume: no study named {name!r} in this storage (it holds "
            f"{names or 'no studies'}); drop --resume to start one"
        ) from None
    check_study(study, identity)
    check_trials(study, identity)
    return study


def check_stored(storage: Any, name: str) -> None:
    """Read everything stored for study ``name`` once (attributes and every trial), so that a
    damaged file fails before a resumed search starts its expensive work. Wrap the call in
    :func:`bitalloc.search.storage.readable` to turn driver errors into :class:`BitallocError`.
    """
    study_id = storage.get_study_id_from_name(name)
    storage.get_study_user_attrs(study_id)
    storage.get_study_system_attrs(study_id)
    storage.get_study_directions(study_id)
    storage.get_all_trials(study_id, deepcopy=False)


def _damaged(study: Any, what: str) -> BitallocError:
    return BitallocError(
        f"study {study.study_name!r}: {what}; the storage was changed outside `bitalloc search` "
        "or is damaged: restore it, or start another --study"
    )


def check_trials(study: Any, identity: Mapping[str, Any]) -> None:
    """Raise :class:`BitallocError` unless every finished trial and the stored baselines are
    what a resumed search reads: per-unit formats from the palette for exactly the study's
    units, two finite objective values, and numeric baseline perplexities."""
    import optuna

    units = set(identity.get("units") or ())
    palette = set(identity.get("palette") or ())
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        formats = trial.user_attrs.get("formats")
        if (
            not isinstance(formats, dict)
            or set(formats) != units
            or not all(isinstance(f, str) and f in palette for f in formats.values())
        ):
            raise _damaged(study, f"trial {trial.number} holds no valid per-unit formats")
        values = trial.values
        if values is None or len(values) != 2 or not all(_finite(v) for v in values):
            raise _damaged(study, f"trial {trial.number} holds no two finite objective values")
    attrs = study.user_attrs
    if "fp16_perplexity" in attrs and not _finite(attrs["fp16_perplexity"]):
        raise _damaged(study, "the unquantized perplexity is not a number")
    uniform = attrs.get("uniform", {})
    if not isinstance(uniform, dict) or not all(
        isinstance(v, dict) and _finite(v.get("avg_bits")) and _finite(v.get("perplexity"))
        for v in uniform.values()
    ):
        raise _damaged(study, "the uniform baselines are malformed")


def stored_space(study: Any, default: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The per-unit search space the study was started with (``default`` when it recorded
    none), checked to cover the same units with palette formats."""
    space = study.user_attrs.get("space_choices")
    if space is None:
        return dict(default)
    palette = {f for options in default.values() for f in options}
    stored = study.user_attrs.get("bitalloc", {}).get("palette", [])
    palette |= set(stored) if isinstance(stored, list) else set()
    if (
        not isinstance(space, dict)
        or set(space) != set(default)
        or not all(
            isinstance(v, list) and v and all(isinstance(f, str) and f in palette for f in v)
            for v in space.values()
        )
    ):
        raise _damaged(study, "the recorded search space is malformed")
    return space


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_study(study: Any, identity: Mapping[str, Any]) -> None:
    """Raise :class:`BitallocError` unless ``study`` is a bitalloc search matching ``identity``."""
    import optuna

    minimize = optuna.study.StudyDirection.MINIMIZE
    if list(study.directions) != [minimize, minimize] or list(study.metric_names or []) != list(
        METRIC_NAMES
    ):
        raise BitallocError(
            f"study {study.study_name!r} has other objectives ({study.metric_names or 'unnamed'}, "
            f"{[d.name.lower() for d in study.directions]}), not minimise {list(METRIC_NAMES)}; "
            "choose another --study name"
        )
    stored = study.user_attrs.get("bitalloc")
    if not isinstance(stored, dict):
        raise BitallocError(
            f"study {study.study_name!r} was not made by `bitalloc search`; choose another "
            "--study name"
        )
    for key in IDENTITY_KEYS:
        if stored.get(key) != _jsonable(identity.get(key)):
            raise BitallocError(
                f"study {study.study_name!r} searched another {key.replace('_', ' ')} "
                f"({_short(stored.get(key))} != {_short(identity.get(key))}); resume it with the "
                "same model, formats, budget and evaluation options, or start another --study"
            )


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recover_abandoned(study: Any) -> list[int]:
    """Fail the RUNNING trials whose process is gone (a killed search) and queue their
    parameters again, so that ``--resume`` evaluates them; returns their numbers.

    Trials owned by a live process, or by a process on another host, are left alone.
    """
    import optuna

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _owner_alive(trial.user_attrs.get("owner")) is not False:
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(
                dict(trial.params),
                user_attrs={
                    "source": trial.user_attrs.get("source", "sampler"),
                    "retry_of": trial.number,
                },
            )
        recovered.append(trial.number)
    return recovered


def completed(study: Any) -> list[Any]:
    """The study's finished trials (state COMPLETE)."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both objectives minimised), ordered by
    the first objective; equal points keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def best_within(trials: Sequence[Any], budget: float) -> Any | None:
    """The finished trial of lowest perplexity whose average bits meet ``budget``."""
    feasible = [t for t in trials if t.values[0] <= budget + 1e-9]
    return min(feasible, key=lambda t: (t.values[1], t.values[0], t.number), default=None)
