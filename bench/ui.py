"""The Explain and Score pages in a real browser, timed as a user sees them.

    python -m bench.ui --data ../shared/data/nih_cells_dev.zip      (part of `make bench`)

Explain: the page opened as the fresh server's first request (a sample cell, the three default
maps), then another cell picked, then the layer and the class changed; each timed until the
three maps of that run are drawn (their captions, with each map's size and time, are on
screen) and until ROAD, which arrives after the maps, is in too. First on a server with an
empty ONNX cache (as after installing: the model's ONNX and int8 graphs are built while the
page waits), its first view only, then on a server started again on that cache (as every
later start).

Score:
the dashboard is started fresh, as `make run` starts it, and driven by Debian's Chromium
through Playwright. Timed from handing the file to the uploader until the page has finished
rendering (results table, thumbnails, parasitemia chart, downloads): a zip of 1,000 cells as
the first scoring after the server starts (model loading included), the same upload pressed
again (served from the result cache), then the whole data set as one zip. The baseline,
measured in the same run, is `malaria score` on the same 1,000 cells as PNG files
(process start included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from bench.common import png_folder, score_cli, subset
from bench.serve import CHROMIUM_ARGS, IDLE, SCRIPT_STATE, running_app, wait_for_rerun
from core.schema.contract import DEFAULT_WEIGHTS
from core.schema.files import REPO_ROOT
from dashboard import reaper

ROOT = REPO_ROOT


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*.png")):
            zf.write(f, f.relative_to(folder))
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (VmRSS) or its peak so far (VmHWM), Linux."""
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) / 1024
    )


def reset_peak(pid: int) -> bool:
    """Start the process's peak RSS (VmHWM) again from its RSS now (Linux; False if refused)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def noise_zip(out: Path, mb: int) -> Path:
    """A zip of ``mb`` MiB of random bytes (stored: it cannot be compressed), one member."""
    with (
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf,
        zf.open("noise.bin", "w", force_zip64=True) as f,
    ):
        for _ in range(mb):
            f.write(os.urandom(2**20))
    return out


def upload_memory(page, url: str, pid: int, upload: Path, *, timeout_s: float = 600) -> dict:
    """The server's RSS around one upload to the Score page, before Score is pressed: before
    it (MB), its peak while the file arrived and is kept, and what is held once the page is
    idle again, the last two also as a ratio to the file's size."""
    from playwright.sync_api import expect

    ms = timeout_s * 1000
    page.goto(f"{url}/score")
    page.get_by_text("Score cells").first.wait_for(timeout=ms)
    page.wait_for_function(IDLE, timeout=ms)
    time.sleep(2)  # the page's last messages out
    before = rss_mb(pid)
    exact = reset_peak(pid)
    page.locator("input[type=file]:not([webkitdirectory])").first.set_input_files(str(upload))
    expect(page.get_by_role("button", name="Score", exact=True)).to_be_enabled(timeout=ms)
    page.wait_for_function(IDLE, timeout=ms)
    time.sleep(2)
    size = upload.stat().st_size / 2**20
    peak, held = rss_mb(pid, "VmHWM"), rss_mb(pid)
    return {
        "size_mb": size,
        "before_mb": before,
        "peak_x": (peak - before) / size,
        "held_x": (held - before) / size,
        "peak_exact": exact,
    }


def upload_and_score(
    page, url: str, upload: Path, *, fresh: bool = True, timeout_s: float = 600
) -> dict:
    """Seconds to upload ``upload`` (a file, or a folder through the folder uploader) and to
    score and show it; the Cells figure on the page."""
    from playwright.sync_api import expect

    ms = timeout_s * 1000
    if fresh:
        page.goto(f"{url}/score")
        page.get_by_text("Score cells").first.wait_for(timeout=ms)
        page.wait_for_function(IDLE, timeout=ms)
    t0 = time.perf_counter()
    if fresh:
        which = "[webkitdirectory]" if upload.is_dir() else ":not([webkitdirectory])"
        page.locator(f"input[type=file]{which}").first.set_input_files(str(upload))
    button = page.get_by_role("button", name="Score", exact=True)
    expect(button).to_be_enabled(timeout=ms)  # the upload has reached the server
    page.wait_for_function(IDLE, timeout=ms)
    t1 = time.perf_counter()
    button.click()
    wait_for_rerun(page, ms)
    page.get_by_text("Download summary (CSV)").wait_for(timeout=ms)
    t2 = time.perf_counter()
    if page.get_by_text("Traceback").count():
        raise RuntimeError(f"the page shows a traceback after scoring {upload.name}")
    cells = page.get_by_test_id("stMetricValue").first.inner_text()
    return {
        "upload_s": t1 - t0,
        "score_show_s": t2 - t1,
        "total_s": t2 - t0,
        "cells": int(cells.replace(",", "")),
    }


MAPS = 3  # the Explain page's default methods


