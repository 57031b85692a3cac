"""The dashboard gives back the uploads of sessions whose browser has gone, and only those."""

from __future__ import annotations

import gc
import time
import weakref

from dashboard import reaper


class FakeFiles:
    def __init__(self, owners: dict[str, bytes]) -> None:
        self.file_storage = {sid: {"f": data} for sid, data in owners.items()}

    def remove_session_files(self, sid: str) -> None:
        self.file_storage.pop(sid, None)


class FakeSession:
    def __init__(self) -> None:
        self.session_state = {"sources": object()}


class FakeManager:
    def __init__(self, sids) -> None:
        self.sessions = {sid: FakeSession() for sid in sids}

    def get_session_info(self, sid: str):
        return type("Info", (), {"session": self.sessions[sid]})() if sid in self.sessions else None


class FakeRuntime:
    """What the reaper uses of streamlit's Runtime."""

    def __init__(self, owners: dict[str, bytes], active: set[str]) -> None:
        self.uploaded_file_mgr = FakeFiles(owners)
        self._session_mgr = FakeManager(owners)
        self.active = active
        self.closed: list[str] = []

    def is_active_session(self, sid: str) -> bool:
        return sid in self.active

    def close_session(self, sid: str) -> None:
        self.closed.append(sid)


def test_the_thread_waits_where_there_is_no_server():
    calls = []
    thread = reaper.start(lambda: calls.append(1), interval_s=0.01)  # returns None: no runtime
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive() and len(calls) >= 3  # asked again and again, never crashed


def test_only_sessions_gone_for_the_grace_period_lose_their_uploads():
    rt = FakeRuntime({"open": b"x", "gone": b"y", "blip": b"z"}, active={"open"})
    seen: dict[str, float] = {}
    assert reaper.release_departed(rt, seen, now=0.0, grace_s=60) == []
    assert set(seen) == {"gone", "blip"}
    rt.active.add("blip")  # reconnected within the grace period
    assert reaper.release_departed(rt, seen, now=30.0, grace_s=60) == []
    assert set(seen) == {"gone"}
    assert reaper.release_departed(rt, seen, now=61.0, grace_s=60) == ["gone"]
    assert rt.closed == ["gone"] and set(rt.uploaded_file_mgr.file_storage) == {"open", "blip"}
    sessions = rt._session_mgr.sessions
    assert sessions["gone"].session_state == {} and sessions["open"].session_state
    assert seen == {}
    rt.active.discard("blip")  # its clock starts again from when it left the second time
    assert reaper.release_departed(rt, seen, now=100.0, grace_s=60) == []
    assert reaper.release_departed(rt, seen, now=160.0, grace_s=60) == ["blip"]


def test_forgetting_a_session_drops_what_its_widgets_callbacks_hold():
    """A button's on_click is a function of its page, holding the page's globals from the last
    run (the scored results, the upload): emptying the state alone kept them alive."""
    from streamlit.runtime.state.common import WidgetMetadata
    from streamlit.runtime.state.session_state import SessionState

    class Results:  # stands for a scored run's DataFrame and sources
        pass

    def page(results: Results):  # the page's last run: its globals and a callback
        page_globals = {"results": results}

        def open_run() -> object:
            return page_globals["results"]

        return open_run

    results = Results()
    alive = weakref.ref(results)
    state = SessionState()
    state["results"] = results
    state._new_widget_state.widget_metadata["$$ID-open-run"] = WidgetMetadata(
        "$$ID-open-run", lambda v: v, lambda v: v, "trigger_value", callback=page(results)
    )
    del results
    state.clear()
    gc.collect()
    assert alive() is not None  # what Streamlit's clear() leaves
    reaper.forget_state(state)
    gc.collect()
    assert alive() is None and not state._new_widget_state.widget_metadata


def test_uploads_kept_on_disk_go_with_their_session(tmp_path):
    """A session whose uploads were written to disk (dashboard.spool) owns no Streamlit
    upload any more: its folder alone makes it one to close, and the folder goes with it."""
    rt = FakeRuntime({}, active={"open"})
    rt._session_mgr = FakeManager(["open", "gone"])
    for sid in ("open", "gone"):
        (tmp_path / sid).mkdir()
        (tmp_path / sid / "upload.zip").write_bytes(b"PK")
    seen: dict[str, float] = {}
    assert reaper.release_departed(rt, seen, now=0.0, grace_s=60, spool=tmp_path) == []
    assert reaper.release_departed(rt, seen, now=61.0, grace_s=60, spool=tmp_path) == ["gone"]
    assert not (tmp_path / "gone").exists() and (tmp_path / "open" / "upload.zip").is_file()
    assert rt._session_mgr.sessions["gone"].session_state == {}


def test_a_server_folder_of_a_stopped_process_is_removed(tmp_path):
    from dashboard import spool

    (tmp_path / "999999999").mkdir()  # no such process
    (tmp_path / "1").mkdir()  # init: alive
    mine = spool.server_folder.__wrapped__(tmp_path)
    assert mine.is_dir() and mine.name == str(__import__("os").getpid())
    assert not (tmp_path / "999999999").exists() and (tmp_path / "1").is_dir()
