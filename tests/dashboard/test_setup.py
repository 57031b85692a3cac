"""How the dashboard is laid out for Streamlit's server: pages outside a pages/ folder, and
only localhost names accepted (hostile input, issue 15)."""

from __future__ import annotations

from streamlit import config
from streamlit.web.server.starlette.starlette_websocket import is_host_allowed

from tests.helpers import ROOT


def test_no_pages_folder_beside_the_entrypoint():
    # Streamlit would run a dashboard/pages/ folder as old-style pages: a first request for
    # /score would then run views without the router (and without the repository on sys.path).
    assert not (ROOT / "dashboard" / "pages").exists(), "pages live in dashboard/views/"


# --- 6. DNS rebinding -----------------------------------------------------------------------------


def test_the_dashboard_accepts_only_localhost_names(monkeypatch):
    monkeypatch.chdir(ROOT)  # where `make run` starts it
    try:
        config.get_config_options(force_reparse=True)
        assert not is_host_allowed("evil.example")
        assert not is_host_allowed("evil.example:8501")
        assert not is_host_allowed("localhost.evil.example")
        for host in ("localhost:8501", "127.0.0.1:8501", "[::1]:8501", "localhost"):
            assert is_host_allowed(host), host
    finally:
        config.get_config_options(force_reparse=True)
