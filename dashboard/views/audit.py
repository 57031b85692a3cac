import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.data.images import ImageError
from core.data.sources import read_image
from core.explain.heatmap import DEFAULT_METHOD, for_display
from core.schema.contract import AUDIT_FILE, DECISIONS_FILE, OOF_FILE
from core.schema.export import to_csv_text
from core.schema.labels import CLASSES
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
from dashboard import ui

PER_PAGE = 12
ALL = "All"


@st.cache_data(show_spinner=False, max_entries=4)
def _tables(oof: str, audit: str, stamp: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(out-of-fold predictions, suspects); ``stamp`` (mtimes) makes a rewritten file reread."""
    return read_predictions(oof), read_audit(audit)


def _decide(key: str, row: dict) -> None:
    """Keep the radio's choice in the session's decisions, which outlive the widget (a filter
    that hides the cell, another page)."""
    st.session_state["audit_decisions"][row["path"]] = {**row, "decision": st.session_state[key]}


def _session_decisions() -> pd.DataFrame:
    return pd.DataFrame(
        list(st.session_state["audit_decisions"].values()), columns=list(DECISION_COLUMNS)
    )


def _save(path) -> None:
    """Merge this session's decisions into the file (before the rerun draws the counts)."""
    try:
        written = save_decisions(path, _session_decisions())
    except (AuditError, OSError) as exc:
        st.session_state["audit_note"] = f"Not saved: {ui.plain(exc)}"
    else:
        st.session_state["audit_note"] = (
            f"Saved; {ui.plain(ui.model_label(path))} holds {len(written):,} decisions."
        )


st.title("Label audit")
model = ui.current_model()
oof_path, audit_path, decisions_path = model.predictions("oof"), model.audit, model.decisions
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
        f"--oof {ui.model_label(oof_path)} --out {ui.model_label(audit_path)}`."
    )
    st.stop()
try:
    oof, audit = _tables(
        str(oof_path), str(audit_path), (oof_path.stat().st_mtime_ns, audit_path.stat().st_mtime_ns)
    )
except AuditError as exc:
    st.error(ui.plain(exc))
    st.stop()

t = class_thresholds(oof)
given = {c: int((audit["label"] == c).sum()) for c in CLASSES}
st.markdown(
    f"**{len(audit):,} suspects** among the {len(oof):,} out-of-fold predictions "
    f"({oof['case_id'].nunique()} patients, each cell predicted by a model that never saw its "
    f"patient): **{given[CLASSES[0]]:,}** given {CLASSES[0]} and **{given[CLASSES[1]]:,}** "
    f"given {CLASSES[1]}."
)
st.caption(
    f"Confident learning: a cell is a suspect when the model gives its label less than that "
    f"class's average on the cells so labelled (P({CLASSES[0]}) {t[CLASSES[0]]:.3f}, "
    f"P({CLASSES[1]}) {t[CLASSES[1]]:.3f}) and gives the other class at least that class's "
    "average. Score: the probability of the suggested label; rank 1 is the most likely wrong."
)

