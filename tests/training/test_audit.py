"""The label audit (confident learning on out-of-fold probabilities) and the decisions file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import cli
from core.training.audit import (
    AUDIT_COLUMNS,
    AuditError,
    class_thresholds,
    find_suspects,
    patient_shares,
    read_audit,
    read_decisions,
    save_decisions,
)

P, U = "Parasitized", "Uninfected"


def _cells(
    n_per_case: int = 40, cases: int = 5, flips: dict[str, int] | None = None, seed: int = 0
) -> tuple[pd.DataFrame, set[str]]:
    """Out-of-fold predictions of a model that is right about every cell's true class, with the
    given labels of ``flips[case]`` cells per case swapped: returns (frame, flipped paths)."""
    rng = np.random.default_rng(seed)
    rows, flipped = [], set()
    for c in range(cases):
        case = f"C{c + 1}"
        n_flip = (flips or {}).get(case, 0)
        for i in range(n_per_case):
            true = P if i % 2 == 0 else U
            sure = rng.uniform(0.80, 0.99)
            prob = sure if true == P else 1 - sure
            label = true
            path = f"data.zip!{true}/{case}P1_cell_{i}.png"
            if i < n_flip:  # a confidently wrong label
                label = U if true == P else P
                prob = 0.985 if true == P else 0.015
                flipped.add(path)
            rows.append((path, case, label, prob))
    # cells the model cannot decide are uncertain, not suspects
    rows += [(f"data.zip!{U}/C1P1_unsure_{i}.png", "C1", [P, U][i % 2], 0.5) for i in range(6)]
    return pd.DataFrame(rows, columns=["path", "case_id", "label", "prob_parasitized"]), flipped


def test_the_flipped_labels_are_found_and_nothing_else():
    df, flipped = _cells(flips={"C2": 4, "C4": 3})
    suspects = find_suspects(df)
    assert list(suspects.columns) == list(AUDIT_COLUMNS)
    assert set(suspects["path"]) == flipped
    by_path = df.set_index("path")
    for row in suspects.itertuples():
        assert row.suggested_label != by_path.loc[row.path, "label"]
        assert row.label == by_path.loc[row.path, "label"]
    true_class = suspects["path"].str.split("!").str[1].str.split("/").str[0]
    assert (suspects["suggested_label"] == true_class).all()
    assert suspects["rank"].tolist() == list(range(1, len(flipped) + 1))
    assert suspects["score"].is_monotonic_decreasing
    assert np.allclose(suspects["score"], 0.985)  # the probability of the suggested class


def test_thresholds_are_the_mean_self_confidence_per_given_label():
    df = pd.DataFrame(
        {
            "path": list("abcde"),
            "case_id": "C1",
            "label": [P, P, P, U, U],
            "prob_parasitized": [0.9, 0.8, 0.1, 0.3, 0.9],
        }
    )
    t = class_thresholds(df)
    assert t[P] == pytest.approx(0.6) and t[U] == pytest.approx(0.4)
    # c: P(P) 0.1 < 0.6 and P(U) 0.9 >= 0.4 -> suspect; e: P(U) 0.1 < 0.4, P(P) 0.9 >= 0.6
    suspects = find_suspects(df)
    assert suspects["path"].tolist() == ["c", "e"]  # tied scores: ordered by path
    assert suspects["suggested_label"].tolist() == [U, P]
    assert suspects["score"].tolist() == pytest.approx([0.9, 0.9])


def test_a_below_threshold_cell_is_no_suspect_unless_the_other_class_is_confident():
    # b is below P's threshold (0.7) but P(U) = 0.4 < U's threshold (0.8): uncertain, not flagged
    df = pd.DataFrame(
        {
            "path": list("abcd"),
            "case_id": "C1",
            "label": [P, P, U, U],
            "prob_parasitized": [0.8, 0.6, 0.2, 0.2],
        }
    )
    assert find_suspects(df).empty


def test_the_patient_whose_labels_are_wrong_stands_out():
    df, _ = _cells(flips={"C3": 12, "C5": 1})
    shares = patient_shares(df, find_suspects(df))
    assert shares.loc[0, "case_id"] == "C3"
    assert shares.loc[0, "suspects"] == 12 and shares.loc[0, "cells"] == 40
    assert shares.loc[0, "share"] == pytest.approx(0.3)
    assert (shares.loc[0, "suspects_parasitized"], shares.loc[0, "suspects_uninfected"]) == (6, 6)
    assert set(shares["case_id"]) == {f"C{i}" for i in range(1, 6)}  # clean patients listed
    assert shares.set_index("case_id").loc["C1", "share"] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.iloc[:0], "no rows"),
        (lambda d: d[d["label"] == P], "only Parasitized"),
        (
            lambda d: d.assign(prob_parasitized=d["prob_parasitized"].where(d.index != 3)),
            "line(s) 5",
        ),
        (
            lambda d: d.assign(prob_parasitized=d["prob_parasitized"].where(d.index != 0, 1.5)),
            "[0, 1]",
        ),
        (lambda d: d.assign(label=d["label"].where(d.index != 2, "parasite")), "'parasite'"),
        (lambda d: d.drop(columns="prob_parasitized"), "lacks the column(s) prob_parasitized"),
        (lambda d: pd.concat([d, d.iloc[:1]]), "more than once"),
    ],
)
def test_unusable_predictions_are_a_clear_error(change, message):
    df, _ = _cells(cases=1)
    with pytest.raises(AuditError) as err:
        find_suspects(change(df))
    assert message in str(err.value)


def test_the_command_writes_the_audit_and_refuses_bad_input(tmp_path, capsys):
    df, flipped = _cells(flips={"C2": 5})
    oof = tmp_path / "oof.csv"
    df.assign(fold=0).to_csv(oof, index=False)
    out = tmp_path / "label_audit.csv"
    assert cli.main(["audit", "--oof", str(oof), "--out", str(out)]) == 0
    audit = read_audit(out)
    assert list(audit.columns) == list(AUDIT_COLUMNS)
    assert set(audit["path"]) == flipped and audit["rank"].tolist() == [1, 2, 3, 4, 5]
    assert "5 suspects among 206 cells" in capsys.readouterr().out
    df.assign(prob_parasitized=np.nan).to_csv(oof, index=False)
    assert cli.main(["audit", "--oof", str(oof), "--out", str(out)]) == 2
    assert "prob_parasitized must be a probability" in capsys.readouterr().err
    assert read_audit(out)["path"].tolist() == audit["path"].tolist()  # left as it was
    assert cli.main(["audit", "--oof", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- decisions --------------------------------------------------------------------------------


def _decisions(*rows: tuple[str, str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["path", "case_id", "label", "decision"])


def test_decisions_round_trip_and_merge_without_losing_other_cells(tmp_path):
    path = tmp_path / "label_decisions.csv"
    # a name that our CSV export protects against spreadsheet formulas comes back as it was
    save_decisions(path, _decisions(("a.png", "C1", P, "relabel"), ("=b.png", "C1", U, "keep")))
    assert read_decisions(path) == {"a.png": "relabel", "=b.png": "keep"}
    assert "'=b.png" in path.read_text()
    save_decisions(path, _decisions(("a.png", "C1", P, "exclude"), ("c.png", "C2", U, "keep")))
    assert read_decisions(path) == {"a.png": "exclude", "=b.png": "keep", "c.png": "keep"}


def test_decisions_are_read_leniently_in_case_and_spaces(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "path,case_id,label,decision,note\n"
        f"x.png,C1,{P}, Relabel ,checked twice\n"
        f"x.png,C1,{P},relabel,\n"  # the same decision again: one entry
        f"y.png,C1,{U},EXCLUDE,\n"
    )
    assert read_decisions(path) == {"x.png": "relabel", "y.png": "exclude"}
    path.write_text("path,case_id,label,decision\n")
    assert read_decisions(path) == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,case_id,label,decision\na.png,C1,Parasitized,flip\n", "line(s) 2 hold 'flip'"),
        (
            "path,case_id,label,decision\na.png,C1,Parasitized,keep\nb.png,C1,Parasitized,\n",
            "line(s) 3",
        ),
        ("path,case_id,label\na.png,C1,Parasitized\n", "lacks the column(s) decision"),
        ("path,case_id,label,decision\n,C1,Parasitized,keep\n", "no path"),
        ("path,case_id,label,decision\na.png,C1,infected,keep\n", "'infected'"),
        (
            "path,case_id,label,decision\na.png,C1,Parasitized,keep\na.png,C1,Parasitized,exclude\n",
            "conflicting rows (line(s) 2, 3)",
        ),
        ("", "empty"),
    ],
)
def test_bad_decisions_files_are_a_clear_error(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(AuditError) as err:
        read_decisions(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_missing_decisions_file_is_a_clear_error(tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        read_decisions(tmp_path / "nope.csv")


def test_saving_over_a_damaged_decisions_file_leaves_it_alone(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("path,case_id,label,decision\na.png,C1,Parasitized,maybe\n")
    before = path.read_text()
    with pytest.raises(AuditError, match="maybe"):
        save_decisions(path, _decisions(("b.png", "C1", U, "keep")))
    assert path.read_text() == before
    with pytest.raises(AuditError, match="decision must be one of"):
        save_decisions(tmp_path / "new.csv", _decisions(("b.png", "C1", U, "drop")))
    assert not (tmp_path / "new.csv").exists()


def test_concurrent_saves_keep_every_cell(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "d.csv"

    def save(i: int) -> None:
        for _ in range(3):
            save_decisions(path, _decisions((f"cell_{i}.png", "C1", P, "exclude")))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(save, range(16)))
    assert read_decisions(path) == {f"cell_{i}.png": "exclude" for i in range(16)}


@pytest.mark.parametrize(
    "row, message",
    [
        (("a.png", "C1", U, "relabel"), "label 'Uninfected' and case 'C1', the data 'Parasitized'"),
        (("a.png", "C9", P, "exclude"), "case 'C9'"),
        (("gone.png", "C1", P, "keep"), "not in the data"),
    ],
)
def test_a_decision_that_disagrees_with_the_data_is_refused(row, message):
    from core.data.splits import DataError, Sample
    from core.training.audit import check_decisions
    from core.training.recipe import apply_decisions

    samples = [Sample("a.png", "C1", 0), Sample("b.png", "C1", 1)]  # 0: Parasitized
    good = check_decisions(pd.DataFrame([("a.png", "C1", P, "relabel")], columns=_COLUMNS))
    assert [s.label for s in apply_decisions(samples, good, None)] == [1, 1]
    table = check_decisions(pd.DataFrame([row], columns=_COLUMNS))
    with pytest.raises(DataError, match=message):
        apply_decisions(samples, table, None)


_COLUMNS = ["path", "case_id", "label", "decision"]
