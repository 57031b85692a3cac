"""Adapting to a lab as a job a page can start and follow: ``malaria adapt`` in a process of its
own, so that it outlives the browser tab (and the server) that started it.

A job is a folder under ``runs/adapt-jobs/``: the uploaded fields (``fields/``) and boxes
(``annotations.json``), checked before anything starts; ``job.json`` (what it adapts, into
which folder, its process id); ``log.txt`` (the command's progress) and, once the command
ends, ``returncode``. The adapted model is written to ``runs/adapted/NAME`` as
``malaria adapt`` writes any model folder: whole or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.data.annotations import AnnotationError, read_annotations
from core.data.images import ImageError
from core.data.sources import sources_from_uploads
from core.schema.files import REPO_ROOT, write_json

JOBS_DIR = REPO_ROOT / "runs" / "adapt-jobs"
ADAPTED_DIR = REPO_ROOT / "runs" / "adapted"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
# Runs the command and records how it ended, whoever started it (no shell involved).
_WRAPPER = (
    "import subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(rc))\n"
)


@dataclass(frozen=True)
class AdaptJob:
    folder: Path

    @property
    def info(self) -> dict:
        """job.json: name, out, base, fields, check, started (epoch seconds), pid."""
        return json.loads((self.folder / "job.json").read_text())

    @property
    def out(self) -> Path:
        return Path(self.info["out"])

    @property
    def returncode(self) -> int | None:
        path = self.folder / "returncode"
        return int(path.read_text()) if path.is_file() else None

    @property
    def state(self) -> str:
        """``running``, ``done`` (the model folder is written), ``failed`` (the log says why) or
        ``stopped`` (its process ended without a word: killed, or the machine restarted)."""
        rc = self.returncode
        if rc is not None:
            return "done" if rc == 0 else "failed"
        try:
            os.kill(int(self.info["pid"]), 0)
        except (ProcessLookupError, PermissionError, ValueError):
            return "stopped"
        return "running"

    def log(self, lines: int = 12) -> str:
        """The last ``lines`` lines of the command's output."""
        path = self.folder / "log.txt"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def _write_fields(items: Sequence[tuple[str, bytes]], fields: Path) -> int:
    """The images of uploads (zips opened) written under their own file names; returns how
    many. Raises AnnotationError for two images of one name or none at all."""
    fields.mkdir(parents=True)
    seen: set[str] = set()
    for source in sources_from_uploads(items):
        name = PurePosixPath(source.path.split("!")[-1]).name
        if name in seen:
            raise AnnotationError(
                f"two uploaded images are named {name}: the boxes name fields by file name"
            )
        seen.add(name)
        try:
            (fields / name).write_bytes(source.read())
        except ImageError as exc:
            raise AnnotationError(f"{source.path}: {exc}") from None
    if not seen:
        raise AnnotationError("no field images in the upload")
    return len(seen)


def start_adapt(
    items: Sequence[tuple[str, bytes]],
    annotations: bytes,
    *,
    name: str,
    base: Path,
    check: bool = True,
    blocks: int = 6,
    jobs_dir: Path | None = None,
    adapted_dir: Path | None = None,
) -> AdaptJob:
    """Start ``malaria adapt`` on uploaded fields (``items``: (name, bytes), zips opened) and
    their boxes (``annotations``: the bytes of a file in smear_dev's annotations.json format)
    into ``adapted_dir / name`` (default ADAPTED_DIR; the job's folder in ``jobs_dir``,
    default JOBS_DIR), from the model folder ``base``; ``blocks``: characters of a field's
    name that name its block of shots (the check leaves one block out at a time).

    Everything that can be checked is checked first: raises AnnotationError (the boxes or
    fields cannot be used: the message says why) or ValueError (a bad name, a model of that
    name already there), and then nothing is started or left behind."""
    if not NAME.fullmatch(name):
        raise ValueError(
            f"name the adapted model with letters, digits, - and _ (up to 40), got {name!r}"
        )
    out = (adapted_dir or ADAPTED_DIR) / name
    if out.exists():
        raise ValueError(f"{out} exists: choose another name")
    folder = (jobs_dir or JOBS_DIR) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    try:
        count = _write_fields(items, folder / "fields")
        (folder / "annotations.json").write_bytes(annotations)
        read_annotations(folder / "fields", folder / "annotations.json")
    except AnnotationError as exc:  # said of the upload, not of the folder it was put in
        shutil.rmtree(folder, ignore_errors=True)
        raise AnnotationError(str(exc).replace(f"{folder}/", "")) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    command = [sys.executable, "-m", "core", "adapt", str(folder / "fields")]
    command += ["--annotations", str(folder / "annotations.json"), "--out", str(out)]
    command += ["--weights", str(base), "--blocks", str(blocks)]
    command += [] if check else ["--no-check"]
    with open(folder / "log.txt", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(folder / "returncode"), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,  # not stopped with the server
        )
    record = {"name": name, "out": str(out), "base": str(base), "fields": count}
    write_json(
        folder / "job.json",
        {**record, "check": check, "blocks": blocks, "started": time.time(), "pid": process.pid},
    )
    return AdaptJob(folder)


def adapt_jobs(jobs_dir: Path | None = None) -> list[AdaptJob]:
    """The jobs started so far (in ``jobs_dir``, default JOBS_DIR), the newest first."""
    jobs_dir = jobs_dir or JOBS_DIR
    if not jobs_dir.is_dir():
        return []
    found = [AdaptJob(p) for p in jobs_dir.iterdir() if (p / "job.json").is_file()]
    return sorted(found, key=lambda j: j.folder.name, reverse=True)
