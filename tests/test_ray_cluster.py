"""The CLI as a Ray job: ``ray job submit --working-dir DIR -- bitalloc ...`` against a head
started with ``ray start --head`` (on 127.0.0.1, token authentication, its own temp dir).

The head is stopped by PID (tests/raycluster.py); the test checks that every process it
started is gone and that a bystander process with Ray-like names was left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import TEXT
from tests.hfdirs import tiny_model_dir
from tests.raycluster import ray_head

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

# The job, in one place. Paths without a leading / are relative to the job's working dir,
# which `ray job submit --working-dir` uploads (model/, cal.txt, eval.txt: see _job_dir);
# outputs go to an absolute path the test reads back (the job runs on this machine).
JOB = "search"  # or "allocate"
_TEXT_OPTIONS = [
    "--model",
    "model",
    "--calibration",
    "cal.txt",
    "--evaluation",
    "eval.txt",
    "--formats",
    "int4-g32,int8-g32,fp16",
    "--seq-len",
    "32",
    "--calibration-tokens",
    "128",
    "--eval-tokens",
    "128",
    "--quiet",
]


def job_command(out: Path) -> tuple[list[str], list[str], str]:
    """(entrypoint, files it writes under ``out``, a line its log must contain)."""
    if JOB == "search":
        # `--workers 1` evaluates trials on a Ray actor: with --ray-address unset the job's
        # driver joins this cluster through $RAY_ADDRESS, which Ray sets for every job, and
        # authenticates with the RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH it inherits from the head.
        cmd = ["bitalloc", "search", *_TEXT_OPTIONS, "--avg-bits", "6", "--trials", "4"]
        cmd += ["--sampler", "tpe", "--study", "rayjob", "--run-dir", str(out), "--workers", "1"]
        return cmd, ["search.json", "best.json"], "best: avg_bits="
    cmd = ["bitalloc", "allocate", *_TEXT_OPTIONS, "--avg-bits", "6", "--verify"]
    return cmd + ["--out", str(out / "alloc.json")], ["alloc.json"], f"wrote {out}/alloc.json"


def _job_dir(root: Path) -> Path:
    """The job's working dir: a tiny random Llama with its tokenizer, and two text files."""
    from transformers import AutoTokenizer

    root.mkdir()
    tiny_model_dir(root / "model")
    (root / "cal.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    tok = AutoTokenizer.from_pretrained(root / "model", local_files_only=True)
    assert tok("Zé!", add_special_tokens=False)["input_ids"] == list("Zé!".encode())
    return root


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_cli_runs_as_a_ray_job(tmp_path):
    job_dir = _job_dir(tmp_path / "job")
    out, cache = tmp_path / "out", tmp_path / "cache"
    entrypoint, outputs, log_line = job_command(out)
    # Not ours to stop: a process with Ray-like names, started before the head.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "ray::IDLE", "raylet", "gcs_server"]
    )
    try:
        with ray_head(tmp_path) as head:
            address = ["--address", head.dashboard_url]
            # Token auth is on, and a client sends the token only when it has
            # RAY_AUTH_MODE=token itself (whatever ~/.ray/auth_token holds).
            no_mode = {k: v for k, v in head.client_env.items() if k != "RAY_AUTH_MODE"}
            refused = head.ray("job", "list", *address, env=no_mode, check=False)
            assert refused.returncode != 0
            assert "Missing authentication token" in refused.stdout + refused.stderr
            submitted = head.ray(
                "job",
                "submit",
                *address,
                "--submission-id",
                "bitalloc-test",
                "--working-dir",
                str(job_dir),
                # The job's environment (its driver and its Ray workers).
                "--runtime-env-json",
                json.dumps({"env_vars": {"BITALLOC_CACHE_DIR": str(cache)}}),
                "--",
                *entrypoint,
            )
            assert "Job 'bitalloc-test' succeeded" in submitted.stderr + submitted.stdout
            status = head.ray("job", "status", "bitalloc-test", *address)
            assert "Job 'bitalloc-test' succeeded" in status.stdout + status.stderr
            info = head.api("/api/jobs/bitalloc-test")
            assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0, info
            logs = head.ray("job", "logs", "bitalloc-test", *address).stdout
            assert log_line in logs, logs[-3000:]
            if JOB == "search":  # its --workers ran as actors of this job, on this cluster
                actors = head.api("/api/v0/actors?limit=1000")["data"]["result"]["result"]
                assert any(a["job_id"] == info["job_id"] for a in actors), actors

        for name in outputs:
            assert (out / name).is_file(), name
        assert list(cache.glob("profiles/*.json")), "the job ignored its BITALLOC_CACHE_DIR"
        if JOB == "search":
            best = json.loads((out / "best.json").read_text())
            assert best["avg_bits"] <= 6
        else:
            alloc = json.loads((out / "alloc.json").read_text())
            assert alloc["budget"]["avg_bits"] == 6 and alloc["avg_bits"] <= 6
            assert alloc["measured"]["perplexity"] > 1

        # Stopped exactly what it started: the `ray start` process and the processes of its
        # session are gone, and it signalled no process that existed before the head.
        assert len(head.seen) >= 5 and any(pid == head.pid for pid, _ in head.seen)
        assert not [pid for pid, created in head.seen if _alive(pid, created)]
        assert head.signalled and head.signalled <= head.seen
        assert not head.signalled & head.preexisting
        assert not any(
            str(head.temp_dir) in " ".join(p.info["cmdline"] or ())
            for p in psutil.process_iter(["cmdline"])
        )
        assert bystander.poll() is None, "a process the head did not start was stopped"
    finally:
        bystander.kill()
        bystander.wait()
