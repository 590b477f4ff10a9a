"""Serving a search's study live with optuna-dashboard, after checks that fail with a clear
message instead of a traceback from inside the web server.

optuna-dashboard has no login and lets visitors edit notes and trial states, so it listens on
the loopback interface unless told otherwise.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable

from bitalloc.dashboards.rundir import pick_study_name
from bitalloc.errors import BitallocError
from bitalloc.search.storage import open_storage, study_names

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# Wildcard addresses are not browsable; the URL printed for them is the local one.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def dashboard_url(host: str, port: int, *, study_id: int | None = None) -> str:
    """The dashboard's URL for a server on ``host``:``port``; with ``study_id`` (the storage's
    id of a study) the URL of that study's page (optuna-dashboard's ``/dashboard/studies/ID``)."""
    shown = _WILDCARDS.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}/dashboard"
    return base if study_id is None else f"{base}/studies/{study_id}"


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`BitallocError` (naming ``--port``) unless a server can listen there."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BitallocError(f"--port {port!r}: choose a port between 1 and 65535, e.g. 8080")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as exc:
        raise BitallocError(
            f"--host {host!r} cannot be resolved ({exc.strerror}); use e.g. {DEFAULT_HOST}"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        # The dashboard's server (wsgiref) sets SO_REUSEADDR too, so a port left in TIME_WAIT by
        # an earlier dashboard is free for it and must count as free here.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BitallocError(
                    f"port {port} on {host} is already in use (another dashboard?); choose a free "
                    f"one with --port, e.g. --port {port + 1 if port < 65535 else 8080}"
                ) from None
            raise BitallocError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --host or --port"
            ) from None


def run_dashboard(
    storage_url: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    study_name: str | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve ``storage_url`` with optuna-dashboard until interrupted (blocks).

    Checks first that the storage exists and holds a study (``study_name`` when given), and
    that the port is free; then announces the URL (the study's page when a study is named or
    the storage holds only one) and runs ``optuna_dashboard.run_server``.
    """
    storage = open_storage(storage_url, create=False)
    names = study_names(storage)
    if study_name is not None or len(names) <= 1:
        study_name = pick_study_name(storage_url, names, study_name)
    check_port_free(host, port)
    study_id = None if study_name is None else storage.get_study_id_from_name(study_name)
    url = dashboard_url(host, port, study_id=study_id)
    what = f"study {study_name!r}" if study_name else f"{len(names)} studies"
    announce(f"optuna-dashboard: {what} in {storage_url}")
    if not is_loopback(host):
        announce(
            f"warning: listening on {host}, not loopback: the dashboard has no login, and anyone "
            "who can reach this port can read the study and edit its notes"
        )
    announce(f"open {url}  (Ctrl-C to stop)")
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port)
