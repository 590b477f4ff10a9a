"""A throwaway Ray head for tests: ``with ray_head(tmp_path) as head: ...``.

The head runs on 127.0.0.1 with its own ``--temp-dir``, free ports and token authentication
(RAY_AUTH_MODE=token with a token file of its own, so it neither reads nor writes
``~/.ray/auth_token``). On exit it stops exactly the processes it started, found by PID: the
``ray start --block`` process, its descendants, and any process that carries this head's
marker in its environment or its temp dir on its command line. Nothing is matched by name,
and a process that already existed before the head started is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
MARKER = "BITALLOC_TEST_RAY_HEAD"
# Ray settings that a developer's shell may carry and that must not leak into the test cluster.
_CLEARED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_JOB_HEADERS",
)


@dataclass
class RayHead:
    dashboard_url: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    gcs_address: str  # 127.0.0.1:PORT, for ray.init(address=...) / --ray-address
    temp_dir: Path
    token_path: Path
    client_env: dict[str, str]  # environment for `ray job ...` / ray.init clients of this head
    log: Path
    pid: int
    # (pid, create_time) of every process seen as this head's, and of every process signalled.
    seen: set[tuple[int, float]] = field(default_factory=set)
    signalled: set[tuple[int, float]] = field(default_factory=set)
    preexisting: set[tuple[int, float]] = field(default_factory=set)

    def ray(self, *args: str, timeout: float = 300, check: bool = True, env=None):
        """Run the ``ray`` CLI as a client of this head (``ray job submit ...``); ``env``
        replaces :attr:`client_env`."""
        result = subprocess.run(
            [str(RAY), *args],
            env=self.client_env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ray {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def api(self, path: str):
        """GET a dashboard REST path (``/api/jobs/ID``) with this head's token; parsed JSON."""
        status, body = _get(self.dashboard_url + path, self.token_path.read_text())
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status}: {body[:2000]}")
        return json.loads(body)


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on all interfaces (the GCS listens on every interface)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _identity(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def _snapshot() -> set[tuple[int, float]]:
    out = set()
    for proc in psutil.process_iter():
        ident = _identity(proc)
        if ident:
            out.add(ident)
    return out


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ours(head: RayHead, marker: str) -> dict[int, psutil.Process]:
    """This head's live processes: the root, its descendants, and every process that carries
    the marker in its environment or the temp dir on its command line."""
    found: dict[int, psutil.Process] = {}
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(head.pid)
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    tdir = str(head.temp_dir)
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in found or proc.pid in me:
            continue
        try:
            if any(tdir in arg for arg in proc.info["cmdline"] or ()) or (
                proc.environ().get(MARKER) == marker
            ):
                found[proc.pid] = proc
        except psutil.Error:
            continue  # gone, or another user's process (its environment is unreadable)
    ours = {}
    for pid, proc in found.items():
        ident = _identity(proc)
        if ident is None or not _alive(proc) or pid in me:
            continue
        if ident in head.preexisting:
            continue  # never ours: it existed before the head was started
        head.seen.add(ident)
        ours[pid] = proc
    return ours


def _signal(head: RayHead, procs, sig: int) -> None:
    for proc in procs:
        ident = _identity(proc)
        if ident is None or ident in head.preexisting:
            continue
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)  # psutil refuses when the PID was reused meanwhile
            head.signalled.add(ident)


def _wait_gone(procs, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    return left


def _stop(head: RayHead, popen: subprocess.Popen, marker: str) -> None:
    # 1. `ray start --block` shuts its processes down on SIGTERM.
    everything = _ours(head, marker)
    _signal(head, [p for p in everything.values() if p.pid == popen.pid], signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=30)
    _wait_gone(everything.values(), 10)
    # 2. Whatever is left (including processes that appeared meanwhile): SIGTERM, then SIGKILL.
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        everything.update(_ours(head, marker))
        left = [p for p in everything.values() if _alive(p)]
        if not left:
            break
        _signal(head, left, sig)
        if popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=grace)
        _wait_gone(left, grace)
    survivors = [p for p in everything.values() if _alive(p)] + list(_ours(head, marker).values())
    if survivors:
        raise AssertionError(f"Ray head processes survived: {sorted({p.pid for p in survivors})}")
    assert not (head.signalled & head.preexisting)


def _get(url: str, token: str, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def ray_head(
    tmp_path: Path,
    *,
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[RayHead]:
    """Start a Ray head on 127.0.0.1 (token auth, own temp dir and ports), yield it once its
    job API answers, and stop exactly the processes it started.

    ``env`` adds to the head's environment, which Ray's processes and job drivers inherit.
    """
    # Short: Ray's unix socket paths under the temp dir must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    marker = temp_dir.name + "-" + secrets.token_hex(4)
    token = secrets.token_hex(32)
    token_path = tmp_path / "ray_auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)

    base = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    # Token auth, explicitly: with RAY_AUTH_MODE unset, `ray start --head` turns it on only
    # when some token (~/.ray/auth_token) already exists, and clients with an explicit address
    # never do; with it set, head and clients agree whatever the home directory holds.
    base["RAY_AUTH_MODE"] = "token"
    base["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    base["RAY_USAGE_STATS_ENABLED"] = "0"
    client_env = dict(base)
    head_env = {**base, **(env or {}), MARKER: marker}

    log = tmp_path / "ray_head.log"
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        # Ray replaces 127.0.0.1 by the machine's routable address (services.py,
        # resolve_ip_for_localhost) and its GCS listens on every interface; only the
        # dashboard stays on 127.0.0.1. Token auth guards the rest.
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    head = RayHead(
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        gcs_address=f"127.0.0.1:{gcs_port}",
        temp_dir=temp_dir,
        token_path=token_path,
        client_env=client_env,
        log=log,
        pid=-1,
        preexisting=_snapshot(),
    )
    with log.open("w") as out:
        popen = subprocess.Popen(
            cmd,
            env=head_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # no terminal signals; nothing of ours shares its group
        )
    head.pid = popen.pid
    try:
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                raise RuntimeError(f"ray start exited {popen.returncode}:\n{_tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                status, body = _get(f"{head.dashboard_url}/api/jobs/", token)
                if status == 200 and isinstance(json.loads(body), list):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray job API not up after {timeout:.0f}s:\n{_tail(log)}")
            time.sleep(0.5)
        yield head
    finally:
        try:
            _stop(head, popen, marker)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
