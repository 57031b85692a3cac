"""Batch scoring: thousands of cells per minute on a CPU, per-patient parasitemia, nothing lost.

    python -m core.score INPUT... --out results.csv [--summary summary.csv] [--weights DIR]
                         [--threshold T] [--engine onnx-int8|onnx|torch] [--group-by case|folder]
                         [--resume RUN_ID] [--store results.sqlite] [--follow-links]
                         [--ray [local|auto|HOST:PORT] [--ray-actors N]]

INPUT is image files, folders (searched recursively) or zips (nested zips one level deep).
Decoding runs in worker threads while the model runs on the previous batch; results are
committed to the result store batch by batch, so an interrupted run keeps what it scored and
``--resume RUN_ID`` scores only what is missing. ``--ray`` runs the same batches on a Ray
cluster (core.cluster).

Exit status: 0 every image scored; 1 some images gave error rows (all others are scored);
2 bad arguments, missing inputs, unusable weights, an unwritable output, an unusable result
store, or no image scored at all; 130 interrupted (results so far are kept).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from core.contract import DEFAULT_WEIGHTS, ModelContract, ModelFolder, WeightsError, read_card
from core.export import OutputError, check_output, write_csv
from core.files import REPO_ROOT, atomic_path, cpu_count
from core.images import ImageError, decode_image, read_bytes
from core.labels import ZIP_SEP, case_id, label_from_path, predicted_class
from core.metrics import parasitemia_summary
from core.quality import REVIEW_BAND, Gate, review
from core.quantize import default_engine
from core.sources import ImageSource, iter_sources, sources_from_uploads, unique_paths
from core.store import RESULT_COLUMNS, ResultStore, StoreError

ENGINES = ("onnx-int8", "onnx", "torch")
CACHE_DIR = Path(os.environ.get("MALARIA_CACHE", REPO_ROOT / ".cache"))
# Signs the ONNX exports in CACHE_DIR; kept apart from them, readable by this user only.
KEY_FILE = Path(
    os.environ.get("MALARIA_CACHE_KEY")
    or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    / "malaria-screening"
    / "cache.key"
)

Progress = Callable[[int, int], None]  # (done, total)


# ---------------------------------------------------------------------------------------------
# Engines: uint8 images (N, S, S, 3) at the contract size -> P(Parasitized) float32 (N,)
# ---------------------------------------------------------------------------------------------


class Engine:
    name: str
    weights: ModelFolder  # the model folder it scores with, verified
    gate: Gate  # the quality gate of these weights (core.quality)

    @property
    def contract(self) -> ModelContract:
        return self.weights.contract

    @property
    def sha256(self) -> str:
        return self.weights.sha256

    @property
    def folder(self) -> Path:
        return self.weights.path

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.score(images)[0]

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(Parasitized) float32 (N,), pooled features float32 (N, C)) from one forward pass."""
        raise NotImplementedError

    def release_memory(self) -> None:
        """Give back the buffers kept for the next batch (a long-lived server calls this after
        each job); batches still running keep theirs."""


_EXPORT_VERSION = 2  # bump when export_onnx changes what it writes (2: pooled features too)
_QUANTIZE_VERSION = 2  # bump when core.quantize.quantize_onnx changes what it writes (2: pixels in)


def onnx_path(sha256: str, contract: ModelContract, *, calibration: str = "") -> Path:
    """Cache path of the export for these weights and this contract (both are in the graph),
    or of its int8 version (``calibration``: CalibrationSet.cache_key of its calibration)."""
    parts: list = [sha256, contract.to_json(), _EXPORT_VERSION]
    if calibration:
        parts += [calibration, _QUANTIZE_VERSION]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return CACHE_DIR / "onnx" / f"{key}{'.int8' if calibration else ''}.onnx"


def _cache_key() -> bytes | None:
    """This user's secret for signing cached exports (KEY_FILE, created 0600 on first use), or
    None when it cannot be kept private; exports are then made afresh, in memory, every time."""
    try:
        KEY_FILE.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        info = KEY_FILE.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None  # someone else could read it (and forge) or replace it
        key = KEY_FILE.read_bytes()
    except OSError:
        return None
    return key if len(key) == 32 else None  # a half-written key from a concurrent first use


