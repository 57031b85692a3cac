"""``malaria audit --oof FILE --out FILE``: rank the cells whose label is most likely wrong
(confident learning on out-of-fold probabilities, core.training.audit) and write them as a CSV:
path, case_id, label, prob_parasitized, suggested_label, score, rank."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.options import fail
from core.schema.export import write_csv
from core.schema.labels import CLASSES
from core.training.audit import (
    AuditError,
    class_thresholds,
    find_suspects,
    patient_shares,
    read_predictions,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--oof",
        type=Path,
        required=True,
        help="out-of-fold predictions (path, case_id, label, prob_parasitized), "
        "e.g. weights/default/oof_predictions.csv",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the audit CSV to write, e.g. weights/default/label_audit.csv",
    )


def run(args: argparse.Namespace) -> int:
    try:
        predictions = read_predictions(args.oof)
        suspects = find_suspects(predictions)
        write_csv(args.out, suspects)
    except AuditError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc}")
    t = class_thresholds(predictions)
    print(
        f"{len(suspects):,} suspects among {len(predictions):,} cells of "
        f"{predictions['case_id'].nunique()} patients -> {args.out}"
    )
    for c in CLASSES:
        given = int((predictions["label"] == c).sum())
        n = int((suspects["label"] == c).sum())
        print(f"  given {c}: {n:,} of {given:,} ({n / given:.1%}); threshold P({c}) >= {t[c]:.3f}")
    top = patient_shares(predictions, suspects).head(5)
    print(
        "highest share of suspects: "
        + ", ".join(f"{r.case_id} {r.suspects}/{r.cells} ({r.share:.0%})" for r in top.itertuples())
    )
    return 0
