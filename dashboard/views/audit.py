"""Audit: the cells whose label the out-of-fold predictions doubt (``malaria audit``), per
patient and one by one with their heatmaps, and a decision on each (keep, relabel, exclude)
saved beside the model for ``malaria train --relabel``."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display
from core.schema.contract import AUDIT_FILE, DECISIONS_FILE, OOF_FILE, ModelFolder
from core.schema.export import to_csv_text
from core.schema.labels import CLASSES, PARASITIZED, UNINFECTED
from core.training.audit import (
    DECISION_COLUMNS,
    DECISIONS,
    AuditError,
    class_thresholds,
    merge_decisions,
    patient_shares,
    read_audit,
    read_decisions_table,
    read_predictions,
    save_decisions,
)
from dashboard import images, resources, state, text

PER_PAGE = 12
PER_ROW = 4  # suspects side by side, each with its heatmap
ALL = "All"


@dataclass(frozen=True)
class SuspectFilters:
    """Which suspects are listed: one patient or ALL, one given label or ALL, and ALL,
    "undecided" or "decided"."""

    patient: str
    label: str
    status: str


@st.cache_data(show_spinner=False, max_entries=4)
def _tables(oof: str, audit: str, stamp: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(out-of-fold predictions, suspects); ``stamp`` (mtimes) makes a rewritten file reread."""
    return read_predictions(oof), read_audit(audit)


# --- this session's decisions: callbacks, run before the page ------------------------------


def _decide(key: str, row: dict) -> None:
    """Keep the radio's choice in the session's decisions, which outlive the widget (a filter
    that hides the cell, another page)."""
    st.session_state["audit_decisions"][row["path"]] = {**row, "decision": st.session_state[key]}


def _session_decisions() -> pd.DataFrame:
    return pd.DataFrame(
        list(st.session_state["audit_decisions"].values()), columns=list(DECISION_COLUMNS)
    )


def _save(path: Path) -> None:
    """Merge this session's decisions into the file (before the rerun draws the counts)."""
    try:
        written = save_decisions(path, _session_decisions())
    except (AuditError, OSError) as exc:
        st.session_state["audit_note"] = f"Not saved: {text.plain(exc)}"
    else:
        st.session_state["audit_note"] = (
            f"Saved; {text.plain(text.model_label(path))} holds {len(written):,} decisions."
        )


# --- reading -----------------------------------------------------------------------------