# A map drawn by the run the step started: its caption ("hirescam · features.6 · 16x16 map ·
# 103 ms") outside the elements Streamlit marks stale while a rerun replaces them, once a run
# has started since the step (_WATCH; a page opened anew has no old maps). Counted rather than
# the "ROAD: computing…" placeholders, which a quick ROAD replaces before a poll can see them.
_WATCH = f"""() => {{
    window.__ranSince = false;
    const seen = () => {{ if ({SCRIPT_STATE} !== 'notRunning') window.__ranSince = true; }};
    new MutationObserver(seen).observe(document.body, {{attributes: true, subtree: true,
        attributeFilter: ['data-test-script-state']}});
}}"""
_MAPS_DRAWN = (
    "n => window.__ranSince !== false"
    " && [...document.querySelectorAll('[data-testid=stCaptionContainer]')]"
    ".filter(e => !e.closest('[data-stale=true]') && / map · [0-9,]+ ms$/.test(e.innerText))"
    ".length >= n"
)


def _explain_step(page, act, timeout_ms: float) -> tuple[float, float]:
    """Seconds from ``act()`` until the default maps are drawn, and until ROAD is in too."""
    computing = page.get_by_text("ROAD: computing…")
    if page.url != "about:blank":
        page.evaluate(_WATCH)
    t0 = time.perf_counter()
    act()
    page.wait_for_function(_MAPS_DRAWN, arg=MAPS, timeout=timeout_ms)
    t_maps = time.perf_counter() - t0
    page.wait_for_function(IDLE, timeout=timeout_ms)  # the run that drew them has ended
    if computing.count() or page.get_by_text("Traceback").count():
        raise RuntimeError("the Explain page did not finish its ROAD scores")
    return t_maps, time.perf_counter() - t0


def _pick(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).first.click()  # a Streamlit selectbox opens on click
    page.get_by_role("option", name=option).first.click()


def explain_timings(
    page, url: str, *, first_only: str = "", timeout_s: float = 300
) -> list[tuple[str, float, float]]:
    """The Explain page, timed from a fresh server (see the module docstring); only its first
    view, so labelled, with ``first_only``."""
    ms = timeout_s * 1000

    def first() -> None:
        page.goto(f"{url}/explain")

    if first_only:
        return [(first_only, *_explain_step(page, first, ms))]
    other = sorted((ROOT / "dashboard" / "samples" / "Parasitized").glob("*.png"))[-1]
    steps = [
        ("first view after the server starts", first),
        (
            "another cell picked",
            lambda: _pick(page, "…or a sample cell", f"samples/Parasitized/{other.name}"),
        ),
        ("layer changed (features.3)", lambda: _pick(page, "Layer", "features.3")),
        ("class changed (parasitized)", lambda: _pick(page, "Explain the class", "parasitized")),
    ]
    return [(label, *_explain_step(page, act, ms)) for label, act in steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/nih_cells_dev.zip")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--skip-all", action="store_true", help="only the 1,000-cell upload")
    p.add_argument("--explain-only", action="store_true", help="only the Explain page")
    p.add_argument("--score-only", action="store_true", help="only the Score page")
    p.add_argument(
        "--upload-mb",
        type=int,
        default=512,
        help="size of the random zip whose upload's memory is measured",
    )
    p.add_argument("--memory-only", action="store_true", help="only the upload's memory")
    args = p.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("bench.ui skipped: playwright is not installed (pip install playwright)")
        return
    if not Path(chromium).exists():
        print("bench.ui skipped: Debian's chromium is not installed (apt-get install chromium)")
        return

    if args.memory_only:
        return memory_page(args, chromium)
    if args.score_only:
        return score_page(args, chromium)
    explain_rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        env = {"MALARIA_STORE": str(tmp / "ui.sqlite"), "MALARIA_CACHE": str(tmp / "cache")}
        for first_only in ("first view after installing (no ONNX cache)", ""):
            log = tmp / f"explain{len(explain_rows)}.log"
            with running_app(env, log) as (url, _), sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                explain_rows += explain_timings(
                    browser.new_page(viewport={"width": 1400, "height": 1000}),
                    url,
                    first_only=first_only,
                )
                browser.close()
    print("\n## Explain page in Chromium (three default maps; ROAD arrives after them)")
    print(f"{'step':40s} {'maps drawn':>11s} {'with ROAD':>10s}")
    for label, t_maps, t_all in explain_rows:
        print(f"{label:40s} {t_maps:10.1f}s {t_all:9.1f}s")
    if not args.explain_only:
        score_page(args, chromium)
        memory_page(args, chromium)


