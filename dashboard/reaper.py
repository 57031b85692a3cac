"""Give memory back once a browser has gone: its session's uploads, then the freed heap.

Streamlit keeps a session whose browser disconnected for a possible reconnect, with its
uploaded files and its session state (the scored sources, which hold the uploaded zip), and
drops it from that store lazily without shutting it down, so its uploads stay in the
uploaded-file manager for the life of the server; a closed session can stay referenced by
Streamlit's event loop too. Each ``interval_s`` this closes every session that has owned
uploads (in Streamlit's manager, or written to disk by dashboard.spool) and been disconnected
for ``grace_s``, removes its files, empties its state, and returns the freed heap to the
system (glibc keeps the decoding threads' freed memory otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

_LOG = logging.getLogger(__name__)
GRACE_S = 60.0  # a reconnect after a network blip comes within seconds; a closed tab never
INTERVAL_S = 10.0


def trim_heap() -> bool:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``);
    False where there is no glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):  # musl, macOS: nothing to trim with
        return False


def release_departed(
    runtime,
    departed_since: dict[str, float],
    *,
    now: float,
    grace_s: float = GRACE_S,
    spool: Path | None = None,
) -> list[str]:
    """Close the sessions with uploads that have been disconnected for ``grace_s`` seconds
    (``departed_since``: session id -> when it was first seen disconnected, updated here);
    returns their ids. ``runtime``: streamlit's Runtime (uploaded_file_mgr, is_active_session,
    close_session, and its session manager's get_session_info). ``spool``: the server's folder
    of uploads on disk, one folder per session id, removed with its session."""
    files = runtime.uploaded_file_mgr
    owners = set(getattr(files, "file_storage", {}))
    on_disk = {p.name: p for p in spool.iterdir() if p.is_dir()} if spool and spool.is_dir() else {}
    owners |= set(on_disk)
    for sid in list(departed_since):
        if sid not in owners or runtime.is_active_session(sid):
            del departed_since[sid]  # reconnected, or its files are gone already
    closed = []
    for sid in owners:
        if runtime.is_active_session(sid):
            continue
        since = departed_since.setdefault(sid, now)
        if now - since >= grace_s:
            # Streamlit offers no public way to reach a disconnected session, and its event
            # loop can keep a closed one alive (a loop variable of its last flush): empty its
            # state, which holds the scored sources and their zip, whoever still refers to it
            manager = getattr(runtime, "_session_mgr", None)
            info = manager.get_session_info(sid) if manager is not None else None
            runtime.close_session(sid)  # shuts it down when it is still stored for reconnect
            files.remove_session_files(sid)  # and when the store had dropped it already
            if sid in on_disk:
                shutil.rmtree(on_disk[sid], ignore_errors=True)
            if info is not None:
                forget_state(info.session.session_state)
            del departed_since[sid]
            closed.append(sid)
    return closed


def forget_state(session_state) -> None:
    """Empty a session's state and its widgets' callbacks, in place. ``clear()`` keeps the
    widgets' metadata, whose callbacks (a button's ``on_click``) are functions of the page and
    so hold the page's globals from its last run: the scored results and the upload's sources
    with its zip, all still in memory (about 330 MB after the 14,008-cell zip)."""
    session_state.clear()
    state = getattr(session_state, "_state", session_state)  # AppSession's, or the page's wrapper
    metadata = getattr(getattr(state, "_new_widget_state", None), "widget_metadata", None)
    if isinstance(metadata, dict):
        metadata.clear()


def start(
    get_runtime: Callable[[], object | None],
    *,
    interval_s: float = INTERVAL_S,
    grace_s: float = GRACE_S,
    spool: Path | None = None,
) -> threading.Thread:
    """A daemon thread running ``release_departed`` every ``interval_s`` seconds and trimming
    the heap after a session was closed. ``get_runtime`` returns None where there is no
    server (Streamlit's AppTest): the thread then does nothing. ``spool``: as for
    ``release_departed``."""

    def loop() -> None:
        departed: dict[str, float] = {}
        while True:
            time.sleep(interval_s)
            runtime = get_runtime()
            if runtime is None:
                continue
            closed = release_departed(
                runtime, departed, now=time.monotonic(), grace_s=grace_s, spool=spool
            )
            if closed:
                trim_heap()
                _LOG.info(
                    "closed %d session(s) whose browser left %.0f s ago; their uploads "
                    "are released",
                    len(closed),
                    grace_s,
                )

    thread = threading.Thread(target=loop, name="release-departed-sessions", daemon=True)
    thread.start()
    return thread