def _cached_export(folder: Path, sha256: str, contract: ModelContract) -> bytes:
    """The ONNX graph's bytes, exported once per weights and contract (see _signed_cache)."""
    return _signed_cache(onnx_path(sha256, contract), lambda out: export_onnx(folder, out))


def _signed_cache(path: Path, build: Callable[[Path], object]) -> bytes:
    """The bytes of the graph at ``path`` in the cache, made by ``build(path)`` when missing.

    The cached file is trusted only with a valid HMAC (``.hmac`` beside it) made with this
    user's key, which is kept outside the cache: a graph replaced in the cache, whatever is
    written beside it, is built again, never run. Without a private key the graph is built
    afresh, in a temporary folder, every time."""
    tag_file = path.with_suffix(".hmac")
    key = _cache_key()
    if key is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / path.name
            build(out)
            return out.read_bytes()

    def tag(data: bytes) -> str:  # the file name binds the graph to its weights and contract
        return hmac.new(key, path.name.encode() + data, hashlib.sha256).hexdigest()

    if path.is_file() and tag_file.is_file():
        data = path.read_bytes()
        if hmac.compare_digest(tag(data), tag_file.read_text().strip()):
            return data
    build(path)
    data = path.read_bytes()
    with atomic_path(tag_file) as tag_tmp:
        tag_tmp.write_text(tag(data))
    return data


