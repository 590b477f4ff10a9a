import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from bitalloc import jobs as jobs_module
from bitalloc.apply import fake_quantized
from bitalloc.errors import BitallocError
from bitalloc.evaluate import perplexity
from bitalloc.formats import parse_palette
from bitalloc.importance import gather_importance
from bitalloc.jobs import ACTOR_PREFIX, Journal, job_key, run_jobs
from bitalloc.models import discover_units
from bitalloc.sensitivity import KLProfiler, MeasuredProfiler
from tests.conftest import random_windows

PALETTE = parse_palette("int2-g32,int4-g32,fp16")


def _calibration(n=4, seq_len=32):
    return random_windows(n=n, seq_len=seq_len)


def _loss(model, ids):
    return math.log(perplexity(model, ids).perplexity)


def test_measured_is_the_loss_increase_of_quantizing_one_unit(tiny_model, tmp_path):
    units = discover_units(tiny_model)
    cal = _calibration()
    prof = MeasuredProfiler(tokens=64, progress=False, results=tmp_path / "j.jsonl").profile(
        tiny_model, units, PALETTE, cal
    )
    used = cal[[0, 2]]  # 64 tokens = 2 windows, spread evenly over 4
    base = _loss(tiny_model, used)
    assert prof.metadata["base_loss"] == pytest.approx(base, rel=1e-6)
    raw = np.asarray(prof.metadata["raw"])
    for i in (0, 8, 13):
        for j, fmt in enumerate(PALETTE):
            with fake_quantized(tiny_model, {units[i].name: fmt}):
                expected = _loss(tiny_model, used) - base
            assert raw[i, j] == pytest.approx(expected, rel=1e-4, abs=2e-6)  # fp32 loss noise
    # Clipping at zero and the monotone cap are counted; the table is never above the raw max.
    assert prof.metadata["negative_clipped"] == int((raw < 0).sum())
    assert (prof.loss <= np.maximum(raw, 0) + 1e-12).all()


def test_kl_matches_an_independent_computation(tiny_model, tmp_path):
    units = discover_units(tiny_model)
    cal = _calibration()
    prof = KLProfiler(tokens=64, progress=False, results=tmp_path / "j.jsonl").profile(
        tiny_model, units[:2], PALETTE, cal
    )
    used = cal[[0, 2]]
    with torch.inference_mode():
        ref = torch.log_softmax(tiny_model(input_ids=used).logits[:, :-1], -1)
        with fake_quantized(tiny_model, {units[1].name: "int2-g32"}):
            logq = torch.log_softmax(tiny_model(input_ids=used).logits[:, :-1], -1)
    expected = float((ref.exp() * (ref - logq)).sum(-1).mean())
    assert prof.loss[1, 0] == pytest.approx(expected, rel=1e-4)
    assert prof.metadata["metric"] == "kl"


