"""search(): a measured study on the tiny model, resumed, interrupted and killed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from bitalloc.allocation import Allocation
from bitalloc.errors import BitallocError
from bitalloc.search import METRIC_NAMES, default_storage_url, open_storage
from bitalloc.search.storage import close_storage
from bitalloc.search.study import pareto_front

from .driver import run

HELD_DRIVER = Path(__file__).with_name("held_driver.py")


def test_the_driver_keeps_the_tests_folder_off_the_import_path():
    # On the path, tests/kernels would shadow the installed `kernels` package, which
    # transformers imports when it is present: every model build then failed.
    tests_dir = Path(__file__).resolve().parents[1]
    assert all(Path(p).resolve() != tests_dir for p in sys.path if p)
    script = (
        "import runpy, sys; from pathlib import Path; "
        f"runpy.run_path({str(Path(__file__).with_name('driver.py'))!r}); "
        f"assert Path({str(tests_dir)!r}) not in [Path(p).resolve() for p in sys.path if p]"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tests_dir.parent)


def _study(run_dir: Path, name: str = "bitalloc"):
    return optuna.load_study(study_name=name, storage=default_storage_url(run_dir))


def _complete(study):
    return study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def test_search_stores_every_trial_and_reports_the_best(tmp_path, isolated_cache):
    result = run(tmp_path / "run", 10)
    study = _study(tmp_path / "run")
    done = _complete(study)
    assert len(done) == result.trials_completed == 10
    assert study.metric_names == list(METRIC_NAMES)
    # The study starts from the solvers' allocations (enqueued, so they are the first trials).
    sources = [t.user_attrs["source"] for t in done]
    assert sources[0].startswith("seed:lagrangian@")
    assert any(s == "sampler" for s in sources)
    units = study.user_attrs["bitalloc"]["units"]
    for t in done:
        assert sorted(t.user_attrs["formats"]) == sorted(units)
        assert t.params == t.user_attrs["formats"]
        assert t.values[1] == pytest.approx(math.exp(t.user_attrs["loss"]))
        assert t.user_attrs["kl"] >= 0
    # Objective 0 is the exact average bits of the trial's formats.
    best = Allocation.load(tmp_path / "run" / "best.json")
    assert best.avg_bits <= 4.5 + 1e-9
    twin = study.trials[result.best_trial]
    assert best.formats == twin.user_attrs["formats"]
    assert best.avg_bits == pytest.approx(twin.values[0])
    assert best.measured.perplexity == pytest.approx(twin.values[1])
    assert best.data.predicted_loss == pytest.approx(twin.user_attrs["predicted_loss"])
    feasible = [t.values[1] for t in done if t.values[0] <= 4.5 + 1e-9]
    assert best.measured.perplexity == min(feasible)
    # Baselines are measured on the same windows; the unquantized model has KL 0.
    assert set(result.uniform) >= {"int4-g128"}
    assert result.fp16_perplexity == pytest.approx(study.user_attrs["fp16_perplexity"])
    # The Pareto front is the non-dominated set of the finished trials.
    points = [tuple(t.values) for t in done]
    front = {(b, p) for _, b, p in result.pareto}
    for b, p in points:
        dominated = any(b2 <= b and p2 <= p and (b2, p2) != (b, p) for b2, p2 in points)
        assert ((b, p) in front) != dominated or (b, p) in front
    assert all(
        not any(b2 <= b and p2 < p or b2 < b and p2 <= p for b2, p2 in points) for b, p in front
    )
    summary = json.loads((tmp_path / "run" / "search.json").read_text())
    assert summary["status"] == "finished" and summary["trials_completed"] == 10
    frontier = json.loads((tmp_path / "run" / "frontier.json").read_text())
    assert all(p["perplexity"] is not None for p in frontier["points"])


def test_resume_continues_and_keeps_every_trial(tmp_path, isolated_cache):
    run(tmp_path / "run", 6)
    before = {t.number: t.values for t in _complete(_study(tmp_path / "run"))}
    result = run(tmp_path / "run", 9, resume=True)
    after = {t.number: t.values for t in _complete(_study(tmp_path / "run"))}
    assert len(after) == result.trials_completed == 9
    assert all(after[n] == v for n, v in before.items())
    # Baselines were measured once: the resumed run evaluated only the new trials.
    assert result.evaluations <= 3


@pytest.mark.parametrize("when", ["ask", "tell", "study-tell"])
def test_a_trial_another_search_finished_first_is_left_to_it(
    tmp_path, isolated_cache, monkeypatch, when
):
    # SQLite cannot lock a row, so two searches on one study can both pop the same queued
    # trial. Here a second connection finishes trial 2 just after this search asks for it, just
    # before this search stores its measurement, or between storing its attributes and telling
    # its values: the search keeps the other's result and goes on.
    import bitalloc.search.run as search_run

    url = default_storage_url(tmp_path / "run")
    stolen: list[int] = []
    ask, tell = optuna.Study.ask, search_run._tell

    def steal(number: int) -> None:
        other = optuna.load_study(study_name="bitalloc", storage=url)
        stolen.append(number)  # first: the other study's tell passes through the patch below
        other.tell(number, [9.0, 1e6])

    def racing_ask(self, *args, **kwargs):
        trial = ask(self, *args, **kwargs)
        if when == "ask" and trial.number == 2:
            steal(trial.number)
        return trial

    def racing_tell(st, trial, *args, **kwargs):
        if when == "tell" and trial.number == 2:
            steal(trial.number)
        return tell(st, trial, *args, **kwargs)

    study_tell = optuna.Study.tell

    def racing_study_tell(self, trial, *args, **kwargs):
        number = trial if isinstance(trial, int) else trial.number
        if when == "study-tell" and number == 2 and not stolen and args:
            steal(number)
        return study_tell(self, trial, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "tell", racing_study_tell)
    monkeypatch.setattr(optuna.Study, "ask", racing_ask)
    monkeypatch.setattr(search_run, "_tell", racing_tell)
    result = run(tmp_path / "run", 8)
    done = _complete(_study(tmp_path / "run"))
    assert stolen == [2]
    assert len(done) == result.trials_completed == 8
    # The other search's values stand; this search stored nothing on the trial.
    lost = next(t for t in done if t.number == 2)
    assert lost.values == [9.0, 1e6]
    if when != "study-tell":
        assert "loss" not in lost.user_attrs


def test_existing_study_needs_resume_and_resume_needs_a_study(tmp_path, isolated_cache):
    with pytest.raises(BitallocError, match="no search has been stored there"):
        run(tmp_path / "run", 3, resume=True)
    assert not (tmp_path / "run" / "study.db").exists()
    run(tmp_path / "run", 3)
    with pytest.raises(BitallocError, match="no study named 'other'.*bitalloc"):
        run(tmp_path / "run", 3, resume=True, study="other")
    stamp = (tmp_path / "run" / "study.db").stat().st_mtime_ns
    with pytest.raises(BitallocError, match="already exists.*--resume"):
        run(tmp_path / "run", 5)
    assert (tmp_path / "run" / "study.db").stat().st_mtime_ns == stamp


def test_resume_refuses_another_search(tmp_path, isolated_cache):
    run(tmp_path / "run", 3)
    with pytest.raises(BitallocError, match="another eval tokens"):
        run(tmp_path / "run", 5, resume=True, eval_tokens=128)
    assert len(_complete(_study(tmp_path / "run"))) == 3


def test_study_with_other_objectives_is_refused(tmp_path, isolated_cache):
    url = default_storage_url(tmp_path / "run")
    (tmp_path / "run").mkdir()
    optuna.create_study(study_name="other", storage=url, direction="maximize")
    with pytest.raises(BitallocError, match="other objectives"):
        run(tmp_path / "run", 3, resume=True, study="other")


def test_storage_that_cannot_be_opened(tmp_path, isolated_cache):
    with pytest.raises(BitallocError, match="neither an RDB URL"):
        run(tmp_path / "run", 3, storage="not a url")
    with pytest.raises(BitallocError, match="cannot open storage"):
        run(tmp_path / "run", 3, storage="nosuchdb://x/y")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(BitallocError, match="cannot open storage"):
        run(tmp_path / "run", 3, storage=f"sqlite:///{tmp_path / 'junk.db'}")
    with pytest.raises(BitallocError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'missing.db'}", create=False)


def test_sqlite_studies_use_write_ahead_logging(tmp_path):
    """A trial writes one row per unit; in rollback-journal mode each of those commits waits
    for the disk. The study file is switched to WAL, every connection syncs at NORMAL, and what
    one storage writes another process's storage reads at once."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_categorical("layers.0.mlp", ["int2-g64", "int4-g128"])
    study.tell(trial, 1.0)
    with sqlite3.connect(tmp_path / "study.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    again = optuna.load_study(study_name="s", storage=open_storage(url, create=False))
    assert [t.params for t in again.trials] == [trial.params]
    # Closed, the log is folded back: the study file alone holds every trial.
    close_storage(storage)
    wal = tmp_path / "study.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "study.db", tmp_path / "alone" / "study.db")
    alone = optuna.load_study(
        study_name="s", storage=open_storage(f"sqlite:///{tmp_path / 'alone' / 'study.db'}")
    )
    assert [t.params for t in alone.trials] == [trial.params]


def test_journal_storage(tmp_path, isolated_cache):
    url = f"journal:{tmp_path / 'search.log'}"
    result = run(tmp_path / "run", 4, storage=url)
    assert result.storage == url and result.trials_completed == 4
    study = optuna.load_study(study_name="bitalloc", storage=open_storage(url, create=False))
    assert len(_complete(study)) == 4


def test_bad_arguments(tmp_path, isolated_cache):
    with pytest.raises(BitallocError, match="sampler"):
        run(tmp_path / "run", 3, sampler="cmaes")
    with pytest.raises(BitallocError, match="trials"):
        run(tmp_path / "run", 0)
    with pytest.raises(BitallocError, match="search space"):
        run(tmp_path / "run", 3, space="wide")


def test_pareto_front_matches_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        front = pareto_front(points)
        expected = {
            p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)
        }
        assert {points[i] for i in front} == expected
        assert len(front) == len(expected)


