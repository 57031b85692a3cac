"""Where the repository is, how many cores this process may use, and writing files so that a
crash never leaves half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # core/schema/files.py


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def repo_relative(path: Path | str) -> str:
    """A path as tables and pages name it: relative to the repository where it can be."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def cpu_count() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), not
    every core of the machine as ``os.cpu_count()`` says."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def invocation(command: str, argv: Sequence[str] | None = None) -> str:
    """``malaria COMMAND ARGS``, quoted for a shell: ``argv``, or this process's arguments after
    the command's words (``command`` is e.g. ``"check heatmaps"``)."""
    if argv is None:
        words, argv = command.split(), sys.argv[1:]
        if argv[: len(words)] == words:
            argv = argv[len(words) :]
    return f"malaria {command} " + shlex.join(argv)


def write_json(path: Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
