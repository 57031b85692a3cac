"""How many cores a job may use (core.schema.files.cpu_count)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
    reason="needs CPU affinity and two cores to tell the machine's from the process's",
)
def test_cpu_count_is_the_cores_the_process_may_use():
    # taskset or a container's cpuset: one core allowed means one scoring worker, not one per
    # core of the machine (which oversubscribes the allowed core)
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from core.schema.files import cpu_count; print(cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]


def test_cpu_count_without_affinity_is_the_machines(monkeypatch):
    from core.schema.files import cpu_count

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert cpu_count() == (os.cpu_count() or 1)