def _start(tmp_path, trials: int, hold_after: int, marker: Path):
    """The search in its own process, held in the evaluation after ``hold_after`` trials."""
    env = {**os.environ, "BITALLOC_CACHE_DIR": str(tmp_path / "cache")}
    args = [str(tmp_path / "run"), str(trials), str(hold_after), str(marker)]
    return subprocess.Popen(
        [sys.executable, str(HELD_DRIVER), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_hold(proc, marker: Path, timeout: float = 600.0) -> None:
    """Until the search is held in an evaluation (a deadline for a badly overloaded machine:
    the wait ends as soon as the marker appears)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the search exited ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("the search did not reach its held evaluation in time")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_killed_search_resumes_without_losing_a_trial(tmp_path, isolated_cache, how):
    # The search is held inside the evaluation of the trial after the third (see
    # held_driver.py), so the signal surely lands while a trial is being evaluated.
    marker = tmp_path / "held"
    state = optuna.trial.TrialState
    proc = _start(tmp_path, 100, 3, marker)
    try:
        _wait_for_hold(proc, marker)
        held = _study(tmp_path / "run").get_trials()
        assert sum(t.state == state.COMPLETE for t in held) >= 3
        assert [t.state for t in held].count(state.RUNNING) == 1
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    trials = _study(tmp_path / "run").get_trials()
    done = {t.number: t.values for t in trials if t.state == state.COMPLETE}
    running = [t.number for t in trials if t.state == state.RUNNING]
    if how == "kill":
        assert running, "kill -9 during an evaluation leaves its trial RUNNING"
    else:
        # Ctrl-C fails the trial in flight and queues its parameters again.
        assert not running and proc.returncode != 0
        failed = [t for t in trials if t.state == state.FAIL]
        assert failed and any(t.state == state.WAITING for t in trials)
    result = run(tmp_path / "run", len(done) + 3, resume=True)
    trials = _study(tmp_path / "run").get_trials()
    after = {t.number: t.values for t in trials if t.state == state.COMPLETE}
    assert all(after[n] == v for n, v in done.items()), "a finished trial changed or was lost"
    assert len(after) == result.trials_completed == len(done) + 3
    assert not [t for t in trials if t.state == state.RUNNING]
    assert sorted(result.recovered) == sorted(running)
    # An abandoned trial's parameters are queued again (evaluated in queue order, after the
    # seeds still waiting).
    again = {
        t.user_attrs.get("retry_of"): t.params or t.system_attrs.get("fixed_params")
        for t in trials
        if t.state in (state.COMPLETE, state.WAITING)
    }
    units = _study(tmp_path / "run").user_attrs["bitalloc"]["units"]
    for t in trials:
        if t.state == state.FAIL and len(t.params) == len(units):
            assert again[t.number] == t.params
