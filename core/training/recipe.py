"""The training recipe: its configuration, and the data it trains on, made ready.

A recipe is everything that decides what a training run learns except the patients: the
architecture, epochs, learning rate, augmentation and which leading layers stay frozen.
``malaria train`` trains one model with it, ``malaria folds`` five (one per patient fold),
``malaria lr-find`` probes its learning rate, ``malaria study`` compares architectures.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torchvision.transforms import functional as TF
from tqdm import tqdm

from core.data.sources import load_array
from core.data.splits import DataError, Sample, Split, labelled_samples, split_by_case
from core.nets.model import default_contract, normalize
from core.schema.contract import INPUT_SIZES, ModelContract
from core.schema.files import invocation
from core.schema.labels import CLASSES
from core.training.audit import read_decisions_table


class TrainingError(ValueError):
    """A recipe, split or run folder that training cannot use; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "mobilenet_v2"
    pretrained: bool = True
    epochs: int = 8
    batch_size: int = 64
    lr: float | None = None  # None: use the LR range test's suggestion
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1  # the NIH labels carry a few percent of noise
    # Stain and lighting differ between patients: per-image channel gains, brightness,
    # contrast and saturation, kept small so a parasite's purple stays purple.
    colour_jitter: float = 0.15
    # Leading feature modules kept at their ImageNet values (pretrained only): the 64- and 32-px
    # layers hold generic edge/colour filters and cost half of each backward pass on a CPU.
    freeze: int = 4
    # The side the cells are resized to (the NIH crops are about 100-200 px, stored at 128):
    # a larger input upsamples them, which ImageNet-trained filters may read better, at
    # about (size / 128)^2 the cost.
    input_size: int = 128
    blur: float = 0.0  # share of images blurred a little (Gaussian, sigma up to 1 px): focus varies
    # Stain jitter in haematoxylin-eosin-DAB space (Tellez et al. 2018): each stain's optical
    # density scaled by 1 +- stain and shifted by +- stain, per image; another lab's stain.
    stain: float = 0.0
    # From this epoch on the weights after each epoch are averaged into the model kept (SWA:
    # an ensemble of the last epochs that scores as one network); 0 keeps one epoch instead.
    average_from: int = 0
    # Keep the last epoch even with validation patients: the rule a model trained on every
    # patient must follow, so that fold models estimate it (False: the lowest validation loss).
    keep_last: bool = False
    val_frac: float = 0.15
    test_frac: float = 0.15
    seed: int = 0


