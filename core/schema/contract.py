"""The model contract: what a model expects and means, and its card on disk.

Torch-free on purpose: the ONNX scoring path reads cards without importing PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.schema.files import REPO_ROOT, write_json
from core.schema.labels import CLASSES, PARASITIZED
from core.schema.screening import Screening, ScreeningError

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "default"
# the model with test patients no choice touched (70 / 15 / 15); the shipped one has none
HOLDOUT_WEIGHTS = REPO_ROOT / "weights" / "holdout"
ARCHS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "small_cnn")
INPUT_SIZES = range(32, 1025)  # below 32 px the MobileNets' five stride-2 stages leave nothing


class WeightsError(RuntimeError):
    """Weights that cannot be used: missing, tampered, pickled, or not matching the card."""


class ContractError(ValueError):
    """A model contract whose values cannot be right (unknown classes, a threshold outside
    [0, 1]...)."""


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def contract_problems(c: ModelContract) -> list[str]:
    """What is wrong with ``c``, in words; empty when it is usable."""
    problems = []
    if c.arch not in ARCHS:
        problems.append(f"arch {c.arch!r} is not one of {', '.join(ARCHS)}")
    if tuple(c.classes) != CLASSES:
        # the order is the model's output index order: swapped names invert every call
        problems.append(
            f"classes must be exactly {list(CLASSES)} in that order, got {list(c.classes)}"
        )
    if not (
        isinstance(c.input_size, int)
        and not isinstance(c.input_size, bool)
        and c.input_size in INPUT_SIZES
    ):
        problems.append(
            f"input_size must be a whole number of pixels in "
            f"[{INPUT_SIZES.start}, {INPUT_SIZES.stop - 1}], got {c.input_size!r}"
        )
    for name in ("mean", "std"):
        values = getattr(c, name)
        if len(values) != 3 or not all(_is_number(v) for v in values):
            problems.append(f"{name} must be 3 numbers (R, G, B), got {list(values)}")
    if all(_is_number(v) for v in c.std) and not all(v > 0 for v in c.std):
        problems.append(f"std must be positive, got {list(c.std)}")
    if not (_is_number(c.threshold) and 0 <= c.threshold <= 1):
        problems.append(f"threshold must be a probability in [0, 1], got {c.threshold!r}")
    if not (_is_number(c.temperature) and c.temperature > 0):
        problems.append(f"temperature must be a positive number, got {c.temperature!r}")
    if c.target_layer and c.target_layer not in c.cam_layers:
        problems.append(f"target_layer {c.target_layer!r} is not one of cam_layers")
    return problems


@dataclass(frozen=True)
class ModelContract:
    """What a model expects and means; saved in the card, read back by every consumer."""

    arch: str = "mobilenet_v2"
    classes: tuple[str, ...] = CLASSES
    input_size: int = 128  # the NIH copy is 128x128; larger buys little on 100-200 px crops
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Named stages for Grad-CAM, fine to coarse; the target is the explanations' default stage.
    cam_layers: tuple[str, ...] = ()
    target_layer: str = ""
    threshold: float = 0.5  # on P(Parasitized), calibrated
    # The logits are divided by it before the softmax (core.schema.calibration): fitted on
    # out-of-fold predictions so that P(Parasitized) means what it says; 1 = as trained.
    temperature: float = 1.0

    def __post_init__(self) -> None:
        problems = contract_problems(self)
        if problems:
            raise ContractError("invalid model contract: " + "; ".join(problems))

    @property
    def positive_index(self) -> int:
        return self.classes.index(PARASITIZED)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["temperature"] == 1.0:  # an uncalibrated model's card (and its hash) as before
            del d["temperature"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModelContract:
        """The contract saved by ``to_json``. Raises ContractError for invalid values, KeyError
        or TypeError for missing or unknown keys."""
        d = dict(d)
        for key in ("classes", "mean", "std", "cam_layers"):
            d[key] = tuple(d[key])
        return cls(**d)


# The quality gate's feature calibrations (core.inference.gate), one per engine kind: files
# beside the card that change which cells count, hashed into its FILES_KEY.
GATE_FILES = ("quality.npz", "quality_int8.npz")
FILES_KEY = "files_sha256"
# Every key of a card that changes a result, sealed by its contract_sha256: the contract, the
# weights' hash, the screening cutoff, the int8 record (with its calibration file's sha256)
# and the hashes of the gate's files. A new such key is one more name here.
SEALED_KEYS = ("contract", "sha256", "screening", "int8", FILES_KEY)


def contract_sha256(card: dict) -> str:
    """The hash a card records over its SEALED_KEYS: changing a single value of one (a swapped
    class, another threshold or cutoff, a calibration file's hash), or moving them to other
    weights, no longer matches it."""
    payload = json.dumps(
        {key: card.get(key) for key in SEALED_KEYS}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def card_problems(card: dict) -> list[str]:
    """What is wrong with the card's values beyond its contract (its screening rule), in
    words; empty when it is usable."""
    if "screening" not in card:
        return []
    try:
        Screening.from_card(card["screening"])
    except ScreeningError as exc:
        return [str(exc)]
    return []


def explain_check_paths(folder: Path | str, split: str = "test") -> tuple[Path, Path]:
    """(table CSV, summary JSON) of a model folder's heatmap check on ``split``
    (``malaria check heatmaps``)."""
    suffix = "" if split == "test" else f"_{split}"
    return (
        Path(folder) / f"explain_check{suffix}.csv",
        Path(folder) / f"explain_check{suffix}.json",
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_card(path: Path) -> tuple[dict, ModelContract]:
    try:
        card = json.loads(path.read_text())
        problems = card_problems(card)
        if problems:
            raise ContractError("; ".join(problems))
        return card, ModelContract.from_json(card["contract"])
    except ContractError as exc:
        raise WeightsError(f"{path}: {exc}; refusing this model") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path} is not a valid model card ({exc!r})") from None


def read_card(folder: Path | str) -> dict:
    """The card of a model folder, its contract validated and checked against the card's
    ``contract_sha256``.

    Raises WeightsError if there is no card, its contract is invalid, it has no
    ``contract_sha256`` (a card written before contracts were hashed: check it, then
    ``malaria seal FOLDER``), or the contract no longer matches that hash.
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise WeightsError(f"no {CARD_FILE} in {folder}: not a model folder")
    card, contract = _parse_card(path)
    recorded = card.get("contract_sha256")
    if recorded is None:
        raise WeightsError(
            f"{path} has no contract_sha256 (written before model contracts were "
            "hashed); check its contract, then run "
            f"`malaria seal {folder}` to accept it"
        )
    if recorded != contract_sha256(card):
        raise WeightsError(
            f"the model card {path} does not match its contract_sha256: the contract, "
            "screening cutoff, int8 record or a file hash was changed after the model was "
            f"sealed ({', '.join(SEALED_KEYS)} are); refusing this model (a card sealed before "
            f"all of these were: check them, then `malaria seal --force {folder}`)"
        )
    return card


def verified_weights(folder: Path | str) -> tuple[dict, Path, str]:
    """(card, weights path, sha256) after checking the weights file against its card.

    Raises WeightsError if the card or weights are missing or the sha256 differs.
    """
    card = read_card(folder)
    name = card.get("weights_file", WEIGHTS_FILE)
    if Path(name).name != name:
        raise WeightsError(f"the card's weights_file {name!r} must be a file name in {folder}")
    weights = Path(folder) / name
    if not weights.is_file():
        raise WeightsError(f"weights file {weights} is missing")
    digest = sha256_file(weights)
    if digest != card.get("sha256"):
        raise WeightsError(
            f"{weights} does not match its card (sha256 {digest[:12]}... vs "
            f"{str(card.get('sha256'))[:12]}...): the file was changed or replaced; "
            "refusing to load it"
        )
    return card, weights, digest


# The files a model folder may hold beside its weights and card, by what they are.
HISTORY_FILE = "history.csv"
LR_FIND_FILES = ("lr_find.csv", "lr_find.json")
SPLIT_FILE = "split.json"
OOF_FILE = "oof_predictions.csv"
FOLDS_FILE = "folds.json"
AUDIT_FILE = "label_audit.csv"
DECISIONS_FILE = "label_decisions.csv"


def fold_runs(folder: Path | str) -> list[Path]:
    """The k-fold runs' folders (``folds/fold0``, ...) of a model folder that have a training
    history, by fold number."""
    runs = [p.parent for p in Path(folder).glob(f"folds/fold*/{HISTORY_FILE}")]
    return sorted(runs, key=lambda run: (len(run.name), run.name))  # fold10 after fold9


def predictions_path(folder: Path | str, part: str) -> Path:
    """A model folder's predictions of one part: ``test``, ``val`` (its held-back patients) or
    ``oof`` (every development cell, out of fold)."""
    return Path(folder) / (OOF_FILE if part == "oof" else f"{part}_predictions.csv")


@dataclass(frozen=True)
class HeatmapEstimate:
    """How often the default heatmap peaks on the stained parasite in cells of patients the
    k-fold models never saw (``malaria folds`` with each fold's heatmap check)."""

    pointing: float  # share of the checked cells, pooled over the folds
    cells: int  # cells checked, over all folds
    folds: int


@dataclass(frozen=True)
class ModelFolder:
    """A model folder read once and typed: its verified card, its contract, its weights' hash,
    and where its other files are. Pages and commands use this, never the card's raw JSON.

    Open with :meth:`open`, which checks the weights against the card (WeightsError if not).
    """

    path: Path
    card: dict
    contract: ModelContract
    sha256: str

    @classmethod
    def open(cls, folder: Path | str = DEFAULT_WEIGHTS) -> ModelFolder:
        card, _, digest = verified_weights(folder)
        return cls(Path(folder), card, ModelContract.from_json(card["contract"]), digest)

    @property
    def arch(self) -> str:
        return str(self.card.get("arch", self.contract.arch))

    @property
    def split(self) -> dict[str, list[str]]:
        """Case ids per part (train, val, test); empty lists when the card has none."""
        saved = self.card.get("split", {})
        return {part: list(saved.get(part, [])) for part in ("train", "val", "test")}

    @property
    def metrics(self) -> dict[str, dict]:
        """Metrics per part as the training run measured them (train, val, test)."""
        return dict(self.card.get("metrics", {}))

    @property
    def estimate(self) -> tuple[str, dict]:
        """(what it is, metrics) of the model's estimate on patients it never saw: the k-fold
        out-of-fold estimate for a model trained on every patient, else its test patients'
        metrics; ("", {}) when it has neither."""
        if "estimate" in self.card:
            return self.card["estimate"]["source"], dict(self.card["estimate"]["pooled"])
        test = self.metrics.get("test", {})
        return (
            (f"{test.get('cases', '?')} held-back test patients", dict(test)) if test else ("", {})
        )

    @property
    def screening(self) -> Screening:
        """The "likely infected" flag's rule (core.schema.screening), checked by read_card.
        Raises WeightsError if the card records none: no patient can be flagged with it."""
        if "screening" not in self.card:
            raise WeightsError(
                f"{self.path / CARD_FILE} records no screening rule (a model trained without "
                "validation patients): it cannot flag patients"
            )
        return Screening.from_card(self.card["screening"])

    @property
    def heatmap_estimate(self) -> HeatmapEstimate | None:
        """The k-fold estimate of where the default heatmap points; None unless the card has
        one (a model trained on every patient, each fold with its heatmap check)."""
        saved = self.card.get("estimate", {}).get("heatmap")
        if not saved:
            return None
        return HeatmapEstimate(
            float(saved["pointing"]), int(saved["cells"]), len(saved["per_fold"])
        )

    def held_out(self, cases: Iterable[str]) -> bool:
        """Whether every one of ``cases`` is a test patient of this model: never used for its
        training or its selection."""
        return set(cases) <= set(self.split["test"])

    # --- how it was trained ---------------------------------------------------------------

    @property
    def created(self) -> str:
        """When the card was written, ISO 8601 (``2026-11-26T23:43:52+00:00``); "" if unknown."""
        return str(self.card.get("created", ""))

    @property
    def training_data(self) -> tuple[str, ...]:
        """The data sets (files, folders, zips) it was trained on, as given to training."""
        return tuple(str(d) for d in self.card.get("training_data", ()))

    @property
    def adapted(self) -> bool:
        """Whether it was adapted to a lab's smear fields (``malaria adapt``: the card's
        ``adaptation``); if not, it learnt from the NIH cell crops alone."""
        return "adaptation" in self.card

    @property
    def training_command(self) -> str | None:
        """The command line that trained it, shell-quoted."""
        command = self.card.get("training_command")
        return None if command is None else str(command)

    @property
    def settings(self) -> dict[str, object]:
        """The contract and the training configuration as the card records them, one flat
        mapping (a training setting after the contract's value of the same name)."""
        return {**self.card.get("contract", {}), **self.card.get("config", {})}

    @property
    def learning_rate(self) -> float | None:
        """The (peak) learning rate it was trained at; None if not recorded."""
        lr = self.card.get("config", {}).get("lr")
        return float(lr) if lr else None

    @property
    def label_smoothing(self) -> float | None:
        """The label smoothing of its training loss; None without any."""
        eps = self.card.get("config", {}).get("label_smoothing")
        return float(eps) if eps else None

    @property
    def best_epoch(self) -> int | None:
        """The epoch whose weights were kept (the last one averaged, with ``averaged_from``)."""
        best = self.card.get("best_epoch")
        return None if best is None else int(best)

    @property
    def averaged_from(self) -> int | None:
        """The first epoch of the weights averaged into the model (SWA); None: one epoch kept."""
        first = self.card.get("config", {}).get("average_from")
        return int(first) if first else None

    @property
    def selected_by(self) -> str:
        """Why these weights were kept, in words (the lowest validation loss, where the card
        does not say: what training chose before it said)."""
        return str(self.card.get("selected_by", "lowest validation loss"))

    @property
    def kept_weights(self) -> str | None:
        """Which weights training kept, in words: an epoch and why, or the mean of several
        epochs; None if the card does not say."""
        if self.averaged_from:
            return self.selected_by
        best = self.best_epoch
        return f"epoch {best} ({self.selected_by})" if best else None

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def lr_find(self) -> tuple[Path, Path]:
        """(curve CSV, summary JSON) of the run's LR range test."""
        return (self.path / LR_FIND_FILES[0], self.path / LR_FIND_FILES[1])

    def predictions(self, part: str) -> Path:
        return predictions_path(self.path, part)

    def explain_check(self, split: str | None = None) -> tuple[Path, Path]:
        """The heatmap check's files; ``split`` None: on the test patients, or for a model
        trained on every patient, on its development cells (``oof``)."""
        if split is None:
            split = "test" if self.split["test"] else "oof"
        return explain_check_paths(self.path, split)

    @property
    def fold_runs(self) -> list[Path]:
        """The k-fold runs' folders (``folds/fold0``, ...) that have a training history."""
        return fold_runs(self.path)

    @property
    def audit(self) -> Path:
        return self.path / AUDIT_FILE

    @property
    def decisions(self) -> Path:
        return self.path / DECISIONS_FILE


def find_models(*roots: Path) -> list[Path]:
    """Model folders (holding a card.json and weights) in ``roots`` or up to three levels
    under (as ``weights/study/runs/small_cnn``), sorted. The k-fold runs kept in a model folder
    (``folds/fold0``: card and history, no weights) are records, not models to pick."""
    found: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for depth in range(4):
            for card in root.glob("*/" * depth + CARD_FILE):
                if (card.parent / WEIGHTS_FILE).is_file():
                    found.add(card.parent.resolve())
    return sorted(found)


def write_card(folder: Path | str, card: dict) -> dict:
    """Write ``card`` as the card of ``folder``, sealed: the sha256 of the gate's files there
    (GATE_FILES) in its FILES_KEY, then its ``contract_sha256``. What every writer of a card
    (training, ``malaria calibrate``, ``malaria seal``) calls once its values are right;
    returns the card written."""
    folder = Path(folder)
    files = {name: sha256_file(folder / name) for name in GATE_FILES if (folder / name).is_file()}
    card = {**card, FILES_KEY: files}
    card["contract_sha256"] = contract_sha256(card)
    write_json(folder / CARD_FILE, card)
    return card


def reseal(folder: Path | str) -> dict:
    """Seal the card of ``folder`` again after one of its files was rewritten by a command
    that owns it (``malaria calibrate gate``, ``malaria adapt``): the card must be intact
    (read_card), so a changed value is never laundered. Returns the card written."""
    return write_card(folder, read_card(folder))


def seal_card(folder: Path | str, *, force: bool = False) -> str:
    """Seal the card of ``folder`` as it is (``malaria seal``): validate its contract, its
    screening cutoff and its weights' sha256, record the hashes of its gate files and its
    ``contract_sha256``; returns the hash.

    Raises WeightsError if the card is already sealed (unless ``force``: sealing says that
    every value was checked), its values are invalid, or the weights do not match it.
    """
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise WeightsError(f"no {CARD_FILE} in {folder}: not a model folder")
    card, _ = _parse_card(path)
    if "contract_sha256" in card and not force:
        raise WeightsError(
            f"{path} is sealed already; sealing it again accepts every value in it as it is "
            f"now ({', '.join(SEALED_KEYS)}): check them, then `malaria seal --force {folder}`"
        )
    weights = Path(folder) / card.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file() or sha256_file(weights) != card.get("sha256"):
        raise WeightsError(
            f"{weights} is missing or does not match the card's sha256; not sealing it"
        )
    return write_card(folder, card)["contract_sha256"]