def memory_page(args: argparse.Namespace, chromium: str) -> None:
    """The server's memory around an upload of ``--upload-mb`` MiB of random bytes, on a fresh
    server whose model is loaded (Explain opened first: else the explainer, which a quiet
    server loads by itself, would land in the upload's figures), before Score is pressed
    (nothing can be scored in it)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        upload = noise_zip(tmp / "noise.zip", args.upload_mb)
        env = {"MALARIA_STORE": str(tmp / "ui.sqlite")}
        with running_app(env, tmp / "memory.log") as (url, pid), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            _explain_step(page, lambda: page.goto(f"{url}/explain"), 300_000)
            r = upload_memory(page, url, pid, upload)
            browser.close()
    print(
        f"\n## Score page: server RSS around one upload of {r['size_mb']:,.0f} MB (random zip, "
        f"before Score), as a ratio to the file's size"
    )
    print(
        f"RSS before {r['before_mb']:,.0f} MB; while it arrived: peak +{r['peak_x']:.2f}x"
        f"{'' if r['peak_exact'] else ' (the process peak: VmHWM could not be reset)'}; held "
        f"once the page is idle: +{r['held_x']:.2f}x"
    )


def score_page(args: argparse.Namespace, chromium: str) -> None:
    """Time the Score page on a fresh server and print the table (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    folder = png_folder(args.data, ROOT / ".cache" / "bench_png")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        small = subset(folder, args.n, tmp / f"subset_{args.n}")
        score_cli(small, DEFAULT_WEIGHTS, tmp)  # warm the ONNX cache and the page cache
        cli = score_cli(small, DEFAULT_WEIGHTS, tmp)
        cli_all = None if args.skip_all else score_cli(args.data, DEFAULT_WEIGHTS, tmp)
        small_zip = zip_folder(small, tmp / f"cells_{args.n}.zip")
        env = {"MALARIA_STORE": str(tmp / "ui.sqlite")}
        with running_app(env, tmp / "streamlit.log") as (url, pid), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/score")
            page.wait_for_function(IDLE, timeout=120_000)
            idle_mb = rss_mb(pid)
            rows.append(
                (
                    f"{args.n:,} cells, first scoring after start",
                    upload_and_score(page, url, small_zip),
                )
            )
            rows.append(
                (
                    f"{args.n:,} cells, same upload scored again (cached)",
                    upload_and_score(page, url, small_zip, fresh=False),
                )
            )
            loaded_mb = rss_mb(pid)  # the model loaded and a small run on the page
            rows.append(
                (
                    f"{args.n:,} cells as a folder (the folder uploader)",
                    upload_and_score(page, url, small),
                )
            )
            if not args.skip_all:
                zip_mb = args.data.stat().st_size / 2**20
                before_mb, exact = rss_mb(pid), reset_peak(pid)
                rows.append(
                    (
                        f"all cells: {args.data.name} ({zip_mb:.0f} MB)",
                        upload_and_score(page, url, args.data),
                    )
                )
                all_peak_x = (rss_mb(pid, "VmHWM") - before_mb) / zip_mb
                all_held_x = (rss_mb(pid) - before_mb) / zip_mb
            browser.close()
            peak_mb = rss_mb(pid, "VmHWM")
            held_mb = rss_mb(pid)
            # every session gone: the browser closed, then the reaper's grace and two rounds
            time.sleep(reaper.GRACE_S + 2 * reaper.INTERVAL_S)
            after_mb = rss_mb(pid)

    print(
        f"\n## Score page in Chromium (upload -> scored and shown); baseline: malaria score CLI "
        f"on the same {args.n:,} PNG files, {cli['seconds']:.1f} s "
        f"({cli['img_per_s']:.0f} img/s)"
    )
    print(
        f"{'upload':58s} {'cells':>7s} {'upload':>8s} {'score+show':>11s} {'total':>8s} "
        f"{'img/s':>7s} {'x CLI rate':>10s}"
    )
    for label, r in rows:
        print(
            f"{label:58s} {r['cells']:7,d} {r['upload_s']:7.1f}s {r['score_show_s']:10.1f}s "
            f"{r['total_s']:7.1f}s {r['cells'] / r['total_s']:7.0f} "
            f"{r['cells'] / r['total_s'] / cli['img_per_s']:10.2f}"
        )
    print(
        f"dashboard server's RSS: {idle_mb:,.0f} MB idle on the Score page, {loaded_mb:,.0f} "
        f"MB after the {args.n:,}-cell runs (model loaded), peak {peak_mb:,.0f} MB over these "
        f"uploads, {held_mb:,.0f} MB as the browser closed, "
        f"{after_mb:,.0f} MB {reaper.GRACE_S + 2 * reaper.INTERVAL_S:.0f} s later"
    )
    if cli_all is not None:
        print(
            f"the whole zip: malaria score CLI in the same run {cli_all['seconds']:.1f} s "
            f"({cli_all['img_per_s']:.0f} img/s); the page's server while it was uploaded, "
            f"scored and shown, as a ratio to the zip's size: peak +{all_peak_x:.2f}x"
            f"{'' if exact else ' (the process peak: VmHWM could not be reset)'}, held after "
            f"+{all_held_x:.2f}x"
        )


if __name__ == "__main__":
    main()