@dataclass
class PreparedData:
    split: Split
    samples: dict[str, list[Sample]]  # part -> samples
    train_x: torch.Tensor  # uint8 (N, S, S, 3)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_data(
    data: Sequence[str | Path],
    *,
    contract: ModelContract,
    cfg: TrainConfig,
    split: Split | None = None,
    progress: bool = True,
    follow_links: bool = False,
    decisions: pd.DataFrame | None = None,
) -> PreparedData:
    """Find labelled images, split them by case (or use ``split``), decode every part.

    ``follow_links``: read images that symbolic links in a data folder point to outside it.
    ``decisions``: a label audit's decisions (``core.training.audit.read_decisions_table``),
    applied to the training and validation patients only: the test patients' labels are never
    touched.
    """
    samples, sources = labelled_samples(data, follow_links=follow_links)
    split = split or split_by_case(
        samples, val_frac=cfg.val_frac, test_frac=cfg.test_frac, seed=cfg.seed
    )
    if decisions is not None and len(decisions):
        samples = apply_decisions(samples, decisions, split)
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for s in samples:
        parts[split.part_of(s.case_id)].append(s)
    arrays = {}
    for name, items in parts.items():
        with tqdm(
            total=len(items), desc=f"decoding {name}", leave=False, disable=not progress
        ) as bar:
            arrays[f"{name}_x"] = torch.from_numpy(
                load_array(
                    [sources[s.path] for s in items], size=contract.input_size, progress=bar.update
                )
            )
        arrays[f"{name}_y"] = torch.tensor([s.label for s in items], dtype=torch.int64)
    return PreparedData(split=split, samples=parts, **arrays)


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's
# rgb_from_hed: optical density in RGB = stain amounts @ this matrix.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def stain_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per image, each stain's amount a -> a * U(1 - s, 1 + s) + U(-s, s) in HED optical-density
    space. ``x``: float (N, 3, H, W) in [0, 1] -> the same, clamped; black stays black."""
    n = x.shape[0]
    od = -torch.log(x.clamp(min=1 / 255)).permute(0, 2, 3, 1)  # (N, H, W, 3)
    hed = od @ HED_FROM_RGB
    scale = 1 + (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    shift = (torch.rand(n, 1, 1, 3, generator=generator) * 2 - 1) * strength
    od = (hed * scale + shift) @ RGB_FROM_HED
    return torch.exp(-od).permute(0, 3, 1, 2).clamp_(0, 1).contiguous()


def augment(
    x: torch.Tensor,
    *,
    jitter: float,
    generator: torch.Generator,
    blur: float = 0.0,
    stain: float = 0.0,
) -> torch.Tensor:
    """Random dihedral transform, stain jitter (``stain_jitter``), colour jitter and (with
    probability ``blur``) defocus per image.

    ``x``: uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]. Cells have no up or
    orientation, so all 8 flips/rotations are label-preserving.
    """
    x = x.permute(0, 3, 1, 2).float().div_(255)
    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.stack(
        [torch.rot90(img.flip(-1) if f else img, int(r), (1, 2)) for img, r, f in zip(x, k, flip)]
    )
    if stain > 0:
        x = stain_jitter(x, stain, generator)
    if jitter > 0:

        def factor(*shape: int) -> torch.Tensor:
            return 1 + (torch.rand(n, *shape, generator=generator) * 2 - 1) * jitter

        x = x * factor(3, 1, 1) * factor(1, 1, 1)  # stain tint, then brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor(1, 1, 1) + mean  # contrast
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = (x - grey) * factor(1, 1, 1) + grey  # saturation
        x = x.clamp_(0, 1)
    if blur > 0:  # the same defocus on the cell whatever size it was resized to
        scale = x.shape[-1] / 128
        kernel = 2 * round(2 * scale) + 1
        for i in torch.nonzero(torch.rand(n, generator=generator) < blur).flatten().tolist():
            sigma = 0.3 + 0.7 * float(torch.rand(1, generator=generator))
            x[i] = TF.gaussian_blur(x[i], kernel_size=kernel, sigma=sigma * scale)
    return x


def training_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    contract: ModelContract,
    *,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of augmented, normalised batches (float NCHW channels_last, labels)."""
    order = torch.randperm(len(x), generator=generator)
    for i in range(
        0, len(order) - cfg.batch_size + 1 if len(order) >= cfg.batch_size else 1, cfg.batch_size
    ):
        idx = order[i : i + cfg.batch_size]
        batch = augment(
            x[idx], jitter=cfg.colour_jitter, generator=generator, blur=cfg.blur, stain=cfg.stain
        )
        yield normalize(batch, contract), y[idx]


def apply_decisions(
    samples: Sequence[Sample], table: pd.DataFrame, split: Split | None
) -> list[Sample]:
    """``samples`` with audited labels flipped (``relabel``) or dropped (``exclude``), as the
    decisions ``table`` (DECISION_COLUMNS, checked: ``read_decisions_table``) says.

    Cells of the split's test patients keep their labels whatever the file says. Raises
    DataError if a decision names a cell that is not in the data, or gives it another label or
    case id than the data does (a file made for other data, or for other labels: relabelling
    such a cell would flip the wrong label).
    """
    known = {s.path: s for s in samples}
    unknown = [p for p in table["path"] if p not in known]
    if unknown:
        raise DataError(
            f"{len(unknown)} cells in the decisions file are not in the data, "
            f"e.g. {unknown[0]}: was it made for other data?"
        )
    for row in table.itertuples():
        s = known[row.path]
        if (row.label, str(row.case_id)) != (CLASSES[s.label], s.case_id):
            raise DataError(
                f"the decisions file gives {row.path} label {row.label!r} and case "
                f"{row.case_id!r}, the data {CLASSES[s.label]!r} and {s.case_id!r}: was it made "
                "for other labels or data?"
            )
    decisions = dict(zip(table["path"], table["decision"]))
    test = set(split.test) if split else set()
    out = []
    for s in samples:
        decision = "keep" if s.case_id in test else decisions.get(s.path, "keep")
        if decision == "exclude":
            continue
        out.append(Sample(s.path, s.case_id, 1 - s.label) if decision == "relabel" else s)
    return out