def export_onnx(folder: Path, out: Path) -> Path:
    """Export the model in ``folder`` to ONNX, normalisation and softmax included.

    The graph takes uint8 NHWC images at the contract size and returns P(Parasitized) (N,)
    and the pooled features (N, C) the quality gate reads, from the same forward pass.
    """
    import torch

    from core.model import load_model, logits_and_features, normalize

    loaded = load_model(folder)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = loaded.model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, features = logits_and_features(self.model, normalize(x, loaded.contract))
            return logits.softmax(1)[:, loaded.contract.positive_index], features

    size = loaded.contract.input_size
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # the TorchScript exporter is deprecated but needs no extra package, and its tracer
        # warns about the contract's mean/std becoming constants, which is what we want
        warnings.simplefilter("ignore", (DeprecationWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            Wrapped().eval(),
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            str(tmp),
            input_names=["images"],
            output_names=["prob_parasitized", "features"],
            dynamic_axes={"images": {0: "n"}, "prob_parasitized": {0: "n"}, "features": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    return out


class OnnxEngine(Engine):
    """ONNX Runtime on the CPU, from an export cached by the weights' sha256."""

    name = "onnx"

    def __init__(self, folder: Path, *, threads: int | None = None) -> None:
        self.weights = ModelFolder.open(folder)
        self.graph = self._graph()
        self._threads = threads or 1
        self.session = self._session()
        self.gate = Gate.for_model(self.folder, self.sha256, self.name)

    def _session(self) -> Any:  # onnxruntime.InferenceSession
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One thread per session.run: the pipeline runs one batch per core in parallel, which
        # beats splitting each batch across cores.
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory arena keeps the largest batch's buffers (about 300 MB for two concurrent
        # batches of 64) for reuse: without it int8 scoring ran at 0.8x. release_memory()
        # gives them back.
        return ort.InferenceSession(self.graph, opts, providers=["CPUExecutionProvider"])

    def release_memory(self) -> None:
        import onnxruntime as ort

        # ONNX Runtime shrinks the arena (frees its unused chunks) at the end of a run asked to
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        size = self.contract.input_size
        self.session.run(None, {"images": np.zeros((1, size, size, 3), np.uint8)}, shrink)

    # Pickled for another process (a Ray actor, core.cluster): the graph's bytes, the gate and
    # the settings travel, and the session is built there, so that process needs neither the
    # model folder nor this machine's export cache.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = self._session()

    def _graph(self) -> bytes:
        return _cached_export(self.folder, self.sha256, self.contract)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob, features = self.session.run(None, {"images": np.ascontiguousarray(images)})
        return prob, features


class OnnxInt8Engine(OnnxEngine):
    """The fp32 export quantised to int8 on the model's calibration cells (core.quantize),
    built on first use and cached, signed, per weights hash and calibration set."""

    name = "onnx-int8"

    def _graph(self) -> bytes:
        from core.quantize import calibration_images, quantize_onnx, required_calibration

        rec = required_calibration(self.folder, self.weights.card)
        fp32 = super()._graph()

        def build(out: Path) -> None:
            images, _ = calibration_images(
                self.folder, self.weights.card, size=self.contract.input_size
            )
            quantize_onnx(
                fp32,
                images,
                out,
                float_blocks=rec.float_blocks,
                description=(
                    f"{rec.cells} cells of {len(rec.cases)} {rec.part} patients "
                    f"({', '.join(rec.cases)}), seed {rec.seed}, {rec.file} sha256 {rec.sha256}; "
                    f"kept in float: {', '.join(rec.float_blocks) or 'nothing'}"
                ),
            )

        return _signed_cache(
            onnx_path(self.sha256, self.contract, calibration=rec.cache_key()), build
        )


class TorchEngine(Engine):
    """PyTorch eager (channels_last): the reference the ONNX export is checked against."""

    name = "torch"

    def __init__(self, folder: Path, *, threads: int | None = None) -> None:
        import torch

        from core.model import load_model

        # the pipeline already runs one batch per core; more threads per batch oversubscribe
        torch.set_num_threads(threads or 1)
        loaded = load_model(folder)
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.weights = ModelFolder(Path(loaded.folder), loaded.card, loaded.contract, loaded.sha256)
        self.gate = Gate.for_model(self.folder, self.sha256, self.name)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from core.model import logits_and_features, normalize

        with torch.no_grad():
            logits, features = logits_and_features(
                self.model, normalize(torch.from_numpy(images), self.contract)
            )
        return (logits.softmax(1)[:, self.contract.positive_index].numpy(), features.numpy())


def load_engine(
    weights: Path | str = DEFAULT_WEIGHTS,
    engine: str | None = None,
    *,
    threads: int | None = None,
) -> Engine:
    """An engine for the model folder ``weights``; ``engine`` None: the model's default
    (``core.quantize.default_engine``: int8 only where its card records that it passed the
    agreement check on the test patients). Raises WeightsError, ValueError."""
    if engine is None:
        engine = default_engine(read_card(weights))
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    cls = {"onnx-int8": OnnxInt8Engine, "onnx": OnnxEngine, "torch": TorchEngine}[engine]
    return cls(Path(weights), threads=threads)


# ---------------------------------------------------------------------------------------------
# The streaming pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decoded:
    sources: tuple[ImageSource, ...]
    images: np.ndarray  # uint8 (k, S, S, 3) for the sources that decoded
    ok: tuple[int, ...]  # index into sources of each decoded image
    errors: dict[int, str]
    digests: dict[int, str]  # sha256 of the bytes of each source that could be read


def _decode_batch(sources: Sequence[ImageSource], size: int) -> _Decoded:
    images, ok, errors, digests = [], [], {}, {}
    for i, src in enumerate(sources):
        try:
            data = read_bytes(src)
            digests[i] = hashlib.sha256(data).hexdigest()
            images.append(decode_image(data, size=size))
            ok.append(i)
        except ImageError as exc:
            errors[i] = str(exc)
    arr = np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)
    return _Decoded(tuple(sources), arr, tuple(ok), errors, digests)


def _rows(
    decoded: _Decoded, prob: np.ndarray, quality: Sequence[str], threshold: float
) -> list[dict]:
    rows = []
    probs = dict(zip(decoded.ok, zip(prob.tolist(), quality)))
    for i, src in enumerate(decoded.sources):
        p, q = probs.get(i, (None, None))
        rows.append(
            {
                "path": src.path,
                "case_id": case_id(src.name),
                "label": label_from_path(src.path),
                "prob_parasitized": p,
                "prediction": None if p is None else predicted_class(p, threshold),
                "quality": q,
                "error": decoded.errors.get(i),
                "duplicate_of": None,
                "sha256": decoded.digests.get(i),
            }
        )
    return rows


def mark_duplicates(rows: list[dict], seen: dict[str, str]) -> None:
    """Rows whose file has the same bytes as one already in ``seen`` (sha256 -> path, updated
    with the new files) become duplicates of it, in place: ``duplicate_of`` names the first,
    and they keep no probability or prediction, so the file is counted once."""
    for row in rows:
        digest = row.get("sha256")
        if digest is None or row["error"] is not None:
            continue
        first = seen.setdefault(digest, row["path"])
        if first != row["path"]:
            row.update(duplicate_of=first, prob_parasitized=None, prediction=None)


def score_batch(sources: Sequence[ImageSource], engine: Engine, threshold: float) -> list[dict]:
    """Read, decode and score one batch: one row per source (RESULT_COLUMNS and ``sha256``),
    in order, duplicates not yet marked (:func:`mark_duplicates`). What runs in each of
    iter_scored's threads, and in each actor of a cluster (core.cluster)."""
    decoded = _decode_batch(sources, engine.contract.input_size)
    if not decoded.ok:
        return _rows(decoded, np.empty(0, np.float32), [], threshold)
    prob, features = engine.score(decoded.images)
    return _rows(decoded, prob, engine.gate(decoded.images, features), threshold)


def iter_scored(
    sources: Iterable[ImageSource],
    engine: Engine,
    *,
    threshold: float | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    seen: dict[str, str] | None = None,
) -> Iterator[list[dict]]:
    """Score ``sources`` in batches; yields one list of result rows (RESULT_COLUMNS and the
    ``sha256`` of the file) per batch.

    Each of ``workers`` threads decodes a batch and runs the model on it (both release the
    GIL), so decoding and inference overlap with no hand-off; at most two batches per worker
    are in flight, so memory stays flat whatever the number of images. Batches come out in
    input order. A file that cannot be read or decoded becomes a row with ``error`` set and no
    probability; it never stops the run. A file with the same bytes as an earlier one (or one
    in ``seen``, sha256 -> path) is marked a duplicate of it (:func:`mark_duplicates`).
    """
    threshold = engine.contract.threshold if threshold is None else threshold
    seen = {} if seen is None else seen
    workers = workers or cpu_count()
    it = iter(sources)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque = deque()
    # One batch per core already: BLAS threads under the quality gate's matrix products would
    # oversubscribe the cores (measured: scoring at 0.69x instead of 0.95x; bench.gate).
    blas = threadpool_limits(limits=1, user_api="blas")
    try:
        while True:
            while len(pending) < 2 * workers:
                chunk = tuple(islice(it, batch_size))
                if not chunk:
                    break
                pending.append(pool.submit(score_batch, chunk, engine, threshold))
            if not pending:
                return
            rows = pending.popleft().result()
            mark_duplicates(rows, seen)  # here, in input order: the first copy is the one kept
            yield rows
    finally:  # also on Ctrl-C or an abandoned generator: drop queued batches, don't wait
        pool.shutdown(wait=True, cancel_futures=True)
        blas.restore_original_limits()


# What turns sources into batches of result rows, in input order, duplicates marked against
# ``seen``, called as iter_scored(sources, engine, threshold=, batch_size=, seen=): iter_scored
# on this machine, core.cluster.RayScorer on a Ray cluster.
BatchScorer = Callable[..., Iterator[list[dict]]]


def score_sources(
    sources: Sequence[ImageSource],
    engine: Engine,
    *,
    store: ResultStore | None = None,
    run_id: str | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
    collect: bool = True,
    batch_size: int = 64,
    scorer: BatchScorer = iter_scored,
) -> pd.DataFrame | None:
    """Score ``sources`` with ``scorer``, saving each batch to ``store`` under ``run_id`` when
    given.

    Returns a DataFrame with RESULT_COLUMNS (one row per source, in input order) when
    ``collect``, else None (the store holds the results). ``progress(done, total)`` is called
    after each batch. Files with the same bytes as one scored before (in this call or, for a
    resumed run, already in the store) are duplicate rows.
    """
    rows: list[dict] = []
    done, total = 0, len(sources)
    seen = store.digests(run_id) if store is not None and run_id is not None else {}
    for batch in scorer(sources, engine, threshold=threshold, batch_size=batch_size, seen=seen):
        if store is not None and run_id is not None:
            store.add_results(run_id, batch)
        if collect:
            rows.extend(batch)
        done += len(batch)
        if progress:
            progress(done, total)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS)) if collect else None


