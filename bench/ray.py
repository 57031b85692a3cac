"""Scoring on Ray (``malaria score --ray``) against the local path, on this machine, and what
that says about N machines. Every figure comes from this one run.

    python -m bench.ray --data ../shared/data/nih_cells_dev.zip [--cells 2000]   (make bench)

1. Same answers: a zip of ``--cells`` cells taken evenly from the data, plus one broken member,
   scored by ``malaria score`` locally and with ``--ray local`` (fresh processes); the two CSVs are
   compared row by row (order, keys, probabilities, calls, quality, errors, duplicates).
2. End to end, process and cluster start included: cells/s, and the driver's peak RSS at
   half the cells, all of them and the whole data zip (the actors are other processes).
3. Scoring into the result store on a started cluster: the local path, Ray with one actor and
   with one actor per core, each run on the cells and on twice as many; the difference gives
   the CPU seconds one more cell costs (all processes; the driver's share apart), which the
   other jobs on a shared machine move far less than wall time.
4. A paper estimate for N machines from the actors' cells per CPU-second, capped by the
   driver's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd

from bench.common import score_cli
from core.schema.contract import DEFAULT_WEIGHTS
from core.schema.files import REPO_ROOT, cpu_count

BYTES_PER_CELL = 162e6 / 14_008  # the development zip: 162 MB for 14,008 cells


def cell_zip(data: Path, n: int, out: Path) -> Path:
    """``n`` cells taken evenly from the zip ``data`` (their folders kept), and a broken
    member, as the zip ``out``."""
    with zipfile.ZipFile(data) as src, zipfile.ZipFile(out, "w") as dst:
        names = sorted(i for i in src.namelist() if i.lower().endswith(".png"))
        for name in names[:: max(1, len(names) // n)][:n]:
            dst.writestr(name, src.read(name))
        dst.writestr("broken/not_a_cell.png", b"\x89PNG\r\n\x1a\n truncated")
    return out


def compare(local_csv: Path, ray_csv: Path) -> dict:
    """How the Ray CSV differs from the local one."""
    a, b = pd.read_csv(local_csv), pd.read_csv(ray_csv)
    same_rows = len(a) == len(b) and (a["path"] == b["path"]).all()
    cols = ("case_id", "label", "prediction", "quality", "error", "duplicate_of", "review")
    return {
        "rows": (len(a), len(b)),
        "same_order": bool(same_rows),
        "max_prob_diff": float((a["prob_parasitized"] - b["prob_parasitized"]).abs().max()),
        "differing": {c: int((~((a[c] == b[c]) | (a[c].isna() & b[c].isna()))).sum()) for c in cols}
        if same_rows
        else {},
        "errors": int(b["error"].notna().sum()),
    }


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_by_pid(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of process ``root`` and every process below it (a local
    Ray cluster's raylet, workers and actors are), by pid."""
    stats: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            rest = text[text.rindex(")") + 2 :].split()
            stats[int(d.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
    below: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        below.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
        todo.extend(below.get(pid, []))
    return out


class CpuMeter:
    """CPU seconds used by this process and all below it during a ``with`` block, and by
    this process alone. Sampled every 50 ms, so an actor that exits before the block ends
    still counts (but for its last 50 ms); unlike wall time, barely moved by other jobs."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __enter__(self) -> CpuMeter:
        self.start = _cpu_by_pid(self.pid)
        self.last = dict(self.start)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self.stop.wait(0.05):
            self.last.update(_cpu_by_pid(self.pid))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.last.update(_cpu_by_pid(self.pid))
        self.total = sum(v - self.start.get(pid, 0.0) for pid, v in self.last.items())
        self.own = self.last[self.pid] - self.start[self.pid]


def scoring_costs(data: Path, double: Path, weights: Path, tmp: Path) -> dict:
    """What one more cell costs, scored into a result store as ``malaria score`` does, locally
    and on a local Ray cluster with 1 actor and with one per CPU: from runs on ``data`` and on
    ``double`` (twice the cells), the difference in CPU seconds (all processes, and the
    driver's own) over the difference in cells, which leaves out what does not grow with the
    cells (actor start-up); wall seconds of each run; the cluster's start."""
    from core.data.sources import iter_sources, unique_paths
    from core.inference.cluster import RayScorer, connect
    from core.inference.engines import load_engine
    from core.inference.pipeline import iter_scored, score_sources
    from core.inference.store import ResultStore

    engine = load_engine(weights)
    with CpuMeter() as listing:
        more = unique_paths(iter_sources([double]))
    out: dict = {
        "engine": engine.name,
        "cpus": cpu_count(),
        "list_cpu": listing.own / len(more),
    }
    sources = unique_paths(iter_sources([data]))

    def run(scorer, some, store: ResultStore) -> tuple[float, float, float]:
        run_id = store.new_run(
            inputs=[str(data)],
            weights=str(weights),
            weights_sha256=engine.sha256,
            threshold=engine.contract.threshold,
            engine=engine.name,
            kind="files",
        )
        t0 = time.perf_counter()
        with CpuMeter() as cpu:
            score_sources(some, engine, store=store, run_id=run_id, collect=False, scorer=scorer)
        return time.perf_counter() - t0, cpu.total, cpu.own

    def measure(name: str, scorer) -> None:
        with ResultStore(tmp / f"{name}.sqlite") as store:
            a, b = run(scorer, sources, store), run(scorer, more, store)
        n = len(more) - len(sources)
        out[name] = {
            "wall": (a[0], b[0]),
            "cpu_per_cell": (b[1] - a[1]) / n,
            "driver_per_cell": (b[2] - a[2]) / n,
        }

    # locally before and after Ray: the other jobs on the machine come and go
    measure("local_before", iter_scored)
    t0 = time.perf_counter()
    with connect("local"):
        out["cluster_start_s"] = time.perf_counter() - t0
        # a fresh cluster starts its own helper actors on its first dataset: not per cell
        for _ in RayScorer(actors=out["cpus"])(sources[:256], engine):
            pass
        measure("ray_1", RayScorer(actors=1))
        measure("ray_n", RayScorer(actors=out["cpus"]))
    measure("local_after", iter_scored)
    out["n"] = (len(sources), len(more))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/nih_cells_dev.zip")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--cells", type=int, default=2000)
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(f"machine: {cpu_count()} cores, load average {load:.1f} at the start; data: {args.data}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        full = cell_zip(args.data, args.cells, tmp / "cells.zip")
        half = cell_zip(args.data, args.cells // 2, tmp / "half.zip")
        score_cli(half, args.weights, tmp, "onnx-int8")  # warm the ONNX cache, the page cache
        local = score_cli(full, args.weights, tmp, "onnx-int8")
        ray = score_cli(full, args.weights, tmp, "onnx-int8", ("--ray", "local"))
        ray_half = score_cli(half, args.weights, tmp, "onnx-int8", ("--ray", "local"))
        # all of the data set, read from its zip by the actors: does the driver stay flat?
        ray_all = score_cli(args.data, args.weights, tmp, "onnx-int8", ("--ray", "local"))
        same = compare(local["results"], ray["results"])
        double = cell_zip(args.data, 2 * args.cells, tmp / "double.zip")
        rates = scoring_costs(full, double, args.weights, tmp)

    n = args.cells
    print(f"\n## Same answers ({n:,} cells and one broken member in a zip, {rates['engine']})")
    print(
        f"rows local/ray {same['rows'][0]}/{same['rows'][1]}, same keys in the same order: "
        f"{same['same_order']}, max |P local - P ray| {same['max_prob_diff']:.1e}, error rows "
        f"{same['errors']}, rows differing in other columns: {same['differing']}"
    )
    print("\n## End to end (malaria score, process and cluster start included)")
    print(f"{'':34s} {'cells':>6s} {'seconds':>8s} {'cells/s':>8s} {'driver peak RSS':>16s}")
    for label, r in (
        ("local", local),
        ("--ray local", ray),
        ("--ray local, half the cells", ray_half),
        ("--ray local, the whole data zip", ray_all),
    ):
        print(
            f"{label:34s} {r['n']:6d} {r['seconds']:8.1f} {r['img_per_s']:8.0f} "
            f"{r['peak_rss_mb']:13.0f} MB"
        )
    cpus, (n1, n2) = rates["cpus"], rates["n"]
    print(
        f"\n## Scoring into the result store, on a started cluster ({n1:,} then {n2:,} cells; "
        "CPU per cell from the difference, all processes counted)"
    )
    print(
        f"{'':32s} {'wall s':>13s} {'CPU ms/cell':>12s} {'of it driver':>13s} "
        f"{'cells per CPU-s':>16s}"
    )
    for key, label in (
        ("local_before", "local path (before Ray)"),
        ("ray_1", "Ray, 1 actor"),
        ("ray_n", f"Ray, {cpus} actors (one per core)"),
        ("local_after", "local path (after Ray)"),
    ):
        r = rates[key]
        walls = f"{r['wall'][0]:5.1f} / {r['wall'][1]:5.1f}"
        print(
            f"{label:32s} {walls:>13s} {1e3 * r['cpu_per_cell']:12.2f} "
            f"{1e3 * r['driver_per_cell']:13.2f} {1 / r['cpu_per_cell']:16.0f}"
        )
    local_cpu = (rates["local_before"]["cpu_per_cell"] + rates["local_after"]["cpu_per_cell"]) / 2
    ray_n = rates["ray_n"]
    actor_cpu = ray_n["cpu_per_cell"] - ray_n["driver_per_cell"]
    driver_cpu = ray_n["driver_per_cell"] + rates["list_cpu"]
    r1, d = 1 / actor_cpu, 1 / driver_cpu
    print(
        f"Ray costs {ray_n['cpu_per_cell'] / local_cpu:.2f}x the CPU per cell of the local "
        f"path; starting the local cluster took {rates['cluster_start_s']:.1f} s"
    )
    print(
        f"per actor (its machine's Ray processes included): {r1:,.0f} cells per CPU-second; "
        f"the driver (listing {1e3 * rates['list_cpu']:.3f} ms/cell, records, store): "
        f"{d:,.0f} cells per CPU-second, its ceiling"
    )
    print(
        f"\n## Paper estimate: N machines of {cpus} cores, dedicated to the actors ({r1:,.0f} "
        f"cells/s per core, linear in cores and machines), the driver on a core of its own "
        f"(ceiling {d:,.0f} cells/s), storage serving {BYTES_PER_CELL / 1e3:.1f} kB per cell"
    )
    print(
        f"{'N':>4s} {'cells/s':>9s} {'cells/hour':>12s} {'hours per 10M':>14s} "
        f"{'storage MB/s':>13s}"
    )
    for machines in (1, 2, 4, 8, 16, 32, 64):
        rate = min(machines * cpus * r1, d)
        capped = " (driver-bound)" if rate == d else ""
        print(
            f"{machines:4d} {rate:9,.0f} {rate * 3600:12,.0f} {1e7 / rate / 3600:14.1f} "
            f"{rate * BYTES_PER_CELL / 1e6:13.1f}{capped}"
        )
    print(
        f"(load average {os.getloadavg()[0]:.1f} at the end: the machine is shared, so wall "
        "times are noisy; CPU per cell much less so)"
    )


if __name__ == "__main__":
    main()
