"""A per-patient report an analyst can print or save: one self-contained HTML file.

    malaria report RUN_ID --out report.html [--case C100 ...] [--store FILE]
                          [--threshold T] [--band B] [--group-by case|folder] [--gallery 8]
                          [--no-heatmaps]

For each patient (or folder) of a scored run: cells, errors, cells not counted by the quality
gate (with their reasons), cells in the review band, parasitemia with its 95% Wilson interval,
the screening flag and its rule, the model and its sha256, the run and the date; then a
gallery of the most suspicious counted cells (highest P(Parasitized)) with their heatmaps
(the Explain page's default map), and the cells listed for review. Images are embedded as
PNG data, so the file can be mailed or archived alone; every name is HTML-escaped. A run of
files on this disk shows its images; an uploaded run keeps none, so its report has no gallery.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core.data.images import ImageError
from core.data.sources import open_source, read_image
from core.inference.gate import Gate
from core.inference.store import RunInfo
from core.schema.contract import ModelFolder, WeightsError
from core.schema.labels import file_name, predicted_class
from core.schema.metrics import group_of, parasitemia_summary
from core.schema.results import REVIEW_BAND, UNCERTAIN, counted, review
from core.schema.screening import Screening

ImageReader = Callable[[str], "np.ndarray | None"]  # result path -> RGB uint8 (H, W, 3)
Heatmaps = Callable[[list[np.ndarray]], list[np.ndarray]]  # images -> overlays, same sizes
REVIEW_ROWS = 40  # cells listed for review per patient; the rest are counted in a line
# The gallery's heatmaps explain this class: where the network found a parasite
HEATMAP_TARGET = "parasitized"


@dataclass(frozen=True)
class ReportInfo:
    """What the report says about where the numbers come from."""

    run_id: str
    model: str  # the model folder, as the dashboard names it
    sha256: str  # of the model's weights
    threshold: float
    screening: Screening  # the "likely infected" flag's rule
    band: float = REVIEW_BAND
    group_by: str = "case"
    gate: str = ""  # what the quality gate checked (core.inference.gate.Gate.describe)
    name: str | None = None  # the run's name, sample and operator, as the analyst gave them
    sample: str | None = None
    operator: str | None = None


def report_info(
    run: RunInfo,
    *,
    threshold: float | None = None,
    band: float = REVIEW_BAND,
    group_by: str = "case",
) -> ReportInfo:
    """What a report of ``run`` says, every number from the run's own model: its threshold
    unless ``threshold``, its screening rule, its gate (``model`` and ``sha256`` name the
    model, for its heatmaps). Raises WeightsError
    if the model folder the run names no longer holds the weights it was scored with (the
    report would mix two models), or cannot flag (no screening rule)."""
    model = ModelFolder.open(run.weights)
    if model.sha256 != run.weights_sha256:
        raise WeightsError(
            f"{run.weights} no longer holds the weights run {run.run_id} was scored with "
            f"({run.weights_sha256[:12]}..., now {model.sha256[:12]}...); a report would mix "
            "two models"
        )
    return ReportInfo(
        run.run_id,
        run.weights,
        model.sha256,
        run.threshold if threshold is None else threshold,
        model.screening,
        band,
        group_by,
        Gate.for_model(model, run.engine).describe(),
        run.name,
        run.sample,
        run.operator,
    )


def _png(image: np.ndarray, *, side: int = 160) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pct(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{x:.2%}"


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
section { page-break-after: always; margin-bottom: 3em; }
table.facts td { padding: 2px 12px 2px 0; vertical-align: top; }
table.facts td:first-child { color: #555; }
.flag { font-weight: bold; color: #8e244d; } .noflag { font-weight: bold; color: #2b6a3b; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 330px; font-size: 12px; }
figcaption { overflow-wrap: anywhere; }  /* long file names wrap inside the figure */
table.cover { border-collapse: collapse; margin-bottom: 2em; }
table.cover td, table.cover th { border-bottom: 1px solid #ddd; padding: 3px 10px; }
table.cover th { text-align: left; } table.cover td.n { text-align: right; }
figure img { width: 160px; height: 160px; image-rendering: auto; }
table.review { border-collapse: collapse; font-size: 12px; }
table.review td, table.review th { border-bottom: 1px solid #ddd; padding: 2px 8px; }
table.review th { text-align: left; }
.muted { color: #666; font-size: 12px; }
@media print { body { margin: 0.5cm; } }
"""


def _with_calls(results: pd.DataFrame, info: ReportInfo) -> pd.DataFrame:
    """Calls at the report's threshold, the review column and each row's group."""
    calls = [
        None if pd.isna(p) else predicted_class(p, info.threshold)
        for p in results["prob_parasitized"]
    ]
    out = results.assign(prediction=calls)
    return out.assign(
        review=review(out, threshold=info.threshold, band=info.band),
        group=[group_of(p, info.group_by, c) for p, c in zip(out["path"], out["case_id"])],
    )


