"""search() on Ray workers: the same measurements as in process, and a killed worker costs
no trial."""

from __future__ import annotations

import math
import threading
import time

import optuna
import pytest

from bitalloc.allocator import measure_assignment, prepare
from bitalloc.jobs import ACTOR_PREFIX
from bitalloc.search import default_storage_url, open_storage
from tests.conftest import TEXT, ByteTokenizer, make_tiny_llama

from .driver import FORMATS, run

#: Evaluation tokens per trial (eight 64-token windows), and the wait before each evaluation on
#: a worker (see ``paced_evaluations``).
EVAL_TOKENS = 512
PACE_S = 0.5


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_search_on_ray_survives_a_killed_worker(tmp_path, isolated_cache):
    ray = pytest.importorskip("ray")
    url = default_storage_url(tmp_path / "run")

    def paced_evaluations():
        # Run by Ray in every worker process it starts (pickled by value: a local function).
        # Each evaluation waits PACE_S first, so the search outlasts the poll below by seconds
        # however fast or loaded the machine is, at no CPU cost; the scores are unchanged.
        import bitalloc.jobs

        evaluate = bitalloc.jobs.JobEvaluator.run

        def paced(self, job):
            time.sleep(PACE_S)
            return evaluate(self, job)

        bitalloc.jobs.JobEvaluator.run = paced

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": paced_evaluations},
    )
    try:
        out = {}

        def work():
            out["result"] = run(tmp_path / "run", 12, workers=2, eval_tokens=EVAL_TOKENS)

        thread = threading.Thread(target=work)
        thread.start()
        deadline = time.monotonic() + 600  # the loop ends at the kill: generous under load
        killed = False
        while not killed and time.monotonic() < deadline and thread.is_alive():
            done = 0
            if (tmp_path / "run" / "study.db").exists():
                try:
                    study = optuna.load_study(study_name="bitalloc", storage=open_storage(url))
                    done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
                except KeyError:  # the study is not created yet
                    pass
            victims = [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
            # Nine trials or more are still to come: over 2 s of pacing on the two workers.
            if done >= 3 and victims:
                ray.kill(ray.get_actor(victims[0]))
                killed = True
            time.sleep(0.05)
        thread.join(timeout=600)
        assert killed and not thread.is_alive()
    finally:
        ray.shutdown()
    result = out["result"]
    study = optuna.load_study(study_name="bitalloc", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == result.trials_completed == 12
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # The workers measured what this process measures for the same allocation.
    prep = prepare(
        make_tiny_llama(),
        formats=FORMATS,
        calibration=tmp_path / "cal.txt",
        evaluation=tmp_path / "eval.txt",
        tokenizer=ByteTokenizer(),
        seq_len=64,
    )
    assert (tmp_path / "eval.txt").read_text() == TEXT[::-1] * 4
    ev = prep.evaluation_windows(EVAL_TOKENS)
    for trial in trials[:3]:
        local = measure_assignment(prep, trial.user_attrs["formats"], ev)
        assert trial.values[1] == pytest.approx(local.perplexity, rel=1e-5)
        assert math.log(trial.values[1]) == pytest.approx(trial.user_attrs["loss"], rel=1e-9)
