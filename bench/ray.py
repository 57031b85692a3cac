"""Scoring on Ray (``core.score --ray``) against the local path, on this machine, and what
that says about N machines. Every figure comes from this one run.

    python -m bench.ray --data ../shared/data/nih_cells_dev.zip [--cells 2000]   (make bench)

1. Same answers: a zip of ``--cells`` cells taken evenly from the data, plus one broken member,
   scored by ``core.score`` locally and with ``--ray local`` (fresh processes); the two CSVs are
   compared row by row (order, keys, probabilities, calls, quality, errors, duplicates).
2. End to end, process and cluster start included: cells/s and the driver's peak RSS at half
   and at all of the cells (the actors are other processes).
3. Scoring alone, on a started cluster: the local path, Ray with one actor and with one actor
   per core (cells/s from the first batch back to the last, so actor start-up is left out);
   and the driver's own work per cell (listing, records, the result store), its ceiling.
4. A paper estimate for N machines from the per-actor rate, capped by the driver's ceiling.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from bench.common import score_cli
from core.contract import DEFAULT_WEIGHTS
from core.files import REPO_ROOT

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


def scoring_rates(data: Path, double: Path, weights: Path, tmp: Path) -> dict:
    """cells/s of the scoring alone, local, Ray with 1 actor and with one per CPU, each from
    the difference between scoring ``data`` and ``double`` (twice the cells), which takes out
    what does not grow with the cells (actor start-up); that fixed cost; the seconds to start
    the cluster; the driver's own cells/s."""
    import pyarrow as pa

    from core.cluster import RayScorer, connect, schemas
    from core.score import iter_scored, load_engine, mark_duplicates, score_sources
    from core.sources import iter_sources, to_record, unique_paths
    from core.store import ResultStore

    engine = load_engine(weights)
    sources = unique_paths(iter_sources([data]))
    more = unique_paths(iter_sources([double]))
    out: dict = {"engine": engine.name}

    def seconds(scorer, some) -> float:
        t0 = time.perf_counter()
        for _ in scorer(some, engine, batch_size=64):
            pass
        return time.perf_counter() - t0

    def rate(name: str, scorer) -> None:
        t1, t2 = seconds(scorer, sources), seconds(scorer, more)
        out[name] = (len(more) - len(sources)) / (t2 - t1)
        out[f"{name}_fixed_s"] = t1 - len(sources) / out[name]

    # local before and after Ray: the other jobs on the machine come and go
    rate("local_before", iter_scored)
    cpus = out["cpus"] = os.cpu_count() or 1
    t0 = time.perf_counter()
    with connect("local"):
        out["cluster_start_s"] = time.perf_counter() - t0
        rate("ray_1", RayScorer(actors=1))
        rate("ray_n", RayScorer(actors=cpus))
    rate("local_after", iter_scored)
    rows = [r for batch in iter_scored(sources, engine) for r in batch]

    # The driver's share: list the inputs, make the records, store and mark the rows coming
    # back; the scoring is replaced by the rows already computed.
    t0 = time.perf_counter()
    listed = unique_paths(iter_sources([data]))
    records = [to_record(s) for s in listed]
    t_list = time.perf_counter() - t0
    batches = [rows[i : i + 64] for i in range(0, len(rows), 64)]
    tables = [pa.Table.from_pylist(b, schema=schemas()[1]) for b in batches]

    def replay(*_args, seen: dict[str, str], **_kw) -> Iterator[list[dict]]:
        for table in tables:  # as RayScorer takes the actors' batches
            batch = table.to_pylist()
            mark_duplicates(batch, seen)
            yield batch

    with ResultStore(tmp / "driver.sqlite") as store:
        run = store.new_run(
            inputs=[str(data)],
            weights=str(weights),
            weights_sha256=engine.sha256,
            threshold=engine.contract.threshold,
            engine=engine.name,
            kind="files",
        )
        t0 = time.perf_counter()
        score_sources(listed, engine, store=store, run_id=run, collect=False, scorer=replay)
        t_store = time.perf_counter() - t0
    out["driver"] = len(records) / (t_list + t_store)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/nih_cells_dev.zip")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--cells", type=int, default=2000)
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(
        f"machine: {os.cpu_count()} cores, load average {load:.1f} at the start; data: {args.data}"
    )
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
        rates = scoring_rates(full, double, args.weights, tmp)

    n = args.cells
    print(f"\n## Same answers ({n:,} cells and one broken member in a zip, {rates['engine']})")
    print(
        f"rows local/ray {same['rows'][0]}/{same['rows'][1]}, same keys in the same order: "
        f"{same['same_order']}, max |P local - P ray| {same['max_prob_diff']:.1e}, error rows "
        f"{same['errors']}, rows differing in other columns: {same['differing']}"
    )
    print("\n## End to end (python -m core.score, process and cluster start included)")
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
    cpus = rates["cpus"]
    r1, rc, d = rates["ray_1"], rates["ray_n"], rates["driver"]
    rl = (rates["local_before"] + rates["local_after"]) / 2
    print(
        f"\n## Scoring alone, on a started cluster (cells/s from {n:,} and {2 * n:,} cells: "
        "the difference in cells over the difference in seconds)"
    )
    print(f"local path, before Ray                    {rates['local_before']:8.0f}")
    print(f"Ray, 1 actor                              {r1:8.0f}")
    print(f"Ray, {cpus} actors (one per core)              {rc:8.0f}")
    print(f"local path, after Ray                     {rates['local_after']:8.0f}")
    print(f"Ray with {cpus} actors / local (mean of both)   {rc / rl:8.2f}")
    print(
        f"starting the local cluster {rates['cluster_start_s']:.1f} s; then a fixed "
        f"{rates['ray_1_fixed_s']:.1f} s (1 actor) and {rates['ray_n_fixed_s']:.1f} s ({cpus} "
        f"actors) per run to start the actors, against {rates['local_before_fixed_s']:.1f} s "
        "locally"
    )
    print(f"driver alone (list, records, store; no scoring): {d:,.0f} cells/s")
    eff = rc / (cpus * r1)
    print(
        f"\n## Paper estimate for N machines of {cpus} cores like this one "
        f"(per-actor {r1:.0f} cells/s x {cpus} actors x {eff:.2f} measured scaling per machine, "
        f"capped by the driver's {d:,.0f} cells/s; storage must serve "
        f"{BYTES_PER_CELL / 1e3:.1f} kB per cell)"
    )
    print(
        f"{'N':>4s} {'cells/s':>9s} {'cells/hour':>12s} {'hours per 10M':>14s} "
        f"{'storage MB/s':>13s}"
    )
    for machines in (1, 2, 4, 8, 16, 32, 64):
        rate = min(machines * cpus * r1 * eff, d)
        capped = " (driver-bound)" if rate == d else ""
        print(
            f"{machines:4d} {rate:9,.0f} {rate * 3600:12,.0f} {1e7 / rate / 3600:14.1f} "
            f"{rate * BYTES_PER_CELL / 1e6:13.1f}{capped}"
        )
    print(
        f"(load average {os.getloadavg()[0]:.1f} at the end: the machine is shared, so the "
        "rates are lower bounds and only the ratios within this run compare)"
    )


if __name__ == "__main__":
    main()