def test_interrupted_run_resumes_without_repeating_jobs(tiny_model, tmp_path, monkeypatch):
    units = discover_units(tiny_model)[:4]
    cal = _calibration()
    path = tmp_path / "journal.jsonl"
    calls = []
    original = jobs_module.JobEvaluator.run

    def interrupted(self, job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job)
        return original(self, job)

    monkeypatch.setattr(jobs_module.JobEvaluator, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MeasuredProfiler(tokens=64, progress=False, results=path).profile(
            tiny_model, units, PALETTE, cal
        )
    assert len(path.read_text().splitlines()) == 1 + 5  # header + the finished jobs
    # A writer killed mid-line leaves a torn record: it is ignored and that job runs again.
    with path.open("a") as fh:
        fh.write('{"job": "model.layers.0.self_attn.q_pro')
    monkeypatch.setattr(jobs_module.JobEvaluator, "run", original)
    resumed_calls = []

    def counting(self, job):
        resumed_calls.append(job)
        return original(self, job)

    monkeypatch.setattr(jobs_module.JobEvaluator, "run", counting)
    resumed = MeasuredProfiler(tokens=64, progress=False, results=path).profile(
        tiny_model, units, PALETTE, cal
    )
    assert len(resumed_calls) == 1 + len(units) * len(PALETTE) - 5
    assert not set(resumed_calls) & set(calls)
    fresh = MeasuredProfiler(tokens=64, progress=False, results=tmp_path / "fresh.jsonl").profile(
        tiny_model, units, PALETTE, cal
    )
    np.testing.assert_allclose(resumed.loss, fresh.loss, rtol=1e-9, atol=1e-12)


def test_kl_reuses_no_loss_only_record_but_measured_reuses_kl_records(tiny_model, tmp_path):
    units = discover_units(tiny_model)[:2]
    cal = _calibration()
    path = tmp_path / "shared.jsonl"
    KLProfiler(tokens=64, progress=False, results=path).profile(tiny_model, units, PALETTE, cal)
    lines = len(path.read_text().splitlines())
    MeasuredProfiler(tokens=64, progress=False, results=path).profile(
        tiny_model, units, PALETTE, cal
    )
    assert len(path.read_text().splitlines()) == lines  # every job was already measured
    other = tmp_path / "loss-only.jsonl"
    MeasuredProfiler(tokens=64, progress=False, results=other).profile(
        tiny_model, units, PALETTE, cal
    )
    before = len(other.read_text().splitlines())
    KLProfiler(tokens=64, progress=False, results=other).profile(tiny_model, units, PALETTE, cal)
    assert len(other.read_text().splitlines()) == 2 * before - 1  # every job again, with KL


def test_journal_of_another_run_is_refused(tiny_model, tmp_path):
    units = discover_units(tiny_model)[:1]
    path = tmp_path / "j.jsonl"
    MeasuredProfiler(tokens=64, progress=False, results=path).profile(
        tiny_model, units, PALETTE, _calibration()
    )
    with pytest.raises(BitallocError, match="belongs to another run"):
        MeasuredProfiler(tokens=32, progress=False, results=path).profile(
            tiny_model, units, PALETTE, _calibration()
        )


def test_bad_options_and_inputs_raise(tiny_model, tmp_path):
    with pytest.raises(BitallocError, match="tokens must be positive"):
        MeasuredProfiler(tokens=0)
    with pytest.raises(BitallocError, match="workers must be"):
        MeasuredProfiler(workers=-1)
    with pytest.raises(BitallocError, match="no units"):
        MeasuredProfiler(progress=False, results=tmp_path / "j").profile(
            tiny_model, [], PALETTE, _calibration()
        )


def test_nan_weights_fail_clearly(tiny_model, tmp_path):
    units = discover_units(tiny_model)[:1]
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(BitallocError, match="non-finite loss"):
        MeasuredProfiler(tokens=64, progress=False, results=tmp_path / "j").profile(
            tiny_model, units, PALETTE, _calibration()
        )


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_workers_match_in_process_and_survive_a_killed_worker(tiny_model, tmp_path):
    ray = pytest.importorskip("ray")
    units = discover_units(tiny_model)
    cal = _calibration(n=8, seq_len=64)
    layers = {u.name: u.layer for u in units}
    jobs = [()] + [((u.name, f.name),) for u in units for f in PALETTE]
    jobs += [((u.name, "int2-g32"), (v.name, "int4-g32")) for u, v in zip(units, units[1:])]
    local = run_jobs(tiny_model, cal, layers, jobs, keep_logprobs=True, progress=False)
    grams = gather_importance(tiny_model, units, cal, tokens=256, progress=False, grams=True)
    gptq_jobs = [()] + [((u.name, "int2-g32+gptq"),) for u in units[:4]]
    gptq_jobs += [((units[0].name, "int3-g32+gptq-act"), (units[5].name, "int2-g32+gptq"))]
    gptq_local = run_jobs(
        tiny_model, cal, layers, gptq_jobs, keep_logprobs=False, progress=False, importance=grams
    )

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        journal = Journal(tmp_path / "ray.jsonl", {"test": 1})
        out = {}

        def work():
            out["results"] = run_jobs(
                tiny_model,
                cal,
                layers,
                jobs,
                keep_logprobs=True,
                journal=journal,
                workers=2,
                progress=False,
            )

        thread = threading.Thread(target=work)
        thread.start()
        deadline = time.monotonic() + 120
        while len(journal.done) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = [n for n in ray.util.list_named_actors() if str(n).startswith(ACTOR_PREFIX)]
        assert victims
        ray.kill(ray.get_actor(victims[0]))
        thread.join(timeout=300)
        assert not thread.is_alive()
        # GPTQ formats on the workers: the Gram matrices travel with the importance and give
        # what they give in process.
        gptq_remote = run_jobs(
            tiny_model,
            cal,
            layers,
            gptq_jobs,
            keep_logprobs=False,
            workers=2,
            progress=False,
            importance=grams,
        )
    finally:
        ray.shutdown()
    for key, value in gptq_local.items():
        assert gptq_remote[key]["loss"] == pytest.approx(value["loss"], rel=1e-6), key
    assert len({round(v["loss"], 9) for v in gptq_local.values()}) == len(gptq_jobs)
    remote = out["results"]
    assert set(remote) == {job_key(j) for j in jobs}
    for key, value in local.items():
        assert remote[key]["loss"] == pytest.approx(value["loss"], rel=1e-6)
        assert remote[key]["kl"] == pytest.approx(value["kl"], rel=1e-4, abs=1e-9)
    records = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert len({r["job"] for r in records[1:]}) == len(jobs)