def upload_run(
    items: Iterable[tuple[str, bytes]],
    engine: Engine,
    store: ResultStore | None,
    *,
    threshold: float | None = None,
    kind: str,
) -> tuple[list[ImageSource], str | None]:
    """The sources of an upload and, with a ``store``, the new run (of ``kind``) they go to.
    Raises ValueError if the upload holds no image."""
    sources = sources_from_uploads(items)
    if not sources:
        raise ValueError(
            "no images found in the upload (accepted: PNG, JPEG, TIFF, BMP, WebP, and zips of them)"
        )
    run_id = None
    if store is not None:
        run_id = store.new_run(
            inputs=sorted({s.path.split(ZIP_SEP)[0] for s in sources}),
            weights=str(engine.folder),
            weights_sha256=engine.sha256,
            threshold=engine.contract.threshold if threshold is None else threshold,
            engine=engine.name,
            kind=kind,
        )
        store.set_total(run_id, len(sources))
    return sources, run_id


def score_uploads(
    items: Iterable[tuple[str, bytes]],
    *,
    weights: Path | str = DEFAULT_WEIGHTS,
    engine: Engine | None = None,
    store: ResultStore | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, str | None]:
    """Score uploaded files given as (name, bytes); zips are opened and their images scored.

    Returns (results DataFrame, run id in ``store`` or None). Raises ValueError if the upload
    holds no image.
    """
    engine = engine or load_engine(weights)
    sources, run_id = upload_run(items, engine, store, threshold=threshold, kind="upload")
    df = score_sources(
        sources, engine, store=store, run_id=run_id, threshold=threshold, progress=progress
    )
    if store is not None and run_id is not None:
        store.finish(run_id)
    return df, run_id


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score cell images (files, folders, zips) as Parasitized or Uninfected.",
        epilog="Exit status: 0 all scored, 1 some error rows, 2 bad input, weights, output "
        "or store, or nothing scored; 130 interrupted (results so far are kept; use "
        "--resume).",
    )
    p.add_argument("inputs", nargs="*", help="image files, folders or zips")
    p.add_argument("--out", type=Path, help="CSV of per-image results")
    p.add_argument("--summary", type=Path, help="CSV of per-case (or per-folder) parasitemia")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="model folder")
    p.add_argument(
        "--threshold", type=float, help="decision threshold on P(Parasitized); default: the model's"
    )
    p.add_argument(
        "--band",
        type=float,
        default=REVIEW_BAND,
        help="half-width of the review band around the threshold: scored cells "
        "whose P(Parasitized) lies within it are marked 'uncertain' in the "
        f"review column, for a human (default {REVIEW_BAND})",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        help="default: the model's (onnx-int8 where its card records that int8 "
        "passed the agreement check on the test patients, else onnx)",
    )
    p.add_argument("--group-by", choices=("case", "folder"), default="case")
    p.add_argument("--resume", metavar="RUN_ID", help="score only what RUN_ID is missing")
    p.add_argument(
        "--store",
        type=Path,
        help="result store (SQLite); default $MALARIA_STORE or runs/results.sqlite",
    )
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="score images that symbolic links in an input folder point to outside "
        "it (DVC, git-annex); by default each such link is an error row",
    )
    p.add_argument("--name", help="a name for the run (the dashboard lists runs by it)")
    p.add_argument("--sample", help="free text: the sample, slide or patient scored")
    p.add_argument("--operator", help="free text: who ran it")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="score on a Ray cluster (an optional extra: requirements-cluster.lock): local "
        "(the default) starts one on this machine for the run; auto, HOST:PORT or "
        "ray://HOST:PORT joins a running one, whose machines see INPUT at the same paths",
    )
    p.add_argument(
        "--ray-actors",
        type=_positive_int,
        help="with --ray: scoring actors, one CPU each (default: one per CPU of the cluster)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--no-progress", action="store_true")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except StoreError as exc:  # locked, corrupt, read-only or full: one line, not a traceback
        return _fail(str(exc))


