"""Start the dashboard headless on a free localhost port, as `make run` does (the browser test
and `python -m bench.ui` drive it with Chromium)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from core.schema.files import REPO_ROOT

ROOT = REPO_ROOT
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# For page.wait_for_function: the state Streamlit's own browser tests read (the running icon
# only shows after 500 ms, so its absence says nothing about short runs).
SCRIPT_STATE = (
    "document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')"
)
IDLE = f"() => {SCRIPT_STATE} === 'notRunning'"
BUSY = f"() => {SCRIPT_STATE} !== 'notRunning'"
# Idle, every image loaded and every Plotly chart drawn: what a screenshot should wait for.
DRAWN = (
    f"() => {SCRIPT_STATE} === 'notRunning'"
    " && Array.from(document.images).every(i => i.complete)"
    " && Array.from(document.querySelectorAll('.js-plotly-plot'))"
    ".every(p => p.querySelector('.main-svg'))"
)


def wait_for_rerun(page, timeout_ms: float) -> None:
    """After an interaction: wait for the rerun it triggers to start, then to finish."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # it may have finished between two animation frames: then only the end counts
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(BUSY, timeout=5_000)
    page.wait_for_function(IDLE, timeout=timeout_ms)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamlit_command() -> list[str]:
    """The ``streamlit`` script beside this interpreter (what `make run` calls), so the app is
    started exactly as a user starts it, without the repository on ``sys.path``."""
    script = Path(sys.executable).parent / "streamlit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "streamlit"]


@contextlib.contextmanager
def running_app(env: dict[str, str], log: Path, timeout: float = 120) -> Iterator[tuple[str, int]]:
    """Serve the dashboard with extra environment ``env``; yield its URL and process id; stop
    it on exit."""
    port = _free_port()
    with open(log, "w+") as out:
        proc = subprocess.Popen(
            streamlit_command()
            + [
                "run",
                str(ROOT / "dashboard" / "app.py"),
                "--server.port",
                str(port),
                "--server.address",
                "127.0.0.1",
                "--server.headless",
                "true",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                        break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        out.seek(0)
                        raise RuntimeError(
                            "streamlit did not start: " + out.read()[-2000:]
                        ) from None
                    time.sleep(0.5)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
