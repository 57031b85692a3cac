"""The ONNX export of a model folder, cached per weights hash and contract and signed with this
user's key (a graph replaced in the cache is built again, never run).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from core.schema.contract import (
    ModelContract,
)
from core.schema.files import REPO_ROOT, atomic_path

CACHE_DIR = Path(os.environ.get("MALARIA_CACHE", REPO_ROOT / ".cache"))


# Signs the ONNX exports in CACHE_DIR; kept apart from them, readable by this user only.
KEY_FILE = Path(
    os.environ.get("MALARIA_CACHE_KEY")
    or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    / "malaria-screening"
    / "cache.key"
)


_EXPORT_VERSION = 2  # bump when export_onnx changes what it writes (2: pooled features too)


_QUANTIZE_VERSION = (
    2  # bump when core.inference.quantize.quantize_onnx changes what it writes (2: pixels in)
)


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


def cached_export(folder: Path, sha256: str, contract: ModelContract) -> bytes:
    """The ONNX graph's bytes, exported once per weights and contract (see signed_cache)."""
    return signed_cache(onnx_path(sha256, contract), lambda out: export_onnx(folder, out))


def signed_cache(path: Path, build: Callable[[Path], object]) -> bytes:
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
    """Export the model in ``folder`` to ONNX, normalisation and the calibrated
    softmax included.

    The graph takes uint8 NHWC images at the contract size and returns P(Parasitized) (N,)
    and the pooled features (N, C) the quality gate reads, from the same forward pass.
    """
    # PyTorch only to export, once per weights: scoring from the cache never loads it
    import torch

    from core.nets.model import load_model, logits_and_features, normalize, positive_probability

    loaded = load_model(folder)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = loaded.model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, features = logits_and_features(self.model, normalize(x, loaded.contract))
            return positive_probability(logits, loaded.contract), features

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
