"""The live dashboard: URLs, the checks before serving, the CLI, and optuna-dashboard serving a
study to headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bitalloc.cli import main
from bitalloc.dashboards import launcher
from bitalloc.dashboards.launcher import dashboard_url, is_loopback, run_dashboard
from bitalloc.errors import BitallocError
from bitalloc.fileio import write_json_atomic
from bitalloc.search.storage import default_storage_url, open_storage
from tests.dashboards import browser
from tests.dashboards.synthetic import STUDY, make_study

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("dash") / "bitalloc"
    make_study(run, n_trials=12)
    return run


@pytest.fixture
def served(monkeypatch):
    """Record run_server calls instead of serving."""
    calls = []
    import optuna_dashboard

    monkeypatch.setattr(
        optuna_dashboard, "run_server", lambda storage, **kw: calls.append((storage, kw))
    )
    return calls


def test_dashboard_url():
    assert dashboard_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard"
    assert dashboard_url("localhost", 9000, study_id=3) == (
        "http://localhost:9000/dashboard/studies/3"
    )
    # Wildcard binds are announced with the address a local browser can open.
    assert dashboard_url("0.0.0.0", 80) == "http://127.0.0.1:80/dashboard"
    assert dashboard_url("::", 80) == "http://[::1]:80/dashboard"
    assert dashboard_url("::1", 81, study_id=1) == "http://[::1]:81/dashboard/studies/1"


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_run_dashboard_announces_the_study_page(run_dir, served):
    url = default_storage_url(run_dir)
    lines: list[str] = []
    port = browser.free_port()
    run_dashboard(url, port=port, study_name=STUDY, announce=lines.append)
    study_id = open_storage(url, create=False).get_study_id_from_name(STUDY)
    assert f"open http://127.0.0.1:{port}/dashboard/studies/{study_id}" in "\n".join(lines)
    assert served[0][1] == {"host": "127.0.0.1", "port": port}
    # With one study in the storage, its page is announced without naming it.
    lines.clear()
    run_dashboard(url, port=port, announce=lines.append)
    assert f"/dashboard/studies/{study_id}" in lines[-1]


def test_run_dashboard_warns_off_loopback(run_dir, served):
    lines: list[str] = []
    run_dashboard(
        default_storage_url(run_dir),
        host="0.0.0.0",
        port=browser.free_port(),
        announce=lines.append,
    )
    assert any("no login" in line for line in lines)


def test_run_dashboard_checks_before_serving(tmp_path, run_dir, served):
    missing = tmp_path / "nowhere.db"
    with pytest.raises(BitallocError, match="does not exist"):
        run_dashboard(f"sqlite:///{missing}", announce=lambda _: None)
    assert not missing.exists()
    empty = default_storage_url(tmp_path)
    open_storage(empty)  # a database without studies
    with pytest.raises(BitallocError, match="holds no study"):
        run_dashboard(empty, announce=lambda _: None)
    with pytest.raises(BitallocError, match="no study 'other'"):
        run_dashboard(default_storage_url(run_dir), study_name="other", announce=lambda _: None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BitallocError, match=f"port {port} .* in use.*--port"):
            run_dashboard(default_storage_url(run_dir), port=port, announce=lambda _: None)
    with pytest.raises(BitallocError, match="between 1 and 65535"):
        launcher.check_port_free("127.0.0.1", 70000)
    assert served == []


def test_cli_dashboard_finds_the_study(run_dir, tmp_path, served, capsys):
    port = browser.free_port()
    assert main(["dashboard", "--run-dir", str(run_dir), "--port", str(port)]) == 0
    assert f"127.0.0.1:{port}/dashboard/studies/" in capsys.readouterr().out
    # search.json names the storage and study when the search used another storage.
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(
        run / "search.json", {"storage": default_storage_url(run_dir), "study": STUDY}
    )
    assert main(["dashboard", "--run-dir", str(run), "--port", str(port)]) == 0
    assert f"study '{STUDY}'" in capsys.readouterr().out
    assert len(served) == 2


def test_cli_dashboard_errors(tmp_path, capsys, monkeypatch, served):
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard"]) == 2
    assert "runs/bitalloc does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["dashboard", "--run-dir", "empty"]) == 2
    assert "holds no study" in capsys.readouterr().err
    assert main(["dashboard", "--storage", "sqlite:///absent.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()
    assert served == []


def test_dashboard_serves_the_study_to_chromium(run_dir, tmp_path):
    browser.require_chromium()
    port = browser.free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = [
        sys.executable,
        "-m",
        "bitalloc.cli",
        "dashboard",
        "--run-dir",
        str(run_dir),
        "--port",
        str(port),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Output goes to files: the server logs every request, and an unread pipe would fill up
    # and stall it.
    with out.open("wb") as stdout, err.open("wb") as stderr:
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        browser.wait_for_port(port, timeout=40, alive=lambda: server.poll() is None)
        announced = out.read_text()
        url = announced.rsplit("open ", 1)[-1].split()[0]
        assert url.startswith(f"http://127.0.0.1:{port}/dashboard/studies/"), announced
        shot = browser.ARTIFACTS / "dashboard.png"
        dom = browser.render(url, screenshot=shot, budget_ms=4000)
        assert STUDY in dom
        assert "avg_bits" in dom and "perplexity" in dom
        browser.assert_nontrivial_png(shot, min_bytes=40_000)
        assert server.poll() is None, "the dashboard stopped while serving"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
