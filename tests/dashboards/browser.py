"""Headless Chromium for the dashboard tests: the DOM after scripts ran, and screenshots.

Chromium is driven through its command line only (``--dump-dom``, ``--screenshot``), so no
browser-driver package is needed. The flags keep it off the network (the test machines have
none) and out of the user's profile; each run gets a fresh profile directory.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: Where the tests leave screenshots for people to look at (git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WINDOW = (1400, 2400)

_FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def require_chromium() -> Path:
    """The Chromium binary, or skip the test saying how to install it."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install -y chromium)")
    return CHROMIUM


def _run(args: list[str], *, timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="bitalloc-chromium-") as profile:
        cmd = [str(require_chromium()), *_FLAGS, f"--user-data-dir={profile}", *args]
        result = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise AssertionError(f"chromium exited with {result.returncode}:\n{tail}")
    return result


def render(
    url: str,
    *,
    screenshot: Path | None = None,
    budget_ms: int = 5000,
    window: tuple[int, int] = WINDOW,
    timeout: float = 60,
) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (scripts, timers and fetches ran);
    with ``screenshot``, also a PNG of its first ``window`` pixels there (one browser run does
    both, which halves the tests' time)."""
    args = [f"--virtual-time-budget={budget_ms}", f"--window-size={window[0]},{window[1]}"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)
        args.append(f"--screenshot={screenshot}")
    result = _run([*args, "--dump-dom", url], timeout=timeout)
    if screenshot is not None:
        assert screenshot.is_file(), f"chromium wrote no screenshot at {screenshot}"
    return result.stdout.decode("utf-8", errors="replace")


def assert_nontrivial_png(path: Path, *, min_bytes: int = 20_000) -> None:
    """The PNG is big enough to hold a drawn page and, when Pillow is installed, has more than
    one colour (a blank or all-error page compresses to a few kB of one colour)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes: the page looks empty"
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16, f"{path} has {len(colours)} colours only"


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, timeout: float = 30, alive=lambda: True) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``; ``alive()`` returning
    False (the server process died) stops the wait early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"the server exited before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")