def read_tables(model: ModelFolder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(out-of-fold predictions, suspects) of the model folder; st.info or st.error and stop
    where it has none or they cannot be read."""
    oof_path, audit_path = model.predictions("oof"), model.audit
    if not oof_path.is_file():
        st.info(
            f"This model folder has no {OOF_FILE}: the audit needs out-of-fold predictions, "
            "each cell predicted by a model that never saw its patient (the patient-grouped "
            "fold runs of `malaria folds` write them)."
        )
        st.stop()
    if not audit_path.is_file():
        st.info(
            f"This model folder has no {AUDIT_FILE} yet. Make it with `malaria audit "
            f"--oof {text.model_label(oof_path)} --out {text.model_label(audit_path)}`."
        )
        st.stop()
    try:
        return _tables(
            str(oof_path),
            str(audit_path),
            (oof_path.stat().st_mtime_ns, audit_path.stat().st_mtime_ns),
        )
    except AuditError as exc:
        st.error(text.plain(exc))
        st.stop()


def saved_decisions(path: Path) -> pd.DataFrame | None:
    """The decisions on file (none yet: an empty table); None, with an error, when the file
    cannot be read: saving is then off."""
    if not path.is_file():
        return pd.DataFrame(columns=list(DECISION_COLUMNS))
    try:
        return read_decisions_table(path)
    except AuditError as exc:
        st.error(
            f"The saved decisions cannot be read: {text.plain(exc)}. Saving is off until the "
            "file is fixed or moved aside."
        )
        return None


# --- inputs ------------------------------------------------------------------------------


def filters_ui(shares: pd.DataFrame) -> SuspectFilters:
    c1, c2, c3 = st.columns(3)
    per_patient = dict(zip(shares["case_id"], shares["suspects"]))
    patient = c1.selectbox(
        "Patient",
        [ALL] + [c for c, n in per_patient.items() if n],
        format_func=lambda c: c if c == ALL else f"{c} · {per_patient[c]} suspects",
    )
    label = c2.radio("Given label", [ALL, *CLASSES], horizontal=True)
    status = c3.radio("Decision", [ALL, "undecided", "decided"], horizontal=True)
    return SuspectFilters(patient, label, status)


def page_ui(rows: int) -> int:
    """The page of suspects to show, 1-based (a number input when there are several)."""
    pages = (rows - 1) // PER_PAGE + 1
    if pages == 1:
        return 1
    return st.number_input(
        f"Page (of {pages}; {rows:,} suspects, {PER_PAGE} a page)",
        min_value=1,
        max_value=pages,
        value=1,
    )


def decision_ui(row, current: str | None) -> None:
    """The radio that records a decision on one suspect (in this session, until saved)."""
    key = f"audit:{row.path}"
    st.radio(
        "Decision",
        DECISIONS,
        key=key,
        horizontal=True,
        index=DECISIONS.index(current) if current in DECISIONS else None,
        label_visibility="collapsed",
        on_change=_decide,
        args=(key, {"path": row.path, "case_id": row.case_id, "label": row.label}),
    )


# --- drawing -----------------------------------------------------------------------------


def overview_ui(oof: pd.DataFrame, audit: pd.DataFrame) -> None:
    """How many suspects, of which label, and the rule that finds them."""
    t = class_thresholds(oof)
    given = audit["label"].value_counts()
    st.markdown(
        f"**{len(audit):,} suspects** among the {len(oof):,} out-of-fold predictions "
        f"({oof['case_id'].nunique()} patients, each cell predicted by a model that never saw "
        f"its patient): **{given.get(PARASITIZED, 0):,}** given {PARASITIZED} and "
        f"**{given.get(UNINFECTED, 0):,}** given {UNINFECTED}."
    )
    st.caption(
        f"Confident learning: a cell is a suspect when the model gives its label less than that "
        f"class's average on the cells so labelled (P({PARASITIZED}) {t[PARASITIZED]:.3f}, "
        f"P({UNINFECTED}) {t[UNINFECTED]:.3f}) and gives the other class at least that class's "
        "average. Score: the probability of the suggested label; rank 1 is the most likely wrong."
    )


def shares_chart(with_suspects: pd.DataFrame) -> go.Figure:
    """Suspects / cells per patient that has any, stacked by given label."""
    fig = go.Figure()
    for c, colour in zip(CLASSES, text.PALETTE):
        n = with_suspects[f"suspects_{c.lower()}"]
        fig.add_trace(
            go.Bar(
                x=text.chart_text(with_suspects["case_id"]),
                y=n / with_suspects["cells"],
                name=f"given {c}",
                marker_color=colour,
                customdata=list(zip(n, with_suspects["cells"])),
                hovertemplate="%{x}: %{customdata[0]} of %{customdata[1]} cells "
                f"given {c} and suspect<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        height=320,
        margin=dict(t=10, b=10),
        yaxis_tickformat=".0%",
        yaxis_title="suspects / cells",
        xaxis_title="patient (case)",
        xaxis_tickangle=-90,
        xaxis_dtick=1,
        legend=dict(orientation="h", y=1.1),
    )
    return fig


def shares_caption(shares: pd.DataFrame, drawn: int) -> str:
    top, most = shares.iloc[0], shares.sort_values("suspects", ascending=False).iloc[0]
    return text.plain(
        f"Highest share: {top['case_id']}, {top['suspects']} of {top['cells']} cells "
        f"({top['share']:.0%}: {top['suspects_parasitized']} given {PARASITIZED}, "
        f"{top['suspects_uninfected']} given {UNINFECTED})"
        + (
            f"; most suspects: {most['case_id']}, {most['suspects']} of {most['cells']} cells"
            if most["case_id"] != top["case_id"]
            else ""
        )
        + f". {len(shares) - drawn} of {len(shares)} patients have none (not "
        f"drawn); the median patient: {shares['share'].median():.1%}."
    )


def shares_ui(oof: pd.DataFrame, audit: pd.DataFrame) -> pd.DataFrame:
    """The share of suspects per patient; the shares."""
    st.subheader("Share of suspects per patient")
    shares = patient_shares(oof, audit)
    with_suspects = shares[shares["suspects"] > 0]  # every one named on the axis
    st.plotly_chart(shares_chart(with_suspects), width="stretch")
    st.caption(shares_caption(shares, len(with_suspects)))
    return shares


def listed(audit: pd.DataFrame, filters: SuspectFilters, decided: dict) -> pd.DataFrame:
    rows = audit
    if filters.patient != ALL:
        rows = rows[rows["case_id"] == filters.patient]
    if filters.label != ALL:
        rows = rows[rows["label"] == filters.label]
    if filters.status != ALL:
        rows = rows[rows["path"].isin(decided) == (filters.status == "decided")]
    return rows


def gallery_ui(shown: pd.DataFrame, decision_of: dict, model: ModelFolder) -> None:
    """Each suspect with the default map for Parasitized, what the audit says of it, and its
    decision."""
    st.caption(
        f"Each cell, then the default map ({DEFAULT_METHOD} at "
        f"{model.contract.target_layer}) for {PARASITIZED} drawn by the selected "
        "model, which may have trained on these patients (the probabilities are the "
        "fold models'). ✔/✘: the map's peak on/off the parasite that the stain rule "
        'locates; "no parasite located": the stain rule finds none in the cell.'
    )
    pictures, kept = [], []
    for row in shown.itertuples():
        try:
            pictures.append(read_image(images.repo_source(row.path)))
            kept.append(row)
        except (OSError, ImageError) as exc:
            st.caption(
                text.plain(f"#{row.rank} {row.path.rsplit('/', 1)[-1]}: cannot show ({exc})")
            )
    if pictures:
        resources.wait_for_model(model)
    exps = (
        resources.explain(
            str(model.path), model.sha256, pictures, faithfulness=False, target=PARASITIZED.lower()
        )
        if pictures
        else []
    )
    for i, (img, e, row) in enumerate(zip(pictures, exps, kept)):
        if i % PER_ROW == 0:  # a row of columns at a time keeps the rows aligned
            cols = st.columns(PER_ROW)
        with cols[i % PER_ROW]:
            a, b = st.columns(2)
            a.image(for_display(img, width=192), width="stretch")
            b.image(for_display(e.overlay, width=192), width="stretch")
            st.caption(
                text.plain(
                    f"#{row.rank} · {row.case_id} · given {row.label}, suggested "
                    f"{row.suggested_label} · P({PARASITIZED}) {row.prob_parasitized:.3f} · "
                    f"score {row.score:.3f} · {text.POINTING[e.points_at_parasite]}"
                )
            )
            decision_ui(row, decision_of.get(row.path))


def suspects_ui(
    audit: pd.DataFrame, shares: pd.DataFrame, decision_of: dict, model: ModelFolder
) -> None:
    """The suspects the filters list, a page at a time (a table where the images are not on
    this machine)."""
    st.subheader("Suspects")
    rows = listed(audit, filters_ui(shares), decision_of)
    if rows.empty:
        st.info("No suspect matches these filters.")
        return
    page = page_ui(len(rows))
    shown = rows.iloc[(page - 1) * PER_PAGE : page * PER_PAGE]
    if images.images_missing(shown["path"].tolist(), AUDIT_FILE):
        st.dataframe(shown, hide_index=True, width="stretch")
    else:
        gallery_ui(shown, decision_of, model)


def decisions_ui(saved: pd.DataFrame | None, path: Path) -> None:
    """The decisions made (on file and in this session), to download or save to the model
    folder, and how to train with them."""
    st.subheader("Decisions")
    note, st.session_state["audit_note"] = st.session_state["audit_note"], None
    if note:
        (st.error if note.startswith("Not saved") else st.success)(note)
    mine: dict = st.session_state["audit_decisions"]
    new = _session_decisions()
    merged = merge_decisions(saved if saved is not None else new.iloc[:0], new)
    on_file = {} if saved is None else dict(zip(saved["path"], saved["decision"]))
    unsaved = sum(on_file.get(r["path"]) != r["decision"] for r in mine.values())
    counts = merged["decision"].value_counts()
    st.markdown(
        f"**{len(merged):,}** cells decided: "
        + ", ".join(f"{counts.get(d, 0):,} {d}" for d in DECISIONS)
        + f" · {unsaved:,} not yet saved to {text.plain(text.model_label(path))}"
    )
    left, right = st.columns(2)
    left.download_button(
        "Download the decisions (CSV)",
        to_csv_text(merged),
        file_name=DECISIONS_FILE,
        mime="text/csv",
        disabled=merged.empty,
    )
    right.button(
        f"Save to {text.model_label(path)}",
        type="primary",
        disabled=saved is None or not unsaved,
        on_click=_save,
        args=(path,),
    )
    st.caption(
        "Train with them: `malaria train --relabel "
        f"{text.model_label(path)} ...` trains each `relabel` cell as the other class "
        "and leaves `exclude` cells out; `keep` and undecided cells keep their label. Saving "
        "adds this session's decisions to the file and keeps every other cell's."
    )


def audit_page() -> None:
    st.title("Label audit")
    model = state.current_model()
    oof, audit = read_tables(model)
    overview_ui(oof, audit)
    shares = shares_ui(oof, audit)
    saved = saved_decisions(model.decisions)
    decision_of = {} if saved is None else dict(zip(saved["path"], saved["decision"]))
    decision_of.update({p: r["decision"] for p, r in st.session_state["audit_decisions"].items()})
    suspects_ui(audit, shares, decision_of, model)
    decisions_ui(saved, model.decisions)


audit_page()
