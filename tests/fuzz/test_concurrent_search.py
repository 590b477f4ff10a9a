"""Two searches on one study at once (SQLite and journal storage): every finished trial is
kept, the study stops at its target, and the storage file stays sound.

What happens (README, "Measured search"): the second search joins with ``--resume``; both
ask the shared study for trials, so each trial is evaluated by one of them, and each stops
when the study holds ``--trials`` finished trials (counted from the storage, so together they
overshoot by at most the trials in flight, one per search here). The run directory's files
are written atomically: the last search to finish writes them, from the whole study.

The two searches run in two threads of this process (separate models, separate storage
connections, so SQLite's and the journal's file locks are really contended), which costs
seconds where two fresh Python processes would cost a minute of imports; the killed-process
cases are covered in tests/search/test_search.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading

import optuna
import pytest

import bitalloc.search.run as search_run
from bitalloc.search import open_storage

from ..search.driver import run

TRIALS = 10


def _study(storage: str):
    return optuna.load_study(study_name="bitalloc", storage=open_storage(storage, create=False))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_searches_share_one_study(tmp_path, isolated_cache, monkeypatch, kind):
    if kind == "sqlite":
        storage = f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        storage = f"journal:{tmp_path / 'shared.log'}"
    told: dict[str, list[int]] = {"first": [], "second": []}
    second_told = threading.Event()
    first_started = threading.Event()
    tell = search_run._tell

    def tracked_tell(st, trial, *args, **kwargs):
        # Interleave for sure: the first search pauses after two trials until the second has
        # finished one, so both are working on the study at the same time.
        name = threading.current_thread().name
        if not tell(st, trial, *args, **kwargs):
            return False  # both popped one queued trial; the other search told it first
        told[name].append(trial.number)
        if name == "second":
            second_told.set()
        elif len(told["first"]) == 2:
            first_started.set()
            second_told.wait(timeout=120)
        return True

    monkeypatch.setattr(search_run, "_tell", tracked_tell)
    results: dict[str, object] = {}

    def go(name: str, **kw) -> None:
        try:
            results[name] = run(tmp_path / "run", TRIALS, storage=storage, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            results[name] = exc
            first_started.set()

    first = threading.Thread(target=go, args=("first",), name="first")
    first.start()
    assert first_started.wait(timeout=300)
    second = threading.Thread(target=go, args=("second",), kwargs={"resume": True}, name="second")
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)
    assert not first.is_alive() and not second.is_alive()
    for name, result in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result!r}"

    study = _study(storage)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    numbers = {t.number for t in done}
    # Every trial either search finished is in the study, told once, and nothing else is.
    assert told["first"] and told["second"]
    assert not set(told["first"]) & set(told["second"])
    assert numbers == set(told["first"]) | set(told["second"])
    # Each stopped at the study's target: one trial in flight in the other may overshoot it.
    assert TRIALS <= len(done) <= TRIALS + 1
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.get_trials()}
    for t in done:
        assert len(t.values) == 2 and t.user_attrs["formats"] == t.params
    # The search that finished last saw the whole study.
    assert max(r.trials_completed for r in results.values()) == len(done)
    # The files are sound: SQLite passes its integrity check; every journal line is JSON.
    if kind == "sqlite":
        with sqlite3.connect(tmp_path / "shared.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    else:
        lines = (tmp_path / "shared.log").read_text().splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    summary = json.loads((tmp_path / "run" / "search.json").read_text())
    assert summary["status"] == "finished" and summary["trials_completed"] >= TRIALS
