"""driver.py's search in a separate process, held inside a trial's evaluation so that a test can
kill or interrupt it there (tests/search/test_search.py).

Usage: python held_driver.py RUN_DIR TRIALS HOLD_AFTER MARKER. Once HOLD_AFTER trials have been
told to the study, the next evaluation creates the file MARKER and then waits (sleeps) instead
of scoring: its trial is RUNNING in the study for as long as the test needs, however loaded the
machine is, and a signal lands inside the evaluation as it would in a long one. Without the hold
a test had to poll for a RUNNING trial and hope that the evaluation outlasted the poll, which
needed thousands of evaluation tokens per trial and still lost the race under load.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import driver  # noqa: E402

#: How long a held evaluation waits: far longer than any test waits for it.
HOLD_S = 3600.0


def hold_in_evaluation(after: int, marker: Path) -> None:
    """Patch this process's search so that the first evaluation after ``after`` told trials
    creates ``marker`` and waits (see the module docstring)."""
    import bitalloc.jobs as jobs
    import bitalloc.search.run as search_run

    told = [0]
    tell, evaluate = search_run._tell, jobs.JobEvaluator.run

    def counting_tell(*args, **kwargs):
        ok = tell(*args, **kwargs)
        told[0] += ok
        return ok

    def held_run(self, job):
        # The baselines are measured before any trial is told, so they are never held.
        if told[0] >= after:
            marker.write_text(str(told[0]))
            time.sleep(HOLD_S)
        return evaluate(self, job)

    search_run._tell = counting_tell
    jobs.JobEvaluator.run = held_run


if __name__ == "__main__":
    # As in driver.py: Ctrl-C must raise KeyboardInterrupt even if SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_dir, trials, after, marker = sys.argv[1:5]
    hold_in_evaluation(int(after), Path(marker))
    print(driver.run(Path(run_dir), int(trials)).summary())