def _main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core import cluster

    if args.ray is not None:  # before anything is scored or stored
        try:
            cluster.check_address(args.ray)
            cluster.require_ray()
        except (ValueError, cluster.ClusterError) as exc:
            return _fail(str(exc))
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        return _fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if not 0 <= args.band <= 0.5:
        return _fail(f"--band must be in [0, 0.5], got {args.band}")
    try:  # before any scoring: a typo in --out must not cost the whole run
        for out in (args.out, args.summary):
            if out:
                check_output(out)
        if args.out and args.summary and args.out.resolve() == args.summary.resolve():
            raise OutputError("--out and --summary name the same file")
    except OutputError as exc:
        return _fail(str(exc))
    scorer: BatchScorer = iter_scored
    on = ExitStack()  # with --ray: the cluster, joined before anything is stored
    if args.ray is not None:
        try:
            where = on.enter_context(cluster.connect(args.ray))
        except cluster.ClusterError as exc:
            return _fail(str(exc))
        print(f"scoring on a {where}", file=sys.stderr)
        scorer = cluster.RayScorer(actors=args.ray_actors)
    with on, ResultStore(args.store) as store:
        try:
            if args.resume:
                info = store.run(args.resume)
                inputs, weights, threshold = list(info.inputs), Path(info.weights), info.threshold
                engine = load_engine(weights, args.engine or info.engine)
                if engine.sha256 != info.weights_sha256:
                    raise WeightsError(
                        f"run {info.run_id} was scored with weights "
                        f"{info.weights_sha256[:12]}..., {weights} now holds "
                        f"{engine.sha256[:12]}...; start a new run instead"
                    )
                run_id = info.run_id
            else:
                if not args.inputs:
                    print("error: give at least one INPUT (or --resume RUN_ID)", file=sys.stderr)
                    return 2
                inputs = [str(Path(i).resolve()) for i in args.inputs]
                engine = load_engine(args.weights, args.engine)
                threshold = engine.contract.threshold if args.threshold is None else args.threshold
                run_id = None
            sources = unique_paths(iter_sources(inputs, follow_links=args.follow_links))
        except (FileNotFoundError, WeightsError, ValueError, StoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if run_id is None:
            run_id = store.new_run(
                inputs=inputs,
                weights=str(engine.folder.resolve()),
                weights_sha256=engine.sha256,
                threshold=threshold,
                engine=engine.name,
                kind="files",
                name=args.name,
                sample=args.sample,
                operator=args.operator,
            )
        store.set_total(run_id, len(sources))
        done = store.done_paths(run_id)
        todo = [s for s in sources if s.path not in done]
        print(
            f"run {run_id}: {len(sources)} images, {len(done)} already stored, "
            f"{len(todo)} to score ({engine.name} engine); quality gate: "
            f"{engine.gate.describe()}",
            file=sys.stderr,
        )
        bar = tqdm(total=len(todo), unit="img", disable=args.no_progress, smoothing=0.1)
        try:
            score_sources(
                todo,
                engine,
                store=store,
                run_id=run_id,
                threshold=threshold,
                collect=False,
                batch_size=args.batch_size,
                progress=lambda d, _t: bar.update(d - bar.n),
                scorer=scorer,
            )
        except cluster.ClusterError as exc:
            bar.close()
            return _fail(f"{exc}; results so far are kept: continue with --resume {run_id}")
        except KeyboardInterrupt:
            bar.close()
            print(
                f"\ninterrupted: results so far are kept in {store.path}; "
                f"continue with --resume {run_id}",
                file=sys.stderr,
            )
            return 130
        bar.close()
        store.finish(run_id)

        def reviewed() -> Iterator[pd.DataFrame]:
            for chunk in store.iter_results(run_id):
                yield chunk.assign(review=review(chunk, threshold=threshold, band=args.band))

        if args.out:
            try:
                write_csv(args.out, reviewed(), columns=(*RESULT_COLUMNS, "review"))
            except OSError as exc:
                return _fail(
                    f"cannot write {args.out} ({exc}); the results are kept in "
                    f"{store.path}: export them again with --resume {run_id} --out FILE"
                )
        summary = parasitemia_summary(
            reviewed(), group_by=args.group_by, cutoff=engine.weights.screening_cutoff
        )
        n_dup = sum(int(c["duplicate_of"].notna().sum()) for c in store.iter_results(run_id))
    with pd.option_context("display.max_rows", 200, "display.width", 140):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.summary:
        try:
            write_csv(args.summary, summary)
        except OSError as exc:
            return _fail(f"cannot write {args.summary} ({exc})")
    n_err, n_scored = int(summary["errors"].sum()), int(summary["scored"].sum())
    n_out, n_unsure = int(summary["not_counted"].sum()), int(summary["uncertain"].sum())
    print(
        f"{n_scored} scored and counted, {n_err} errors, {n_out} not counted (failed the "
        f"quality gate), {n_unsure} uncertain (P(Parasitized) within {args.band:g} of "
        f"{threshold:g}); the last two are listed for review in the review column"
        + (f"; {n_dup} duplicates (same bytes as another file: counted once)" if n_dup else "")
        + f"; run {run_id}"
        + (f"; results in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    if not n_scored and not n_out:
        return _fail("no image could be scored; the error column says why for each input")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
