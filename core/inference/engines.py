"""Scoring engines: uint8 images (N, S, S, 3) at the contract size -> P(Parasitized) float32 (N,)
and the pooled features the quality gate reads, from one forward pass.

``torch`` (PyTorch eager, the reference), ``onnx`` (ONNX Runtime, fp32) and ``onnx-int8``
(the fp32 export quantised on the model's calibration cells). The ONNX graphs come from the
signed export cache (core.inference.onnx_cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.inference.gate import Gate
from core.inference.onnx_cache import cached_export, onnx_path, signed_cache
from core.inference.quantize import (
    calibration_images,
    default_engine,
    quantize_onnx,
    required_calibration,
)
from core.schema.contract import (
    DEFAULT_WEIGHTS,
    ModelContract,
    ModelFolder,
    read_card,
)

ENGINES = ("onnx-int8", "onnx", "torch")


class Engine:
    name: str
    weights: ModelFolder  # the model folder it scores with, verified
    gate: Gate  # the quality gate of these weights (core.inference.gate)

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


class OnnxEngine(Engine):
    """ONNX Runtime on the CPU, from an export cached by the weights' sha256."""

    name = "onnx"

    def __init__(self, folder: Path, *, threads: int | None = None) -> None:
        self.weights = ModelFolder.open(folder)
        self.graph = self._graph()
        self._threads = threads or 1
        self.session = self._session()
        self.gate = Gate.for_model(self.weights, self.name)

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

    # Pickled for another process (a Ray actor, core.inference.cluster): the graph's bytes, the
    # gate and the settings travel, and the session is built there, so that process needs
    # neither the model folder nor this machine's export cache.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.session = self._session()

    def _graph(self) -> bytes:
        return cached_export(self.folder, self.sha256, self.contract)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob, features = self.session.run(None, {"images": np.ascontiguousarray(images)})
        return prob, features


class OnnxInt8Engine(OnnxEngine):
    """The fp32 export quantised to int8 on the model's calibration cells (core.inference.quantize),
    built on first use and cached, signed, per weights hash and calibration set."""

    name = "onnx-int8"

    def _graph(self) -> bytes:
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

        return signed_cache(
            onnx_path(self.sha256, self.contract, calibration=rec.cache_key()), build
        )


class TorchEngine(Engine):
    """PyTorch eager (channels_last): the reference the ONNX export is checked against."""

    name = "torch"

    def __init__(self, folder: Path, *, threads: int | None = None) -> None:
        # PyTorch only for this engine: the ONNX engines and the scoring CLI never load it
        import torch

        from core.nets.model import load_model

        # the pipeline already runs one batch per core; more threads per batch oversubscribe
        torch.set_num_threads(threads or 1)
        loaded = load_model(folder)
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.weights = ModelFolder(Path(loaded.folder), loaded.card, loaded.contract, loaded.sha256)
        self.gate = Gate.for_model(self.weights, self.name)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch  # loaded already by __init__ (a sys.modules lookup)

        from core.nets.model import logits_and_features, normalize, positive_probability

        with torch.no_grad():
            logits, features = logits_and_features(
                self.model, normalize(torch.from_numpy(images), self.contract)
            )
        return positive_probability(logits, self.contract).numpy(), features.numpy()


def load_engine(
    weights: Path | str = DEFAULT_WEIGHTS,
    engine: str | None = None,
    *,
    threads: int | None = None,
) -> Engine:
    """An engine for the model folder ``weights``; ``engine`` None: the model's default
    (``core.inference.quantize.default_engine``: int8 only where its card records that it passed the
    agreement check on the test patients). Raises WeightsError, ValueError."""
    if engine is None:
        engine = default_engine(read_card(weights))
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    cls = {"onnx-int8": OnnxInt8Engine, "onnx": OnnxEngine, "torch": TorchEngine}[engine]
    return cls(Path(weights), threads=threads)
