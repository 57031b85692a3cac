"""Uploads kept on this machine's disk, not in the server's memory.

Streamlit holds every uploaded file in memory for as long as its uploader lists it. The Score
page writes each file into its session's folder here as soon as it arrives and drops
Streamlit's copy, so the server then holds the names; scoring, the thumbnails and the report
read the files from disk. A session's folder goes when the session does (dashboard.reaper),
the files of an upload go once it is neither waiting to be scored nor on show, and the folders
of a server that has stopped go when it exits or when the next one starts.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core.data.sources import Upload

ROOT = Path(tempfile.gettempdir()) / "malaria-uploads"  # one folder per server process in it


@functools.cache
def server_folder(root: Path = ROOT) -> Path:
    """This server process's folder (``root/<pid>``), made once; removed when the process
    exits, and the folders of processes that are gone are removed now."""
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():
        if other.name.isdigit() and int(other.name) != os.getpid() and not _alive(int(other.name)):
            shutil.rmtree(other, ignore_errors=True)
    folder = root / str(os.getpid())
    folder.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def session_folder() -> Path:
    """The running session's folder in this server's."""
    ctx = get_script_run_ctx()
    return server_folder() / (ctx.session_id if ctx is not None else "no-session")


def keep(files: Sequence) -> list[Upload]:
    """st.file_uploader's files written into the session's folder, and Streamlit's copies of
    them dropped; (upload name, its file on disk) for each, in order. The uploader that
    delivered them must be drawn under a new key next, so that it forgets them too."""
    folder = session_folder()
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Upload] = []
    for f in files:
        fd, name = tempfile.mkstemp(dir=folder, suffix=PurePosixPath(f.name).suffix[:16])
        with os.fdopen(fd, "wb") as disk:
            disk.write(f.getvalue())  # the uploader's own bytes object: no copy is made
        out.append((f.name, Path(name)))
    _forget_uploaded(files)
    return out


def _forget_uploaded(files: Iterable) -> None:
    """Remove ``files`` from Streamlit's uploaded-file manager (as st.chat_input does once it
    has read its files); nothing where the manager is not the in-memory one."""
    ctx = get_script_run_ctx()
    if ctx is not None and isinstance(ctx.uploaded_file_mgr, MemoryUploadedFileManager):
        manager = ctx.uploaded_file_mgr
        for f in files:
            manager.remove_file(session_id=ctx.session_id, file_id=f.file_id)


def prune(kept: Iterable[Path]) -> None:
    """Remove the session's files that are not in ``kept``."""
    folder = session_folder()
    wanted = {Path(p) for p in kept}
    if folder.is_dir():
        for path in folder.iterdir():
            if path not in wanted:
                path.unlink(missing_ok=True)


def size(items: Iterable[Upload]) -> int:
    """Bytes of the uploads, on disk or in memory."""
    return sum(d.stat().st_size if isinstance(d, Path) else len(d) for _, d in items)
