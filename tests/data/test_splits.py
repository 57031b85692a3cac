"""Labelled sets and patient splits (core.data.splits)."""

from __future__ import annotations

import pytest
from PIL import Image

from core.data.splits import DataError, labelled_samples, split_by_case


def test_fixture_cells_are_labelled_and_split_by_case(cells_dir):
    samples, sources = labelled_samples([cells_dir])
    assert len(samples) >= 40 and set(sources) == {s.path for s in samples}
    assert {s.label for s in samples} == {0, 1}
    split = split_by_case(samples, seed=3)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert all(parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == {s.case_id for s in samples}
    assert split_by_case(samples, seed=3) == split  # seeded


def test_split_keeps_cases_whole_on_a_larger_synthetic_set():
    from core.data.splits import Sample

    samples = [
        Sample(f"C{c}_{i}.png", f"C{c}", (c + i) % 2 if c < 30 else 1)
        for c in range(40)
        for i in range(10)
    ]
    split = split_by_case(samples, seed=0)
    assert len(split.train) + len(split.val) + len(split.test) == 40
    assert len(set(split.train) | set(split.val) | set(split.test)) == 40
    # both kinds of case (infected / healthy) reach the test split
    assert any(int(c[1:]) >= 30 for c in split.test) and any(int(c[1:]) < 30 for c in split.test)


def test_one_class_is_refused(tmp_path):
    (tmp_path / "Uninfected").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "Uninfected" / "C1_a.png")
    with pytest.raises(DataError, match="one class"):
        labelled_samples([tmp_path])