def _gallery(rows: pd.DataFrame, read: ImageReader, heatmaps: Heatmaps | None) -> str:
    if rows.empty:
        return "<p class=muted>No counted cell.</p>"
    shown = [(r, img) for r in rows.itertuples() if (img := read(r.path)) is not None]
    if not shown:
        return (
            "<p class=muted>No images: this run's images are not on this machine (an "
            "uploaded run keeps its results, not its images).</p>"
        )
    maps = heatmaps([img for _, img in shown]) if heatmaps else [None] * len(shown)
    figures = []
    for (r, img), heat in zip(shown, maps):
        pics = f'<img src="{_png(img)}" alt="cell">'
        if heat is not None:
            pics += f' <img src="{_png(heat)}" alt="heatmap">'
        mark = f" · review: {html.escape(r.review)}" if r.review else ""
        figures.append(
            f"<figure>{pics}<figcaption>{_breakable(file_name(r.path))}<br>"
            f"P(Parasitized) {r.prob_parasitized:.3f} · {r.prediction}{mark}"
            "</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(figures) + "</div>"


def _breakable(name: str) -> str:
    """``name`` escaped, with places to wrap after its separators (``_``, ``-``): a long
    cell name wraps at its parts, not in the middle of a number."""
    escaped = html.escape(name)
    for sep in ("_", "-"):
        escaped = escaped.replace(sep, f"{sep}<wbr>")
    return escaped


def _cover(summary: pd.DataFrame, info: ReportInfo) -> str:
    """One row per patient (or folder) of the run: counts, parasitemia and the flag."""
    body = "".join(
        f"<tr><td>{html.escape(str(g))}</td><td class=n>{s['cells']:,}</td>"
        f"<td class=n>{s['scored']:,}</td><td class=n>{s['not_counted']:,}</td>"
        f"<td class=n>{s['errors']:,}</td><td class=n>{s['parasitized']:,}</td>"
        f"<td class=n>{_pct(s['parasitemia'])}</td>"
        f"<td>{_pct(s['ci_low'])} to {_pct(s['ci_high'])}</td><td>{_flag(s)}</td></tr>"
        for g, s in summary.iterrows()
    )
    who = "Patient" if info.group_by == "case" else "Folder"
    return (
        f"<h2>Every {who.lower()} of the run ({len(summary):,})</h2><table class=cover><tr>"
        f"<th>{who}</th><th>images</th><th>counted</th><th>not counted</th><th>errors</th>"
        "<th>parasitized</th><th>parasitemia</th><th>95% interval</th><th>flag</th></tr>"
        f"{body}</table>"
    )


def _flag(s: pd.Series) -> str:
    if s["likely_infected"]:
        return "<span class=flag>likely infected</span>"
    return "<span class=noflag>not flagged</span>"


def _run_facts(info: ReportInfo) -> str:
    """The run's name, sample and operator, those it has, as one line."""
    given = [(k, getattr(info, k)) for k in ("name", "sample", "operator")]
    return " · ".join(f"{k} {html.escape(str(v))}" for k, v in given if v)


def _review_table(rows: pd.DataFrame) -> str:
    """The rows for review: uncertain ones with their call, the others not counted (their
    call would count for nothing)."""
    if rows.empty:
        return "<p class=muted>No cell of this patient needs review.</p>"
    body = "".join(
        f"<tr><td>{html.escape(file_name(r.path))}</td><td>{html.escape(r.review)}</td>"
        f"<td>{r.prob_parasitized:.3f}</td>"
        f"<td>{r.prediction if r.review == UNCERTAIN else 'not counted'}</td></tr>"
        for r in rows.head(REVIEW_ROWS).itertuples()
    )
    more = (
        f"<p class=muted>and {len(rows) - REVIEW_ROWS:,} more (the cell CSV lists all)</p>"
        if len(rows) > REVIEW_ROWS
        else ""
    )
    return (
        "<table class=review><tr><th>cell</th><th>why</th><th>P(Parasitized)</th>"
        f"<th>call</th></tr>{body}</table>{more}"
    )


def _section(
    group: str,
    s: pd.Series,
    rows: pd.DataFrame,
    info: ReportInfo,
    date: str,
    read: ImageReader,
    heatmaps: Heatmaps | None,
    gallery: int,
) -> str:
    flag = _flag(s)
    top = rows[counted(rows)].sort_values("prob_parasitized", ascending=False).head(gallery)
    for_review = rows[rows["review"] != ""].sort_values(["review", "path"])
    reasons = rows.loc[
        rows["error"].isna() & (rows["review"] != "") & (rows["review"] != UNCERTAIN), "review"
    ].value_counts()
    why = "; ".join(f"{html.escape(k)}: {v}" for k, v in reasons.items())
    facts = [
        ("Patient" if info.group_by == "case" else "Folder", html.escape(group)),
        (
            "Cells",
            f"{s['cells']:,} images: {s['scored']:,} counted, {s['errors']:,} errors "
            f"(unreadable), {s['not_counted']:,} not counted by the quality gate"
            + (f" ({why})" if why else ""),
        ),
        (
            "Uncertain",
            f"{s['uncertain']:,} counted cells with P(Parasitized) within "
            f"{info.band:g} of the threshold {info.threshold:g}: check them",
        ),
        (
            "Parasitemia",
            f"<b>{_pct(s['parasitemia'])}</b> ({s['parasitized']:,} of "
            f"{s['scored']:,} counted cells called Parasitized); 95% Wilson "
            f"interval {_pct(s['ci_low'])} to {_pct(s['ci_high'])}",
        ),
        (
            "Screening flag",
            f"{flag}: flagged when {html.escape(info.screening.describe())}"
            + (
                f"; here {s['confident']:,} such calls, p = {s['flag_p']:.2g}"
                if info.screening.rule == "calls"
                else ""
            ),
        ),
        ("Model", f"{html.escape(info.model)} · weights sha256 <code>{info.sha256}</code>"),
        (
            "Run",
            f"{html.escape(info.run_id)}"
            + (f" · {_run_facts(info)}" if _run_facts(info) else "")
            + f" · threshold {info.threshold:g} · review band "
            f"±{info.band:g}" + (f" · quality gate: {html.escape(info.gate)}" if info.gate else ""),
        ),
        ("Report made", date),
    ]
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
    return (
        f"<section><h2>{html.escape(group)}</h2><table class=facts>{table}</table>"
        f"<h3>The {len(top)} most suspicious counted cells</h3>"
        "<p class=muted>Highest P(Parasitized) first; beside each, the heatmap of where "
        "the network found evidence of a parasite (red: most).</p>"
        f"{_gallery(top, read, heatmaps)}"
        f"<h3>Cells for review ({len(for_review):,})</h3>{_review_table(for_review)}"
        "</section>"
    )


def render_report(
    results: pd.DataFrame,
    info: ReportInfo,
    *,
    groups: Sequence[str] | None = None,
    read: ImageReader = lambda path: None,
    heatmaps: Heatmaps | None = None,
    gallery: int = 8,
    now: datetime | None = None,
) -> str:
    """The HTML report of result rows (RESULT_COLUMNS) for ``groups`` (default: every group,
    in the summary's order). ``read(path)`` gives a row's image or None; ``heatmaps(images)``
    their overlays. Raises ValueError naming groups that are not in the results, or for a
    ``gallery`` below 0."""
    if gallery < 0:
        raise ValueError(f"the gallery must hold 0 or more cells, got {gallery}")
    rows = _with_calls(results, info)
    summary = parasitemia_summary(rows, group_by=info.group_by, screening=info.screening)
    summary = summary.set_index("group")
    wanted = list(summary.index) if groups is None else list(groups)
    missing = [g for g in wanted if g not in summary.index]
    if missing:
        raise ValueError(
            f"not in this run: {', '.join(missing)}; it holds "
            f"{', '.join(map(str, summary.index[:20]))}"
        )
    date = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        _section(g, summary.loc[g], rows[rows["group"] == g], info, date, read, heatmaps, gallery)
        for g in wanted
    ]
    title = f"Malaria screening report · run {html.escape(info.name or info.run_id)}"
    facts = _run_facts(info)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_CSS}</style></head><body><section><h1>{title}</h1>"
        f"<p>Run {html.escape(info.run_id)}{' · ' + facts if facts else ''} · model "
        f"{html.escape(info.model)} · flagged when {html.escape(info.screening.describe())} · "
        f"{date}</p>"
        "<p class=muted>Single-cell calls of a MobileNetV2 on thin-smear crops. A screening "
        "aid, not a diagnosis: cells for review need a human; the flag is a statistical "
        "statement about the counted cells.</p>"
        f"{_cover(summary, info)}</section>" + "".join(sections) + "</body></html>"
    )


def disk_reader(path: str) -> np.ndarray | None:
    """A result's image from this disk (files and zip members), or None if it is gone."""
    try:
        return read_image(open_source(path))
    except (ImageError, OSError):
        return None


def model_heatmaps(folder: Path | str) -> Heatmaps:
    """Overlays of the Explain page's default map for the Parasitized class (where the
    network found evidence of a parasite), from the model in ``folder``."""
    # PyTorch only for heatmaps: a report without them, and the scoring path, never load it
    from core.explain.cams import explain, explainable
    from core.nets.model import load_model

    loaded = load_model(folder)
    net = explainable(loaded)

    def run(images: list[np.ndarray]) -> list[np.ndarray]:
        maps = explain(loaded, images, net=net, target=HEATMAP_TARGET, faithfulness=False)
        return [e.overlay for e in maps]

    return run
