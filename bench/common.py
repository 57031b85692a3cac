"""What every benchmark shares: the data set as PNG files, subsets of it, a timed CLI scoring."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.schema.files import REPO_ROOT

ROOT = REPO_ROOT

_CHILD = (
    "import atexit, resource, runpy, sys; "
    "atexit.register(lambda: print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF)"
    ".ru_maxrss, file=sys.stderr)); "
    "sys.argv = ['malaria', 'score'] + sys.argv[1:]; runpy.run_module('core', "
    "run_name='__main__')"
)


def png_folder(data: Path, cache: Path) -> Path:
    """The data set's PNGs as files on disk (extracted once into ``cache``)."""
    done = cache / ".complete"
    info = data.stat()
    which = f"{data.resolve()} {info.st_size} {info.st_mtime_ns}"  # a replaced zip too
    if not done.is_file() or done.read_text() != which:
        shutil.rmtree(cache, ignore_errors=True)  # another data set's files would be scored too
        with zipfile.ZipFile(data) as zf:
            zf.extractall(cache)
        done.write_text(which)
    return cache


def subset(folder: Path, n: int, out: Path) -> Path:
    files = sorted(folder.rglob("*.png"))
    step = max(1, len(files) // n)
    for f in files[::step][:n]:
        dst = out / f.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copyfile(f, dst)
    return out


def score_cli(
    inputs: Path, weights: Path, tmp: Path, engine: str = "onnx", extra: Sequence[str] = ()
) -> dict:
    """Run ``malaria score`` as a fresh process (``extra``: more arguments); wall time,
    rate, peak RSS of that process, outputs."""
    tag = "_".join([engine, *(a.strip("-=") for a in extra), inputs.name])
    out, summary = tmp / f"r_{tag}.csv", tmp / f"s_{tag}.csv"
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        str(inputs),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--summary",
        str(summary),
        "--engine",
        engine,
        "--no-progress",
        "--store",
        str(tmp / "bench.sqlite"),
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"malaria score failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = int(
        next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB"))
    )
    n = len(pd.read_csv(out))
    return {
        "n": n,
        "seconds": wall,
        "img_per_s": n / wall,
        "peak_rss_mb": rss / 1024,
        "results": out,
        "summary": summary,
    }
