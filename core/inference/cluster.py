"""Scoring on a Ray cluster: the batches of ``malaria score`` spread over Ray Data actors.

    malaria score INPUT... --out results.csv --ray [local|auto|HOST:PORT|ray://HOST:PORT]

The driver (the machine running the command) lists the inputs with ``core.data.sources`` as the
local path does, so keys, order and the error rows of what cannot be read are the same; it
sends each source's key and origin (the file, or the zip and member names), never its bytes.
Each actor holds one copy of the driver's engine (one ONNX Runtime session, built from the
graph's bytes, so it needs neither the model folder nor an export cache), opens the files and
zips itself and runs :func:`core.inference.pipeline.score_batch` on one batch at a time.
Batches come back in input order and go into the driver's result store one by one, so
``--resume`` works as locally and the driver holds one batch at a time.

Ray is an optional extra (``requirements-cluster.lock``); it is imported only here, only when
asked for.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from core.data.sources import ImageSource, from_record, to_record
from core.inference.engines import Engine
from core.inference.pipeline import mark_duplicates, score_batch
from core.schema.files import cpu_count
from core.schema.results import RESULT_COLUMNS

LOCAL = "local"  # start a cluster on this machine for the run, stop it after
INSTALL = ".venv/bin/pip install -r requirements-cluster.lock"
_ADDRESS = re.compile(r"(auto|(ray://)?[\w.\-]+:\d+|(ray://)?\[[0-9a-fA-F:.]+\]:\d+)")


class ClusterError(RuntimeError):
    """Ray is missing, the cluster cannot be reached, or it failed during the run."""


def require_ray() -> ModuleType:
    """The ``ray`` module; raises ClusterError with the install command when it is missing."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            f"--ray needs Ray, an optional extra that is not installed: {INSTALL}"
        ) from None
    return ray


def check_address(value: str) -> str:
    """``value`` if it names a cluster (``local``, ``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``); raises ValueError otherwise."""
    if value == LOCAL or _ADDRESS.fullmatch(value):
        return value
    raise ValueError(
        f"--ray takes local, auto, HOST:PORT or ray://HOST:PORT, got {value!r} (an INPUT "
        "right after --ray is read as its address: put --ray after the inputs, or write "
        "--ray=local)"
    )


@contextmanager
def connect(address: str = LOCAL, *, cpus: int | None = None) -> Iterator[str]:
    """Start a Ray cluster on this machine (``local``, ``cpus`` CPUs, default all) or join the
    one at ``address``, for the ``with`` block; yields a one-line description. A process
    already connected (a test session, a notebook) keeps its cluster. Raises ClusterError."""
    ray = require_ray()
    if ray.is_initialized():
        yield _describe(ray)
        return
    if address not in (LOCAL, "auto"):
        _check_reachable(address)
    try:
        if address == LOCAL:
            ray.init(
                address="local",  # a new cluster, even beside one `ray start` left running
                num_cpus=cpus or cpu_count(),
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ...: one line
        raise ClusterError(f"cannot start or join the Ray cluster {address!r}: {exc}") from None
    try:
        yield _describe(ray)
    finally:
        ray.shutdown()


def _check_reachable(address: str, *, timeout: float = 5.0) -> None:
    """Raise ClusterError unless something answers at HOST:PORT: ``ray.init`` would retry an
    address where nothing listens for minutes before giving up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"nothing answers at {address} ({exc}): is `ray start --head` running there, and "
            "is its port open to this machine?"
        ) from None


def _describe(ray: ModuleType) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return f"Ray cluster of {len(nodes)} machine(s), {_cluster_cpus(ray)} CPUs"


def _cluster_cpus(ray: ModuleType) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def schemas() -> tuple[Any, Any]:
    """The Arrow schemas of what goes to the actors (source records) and comes back (rows)."""
    import pyarrow as pa

    sources = pa.schema(
        [
            ("path", pa.string()),
            ("name", pa.string()),
            ("origin", pa.list_(pa.string())),
            ("data", pa.binary()),
            ("error", pa.string()),
        ]
    )
    rows = pa.schema(
        [
            (c, pa.float64() if c == "prob_parasitized" else pa.string())
            for c in (*RESULT_COLUMNS, "sha256")
        ]
    )
    return sources, rows


class _ScoreBatches:
    """One Ray Data actor: the engine unpickled once (one ONNX Runtime session), then one
    batch of source records in, its result rows out."""

    def __init__(self, engine: Engine, threshold: float) -> None:
        from threadpoolctl import threadpool_limits

        self.engine, self.threshold = engine, threshold
        self.row_schema = schemas()[1]
        # one batch per actor and one actor per CPU: BLAS threads would oversubscribe
        threadpool_limits(limits=1, user_api="blas")

    def __call__(self, batch: Any) -> Any:  # pyarrow.Table -> pyarrow.Table
        import pyarrow as pa

        sources = [from_record(r) for r in batch.to_pylist()]
        rows = score_batch(sources, self.engine, self.threshold)
        return pa.Table.from_pylist(rows, schema=self.row_schema)


class RayScorer:
    """A ``core.inference.pipeline.BatchScorer`` that runs the batches on the connected Ray
    cluster, with ``actors`` actors of one CPU each (default: one per CPU of the cluster)."""

    def __init__(self, *, actors: int | None = None) -> None:
        self.actors = actors

    def __call__(
        self,
        sources: Sequence[ImageSource],
        engine: Engine,
        *,
        threshold: float | None = None,
        batch_size: int = 64,
        seen: dict[str, str] | None = None,
    ) -> Iterator[list[dict]]:
        """Batches of result rows (RESULT_COLUMNS and ``sha256``), in input order, with the
        duplicates of earlier files (and of those in ``seen``) marked, as ``iter_scored``.
        Raises ClusterError if the cluster fails; the batches yielded before are kept."""
        ray = require_ray()
        import pyarrow as pa

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        threshold = engine.contract.threshold if threshold is None else threshold
        seen = {} if seen is None else seen
        if not sources:
            return
        source_schema = schemas()[0]
        # one block per batch: the unit an actor takes, and of the order kept on the way back
        n_blocks = -(-len(sources) // batch_size)
        blocks = ray.data.from_arrow(
            [
                pa.Table.from_pylist(
                    [to_record(s) for s in sources[i : i + batch_size]], schema=source_schema
                )
                for i in range(0, len(sources), batch_size)
            ]
        )
        actors = min(self.actors or _cluster_cpus(ray), n_blocks)
        ds = blocks.map_batches(
            _ScoreBatches,
            fn_constructor_kwargs={"engine": engine, "threshold": threshold},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
        )
        ds.context.execution_options.preserve_order = True  # first copies stay first
        ds.context.enable_progress_bars = False  # malaria score draws its own
        # Ray Data's INFO lines (plan, start, finish) would drown the command's own; they are
        # kept in the session's log folder
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # the rows must come back one per source, in order: checked, not assumed
        expected = (s.path for s in sources)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.to_pylist()
                if any(row["path"] != next(expected, None) for row in rows):
                    raise ClusterError("the Ray cluster returned rows out of input order")
                mark_duplicates(rows, seen)
                yield rows
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"scoring on the Ray cluster failed: {exc}") from None
        if next(expected, None) is not None:
            raise ClusterError("the Ray cluster returned fewer rows than sources sent")