st.subheader("Share of suspects per patient")
shares = patient_shares(oof, audit)
with_suspects = shares[shares["suspects"] > 0]  # every one named on the axis
fig = go.Figure()
for c, colour in zip(CLASSES, ui.PALETTE):
    n = with_suspects[f"suspects_{c.lower()}"]
    fig.add_trace(
        go.Bar(
            x=ui.chart_text(with_suspects["case_id"]),
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
st.plotly_chart(fig, width="stretch")
top, most = shares.iloc[0], shares.sort_values("suspects", ascending=False).iloc[0]
st.caption(
    ui.plain(
        f"Highest share: {top['case_id']}, {top['suspects']} of {top['cells']} cells "
        f"({top['share']:.0%}: {top['suspects_parasitized']} given {CLASSES[0]}, "
        f"{top['suspects_uninfected']} given {CLASSES[1]})"
        + (
            f"; most suspects: {most['case_id']}, {most['suspects']} of {most['cells']} cells"
            if most["case_id"] != top["case_id"]
            else ""
        )
        + f". {len(shares) - len(with_suspects)} of {len(shares)} patients have none (not "
        f"drawn); the median patient: {shares['share'].median():.1%}."
    )
)

saved = pd.DataFrame(columns=list(DECISION_COLUMNS))
if decisions_path.is_file():
    try:
        saved = read_decisions_table(decisions_path)
    except AuditError as exc:
        st.error(
            f"The saved decisions cannot be read: {ui.plain(exc)}. Saving is off until the "
            "file is fixed or moved aside."
        )
        saved = None
mine: dict = st.session_state["audit_decisions"]
decision_of = {} if saved is None else dict(zip(saved["path"], saved["decision"]))
decision_of.update({p: r["decision"] for p, r in mine.items()})

st.subheader("Suspects")
c1, c2, c3 = st.columns(3)
per_patient = dict(zip(shares["case_id"], shares["suspects"]))
patient = c1.selectbox(
    "Patient",
    [ALL] + [c for c, n in per_patient.items() if n],
    format_func=lambda c: c if c == ALL else f"{c} · {per_patient[c]} suspects",
)
label = c2.radio("Given label", [ALL, *CLASSES], horizontal=True)
status = c3.radio("Decision", [ALL, "undecided", "decided"], horizontal=True)
rows = audit
if patient != ALL:
    rows = rows[rows["case_id"] == patient]
if label != ALL:
    rows = rows[rows["label"] == label]
if status != ALL:
    rows = rows[rows["path"].isin(decision_of) == (status == "decided")]
if rows.empty:
    st.info("No suspect matches these filters.")
else:
    pages = (len(rows) - 1) // PER_PAGE + 1
    page = (
        st.number_input(
            f"Page (of {pages}; {len(rows):,} suspects, {PER_PAGE} a page)",
            min_value=1,
            max_value=pages,
            value=1,
        )
        if pages > 1
        else 1
    )
    shown = rows.iloc[(page - 1) * PER_PAGE : page * PER_PAGE]
    if ui.images_missing(shown["path"].tolist(), AUDIT_FILE):
        st.dataframe(shown, hide_index=True, width="stretch")
    else:
        st.caption(
            f"Each cell, then the default map ({DEFAULT_METHOD} at "
            f"{model.contract.target_layer}) for {CLASSES[0]} drawn by the selected "
            "model, which may have trained on these patients (the probabilities are the "
            "fold models'). ✔/✘: the map's peak on/off the parasite that the stain rule "
            'locates; "no parasite located": the stain rule finds none in the cell.'
        )
        images, kept = [], []
        for row in shown.itertuples():
            try:
                images.append(read_image(ui.repo_source(row.path)))
                kept.append(row)
            except (OSError, ImageError) as exc:
                st.caption(
                    ui.plain(f"#{row.rank} {row.path.rsplit('/', 1)[-1]}: cannot show ({exc})")
                )
        exps = (
            ui.explain(
                str(model.path), model.sha256, images, faithfulness=False, target=CLASSES[0].lower()
            )
            if images
            else []
        )
        marks = {
            True: "✔ peak on the parasite",
            False: "✘ peak off the parasite",
            None: "no parasite located",
        }
        for i, (img, e, row) in enumerate(zip(images, exps, kept)):
            if i % 4 == 0:  # a row of columns at a time keeps the rows aligned
                cols = st.columns(4)
            with cols[i % 4]:
                a, b = st.columns(2)
                a.image(for_display(img, width=192), width="stretch")
                b.image(for_display(e.overlay, width=192), width="stretch")
                st.caption(
                    ui.plain(
                        f"#{row.rank} · {row.case_id} · given {row.label}, suggested "
                        f"{row.suggested_label} · P({CLASSES[0]}) {row.prob_parasitized:.3f} · "
                        f"score {row.score:.3f} · {marks[e.points_at_parasite]}"
                    )
                )
                key = f"audit:{row.path}"
                current = decision_of.get(row.path)
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

st.subheader("Decisions")
note, st.session_state["audit_note"] = st.session_state["audit_note"], None
if note:
    (st.error if note.startswith("Not saved") else st.success)(note)
new = _session_decisions()
merged = merge_decisions(saved if saved is not None else new.iloc[:0], new)
on_file = {} if saved is None else dict(zip(saved["path"], saved["decision"]))
unsaved = sum(on_file.get(r["path"]) != r["decision"] for r in mine.values())
counts = merged["decision"].value_counts()
st.markdown(
    f"**{len(merged):,}** cells decided: "
    + ", ".join(f"{counts.get(d, 0):,} {d}" for d in DECISIONS)
    + f" · {unsaved:,} not yet saved to {ui.plain(ui.model_label(decisions_path))}"
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
    f"Save to {ui.model_label(decisions_path)}",
    type="primary",
    disabled=saved is None or not unsaved,
    on_click=_save,
    args=(decisions_path,),
)
st.caption(
    "Train with them: `malaria train --relabel "
    f"{ui.model_label(decisions_path)} ...` trains each `relabel` cell as the other class "
    "and leaves `exclude` cells out; `keep` and undecided cells keep their label. Saving "
    "adds this session's decisions to the file and keeps every other cell's."
)
