"""bitalloc search and bitalloc report end to end on the embedded default model."""

from __future__ import annotations

import json

import optuna
import pytest

from bitalloc.allocation import Allocation
from bitalloc.cli import main
from bitalloc.search import default_storage_url
from tests.conftest import DEFAULT_MODEL_FORMATS, DEFAULT_MODEL_TOKENS


@pytest.mark.slow
def test_search_then_report_on_the_default_model(
    tmp_path, shared_cache, capsys, reuse_default_model
):
    run_dir = tmp_path / "run"
    args = ["search", "--avg-bits", "3.25", "--trials", "3", "--run-dir", str(run_dir)]
    args += ["--formats", DEFAULT_MODEL_FORMATS, "--calibration-tokens", str(DEFAULT_MODEL_TOKENS)]
    args += ["--eval-tokens", "512", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best: avg_bits=" in out
    study = optuna.load_study(study_name="bitalloc", storage=default_storage_url(run_dir))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3 and len(trials[0].user_attrs["formats"]) == 210
    best = Allocation.load(run_dir / "best.json")
    assert best.avg_bits <= 3.25 + 1e-9 and best.measured.perplexity > 1
    summary = json.loads((run_dir / "search.json").read_text())
    assert summary["best"]["perplexity"] == pytest.approx(best.measured.perplexity)
    # Resuming to more trials continues the same study.
    assert main([*args[:4], "4", *args[5:], "--resume"]) == 0
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4

    report = tmp_path / "report.html"
    assert main(["report", "--run-dir", str(run_dir), "--out", str(report)]) == 0
    html = report.read_text()
    for plot in ("plot-heatmap", "plot-bits", "plot-frontier", "plot-history"):
        assert f'id="{plot}"' in html