def recipe_contract(cfg: TrainConfig) -> ModelContract:
    """The contract a model trained with ``cfg`` is scored under (its architecture and input
    size; the other fields at their defaults until training fills them in)."""
    if cfg.input_size not in INPUT_SIZES:
        raise TrainingError(
            f"--input-size must be in [{INPUT_SIZES.start}, {INPUT_SIZES.stop - 1}], "
            f"got {cfg.input_size}"
        )
    return default_contract(cfg.arch, input_size=cfg.input_size)


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options of a recipe, shared by ``malaria train`` and ``malaria folds``."""
    p.add_argument("--data", required=True, nargs="+", help="labelled folder(s) or zip(s)")
    p.add_argument(
        "--arch",
        default="mobilenet_v2",
        help="mobilenet_v2 (ImageNet weights), mobilenet_v3_small/large (from scratch)",
    )
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument(
        "--lr",
        default="auto",
        help="max learning rate of the one-cycle schedule, "
        "or 'auto' to run the LR range test first",
    )
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument(
        "--colour-jitter",
        type=float,
        default=TrainConfig.colour_jitter,
        help="strength of the per-image stain/brightness/contrast/saturation jitter",
    )
    p.add_argument(
        "--blur",
        type=float,
        default=TrainConfig.blur,
        help="share of training images given a slight Gaussian blur",
    )
    p.add_argument(
        "--stain",
        type=float,
        default=TrainConfig.stain,
        help="strength of the per-image stain jitter in HED space (0.05: light, 0.2: strong)",
    )
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument(
        "--input-size",
        type=int,
        default=TrainConfig.input_size,
        help="side in pixels the cells are resized to (128: as stored; 160, 224: upsampled, "
        "about (size/128)^2 the time)",
    )
    p.add_argument(
        "--freeze",
        type=int,
        default=TrainConfig.freeze,
        help="leading feature modules kept at their ImageNet values (pretrained only)",
    )
    p.add_argument(
        "--average-from",
        type=int,
        default=TrainConfig.average_from,
        help="keep the mean of the weights of this epoch and every later one (stochastic "
        "weight averaging) instead of the epoch with the lowest validation loss",
    )
    p.add_argument(
        "--keep-last",
        action="store_true",
        help="keep the last epoch, not the one with the lowest validation loss (the rule of a "
        "model trained on every patient: fold models that follow it estimate that model)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument(
        "--relabel",
        type=Path,
        help="label-audit decisions CSV (path, decision: "
        "keep/relabel/exclude, as the Audit page saves it) applied to the training "
        "and validation patients",
    )
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="read images that symbolic links in a data folder point to outside it",
    )
    p.add_argument("--no-progress", action="store_true")


def parse_lr(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        lr = float(value)
    except ValueError:
        raise TrainingError(f"--lr must be a number or 'auto', got {value!r}") from None
    if not 0 < lr < 10:
        raise TrainingError(f"--lr must be in (0, 10), got {lr}")
    return lr


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=parse_lr(args.lr),
        seed=args.seed,
        colour_jitter=args.colour_jitter,
        freeze=args.freeze,
        input_size=args.input_size,
        blur=args.blur,
        stain=args.stain,
        weight_decay=args.weight_decay,
        average_from=args.average_from,
        keep_last=args.keep_last,
        pretrained=not args.no_pretrained and args.arch == "mobilenet_v2",
    )


def recipe_argv(args: argparse.Namespace) -> list[str]:
    """The recipe's options as a command line (the reproducible part of a run's command)."""
    argv = [
        "--data",
        *map(str, args.data),
        "--arch",
        args.arch,
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--colour-jitter",
        str(args.colour_jitter),
        "--blur",
        str(args.blur),
        "--weight-decay",
        str(args.weight_decay),
        "--freeze",
        str(args.freeze),
    ]
    if args.input_size != TrainConfig.input_size:
        argv += ["--input-size", str(args.input_size)]
    if args.stain:
        argv += ["--stain", str(args.stain)]
    if args.average_from:
        argv += ["--average-from", str(args.average_from)]
    for flag in ("keep_last", "no_pretrained", "follow_links"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.relabel:
        argv += ["--relabel", str(args.relabel)]
    return argv


def command(name: str, args: argparse.Namespace, *extra: str) -> str:
    """``malaria COMMAND ...``: the command line that reproduces a run (without --resume)."""
    return invocation(name, [*recipe_argv(args), *extra])


def data_from_args(args: argparse.Namespace, cfg: TrainConfig, split: Split | None) -> PreparedData:
    """``prepare_data`` as a command's recipe options ask (its data, ``--follow-links``,
    ``--no-progress``, and the label decisions of ``--relabel``)."""
    decisions = None
    if args.relabel:
        decisions = read_decisions_table(args.relabel)
    return prepare_data(
        args.data,
        contract=recipe_contract(cfg),
        cfg=cfg,
        split=split,
        progress=not args.no_progress,
        follow_links=args.follow_links,
        decisions=decisions,
    )
