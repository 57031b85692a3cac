"""Transfer learning with a patient-level split, resumable, evaluated on unseen patients.

    python -m core.train --data ../shared/data/nih_cells_dev.zip --out runs/mnv2 --epochs 8 --lr auto

The run folder receives: ``split.json`` (which cases where), ``history.csv`` (one row per
epoch), ``lr_find.csv/json`` (with ``--lr auto``), ``checkpoint.pt`` (resume state),
``model.safetensors`` + ``card.json`` (the best epoch by validation loss), and
``test_predictions.csv`` / ``val_predictions.csv`` (path, case_id, label, prob_parasitized).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import functional as TF
from tqdm import tqdm

from core.data import (CLASSES, Sample, Split, atomic_path, labelled_samples, load_array,
                       split_by_case, write_json)
from core.lr_find import lr_range_test
from core.metrics import binary_metrics, screening_calibration
from core.model import (ModelContract, build_model, default_contract, freeze_features, normalize,
                        predict_proba, save_model)


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
    blur: float = 0.0  # share of images blurred a little (Gaussian, sigma up to 1 px): focus varies
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


def prepare_data(data: Sequence[str | Path], *, contract: ModelContract, cfg: TrainConfig,
                 split: Split | None = None, progress: bool = True,
                 follow_links: bool = False) -> PreparedData:
    """Find labelled images, split them by case (or use ``split``), decode every part.

    ``follow_links``: read images that symbolic links in a data folder point to outside it."""
    samples, sources = labelled_samples(data, follow_links=follow_links)
    split = split or split_by_case(samples, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                                   seed=cfg.seed)
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for s in samples:
        parts[split.part_of(s.case_id)].append(s)
    arrays = {}
    for name, items in parts.items():
        with tqdm(total=len(items), desc=f"decoding {name}", leave=False,
                  disable=not progress) as bar:
            arrays[f"{name}_x"] = torch.from_numpy(load_array(
                [sources[s.path] for s in items], size=contract.input_size, progress=bar.update))
        arrays[f"{name}_y"] = torch.tensor([s.label for s in items], dtype=torch.int64)
    return PreparedData(split=split, samples=parts, **arrays)


def augment(x: torch.Tensor, *, jitter: float, generator: torch.Generator,
            blur: float = 0.0) -> torch.Tensor:
    """Random dihedral transform, colour jitter and (with probability ``blur``) defocus per image.

    ``x``: uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]. Cells have no up or
    orientation, so all 8 flips/rotations are label-preserving.
    """
    x = x.permute(0, 3, 1, 2).float().div_(255)
    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.stack([torch.rot90(img.flip(-1) if f else img, int(r), (1, 2))
                     for img, r, f in zip(x, k, flip)])
    if jitter > 0:
        def factor(*shape: int) -> torch.Tensor:
            return 1 + (torch.rand(n, *shape, generator=generator) * 2 - 1) * jitter
        x = x * factor(3, 1, 1) * factor(1, 1, 1)  # stain tint, then brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor(1, 1, 1) + mean  # contrast
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = (x - grey) * factor(1, 1, 1) + grey  # saturation
        x = x.clamp_(0, 1)
    if blur > 0:
        for i in torch.nonzero(torch.rand(n, generator=generator) < blur).flatten().tolist():
            sigma = 0.3 + 0.7 * float(torch.rand(1, generator=generator))
            x[i] = TF.gaussian_blur(x[i], kernel_size=5, sigma=sigma)
    return x


def training_batches(x: torch.Tensor, y: torch.Tensor, contract: ModelContract, *,
                     cfg: TrainConfig, generator: torch.Generator
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of augmented, normalised batches (float NCHW channels_last, labels)."""
    order = torch.randperm(len(x), generator=generator)
    for i in range(0, len(order) - cfg.batch_size + 1 if len(order) >= cfg.batch_size else 1,
                   cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        batch = augment(x[idx], jitter=cfg.colour_jitter, generator=generator, blur=cfg.blur)
        yield normalize(batch, contract), y[idx]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, contract: ModelContract
             ) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and P(Parasitized) (float64 (N,)) of ``model`` on uint8 images."""
    prob = predict_proba(model, x, contract).double().clamp(1e-7, 1 - 1e-7)
    positive = (y == contract.positive_index).double()
    loss = -(positive * prob.log() + (1 - positive) * (1 - prob).log()).mean()
    return float(loss), prob.numpy()


def _is_positive(y: torch.Tensor, contract: ModelContract) -> np.ndarray:
    return (y == contract.positive_index).numpy().astype(int)


def _predictions_frame(samples: Sequence[Sample], prob: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"path": [s.path for s in samples],
                         "case_id": [s.case_id for s in samples],
                         "label": [CLASSES[s.label] for s in samples],
                         "prob_parasitized": prob})


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a malaria cell classifier, split by patient.")
    p.add_argument("--data", required=True, nargs="+", help="labelled folder(s) or zip(s)")
    p.add_argument("--arch", default="mobilenet_v2",
                   help="mobilenet_v2 (ImageNet weights), mobilenet_v3_small/large (from scratch)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--lr", default="auto", help="max learning rate of the one-cycle schedule, "
                   "or 'auto' to run the LR range test first")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--colour-jitter", type=float, default=TrainConfig.colour_jitter,
                   help="strength of the per-image stain/brightness/contrast/saturation jitter")
    p.add_argument("--blur", type=float, default=TrainConfig.blur,
                   help="share of training images given a slight Gaussian blur")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--freeze", type=int, default=TrainConfig.freeze,
                   help="leading feature modules kept at their ImageNet values (pretrained only)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--split", type=Path, help="use the case split of this split.json or "
                   "card.json (e.g. to compare models on the same patients)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--follow-links", action="store_true",
                   help="read images that symbolic links in a data folder point to outside it")
    p.add_argument("--no-progress", action="store_true")
    return p


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (without --resume)."""
    argv = ["--data", *map(str, args.data), "--arch", args.arch, "--out", str(args.out),
            "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch-size",
            str(args.batch_size), "--seed", str(args.seed), "--colour-jitter",
            str(args.colour_jitter), "--blur", str(args.blur), "--weight-decay",
            str(args.weight_decay), "--freeze", str(args.freeze)]
    if args.no_pretrained:
        argv.append("--no-pretrained")
    if args.split:
        argv += ["--split", str(args.split)]
    if args.follow_links:
        argv.append("--follow-links")
    return "python -m core.train " + shlex.join(argv)


def _parse_lr(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        lr = float(value)
    except ValueError:
        raise SystemExit(f"--lr must be a number or 'auto', got {value!r}") from None
    if not 0 < lr < 10:
        raise SystemExit(f"--lr must be in (0, 10), got {lr}")
    return lr


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if args.resume and not ckpt_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                      lr=_parse_lr(args.lr), seed=args.seed, colour_jitter=args.colour_jitter,
                      freeze=args.freeze, blur=args.blur, weight_decay=args.weight_decay,
                      pretrained=not args.no_pretrained and args.arch == "mobilenet_v2")
    ckpt = torch.load(ckpt_path, weights_only=True) if args.resume else None
    if ckpt:
        cfg = TrainConfig(**ckpt["config"])  # an interrupted run goes on as it was started
    contract = default_contract(cfg.arch)
    split = None
    if ckpt:
        split = Split.from_json(ckpt["split"])
    elif args.split:
        saved = json.loads(args.split.read_text())
        split = Split.from_json(saved.get("split", saved))
    progress = not args.no_progress
    data = prepare_data(args.data, contract=contract, cfg=cfg, split=split, progress=progress,
                        follow_links=args.follow_links)
    write_json(out / "split.json", data.split.to_json())
    print(f"cases: train {len(data.split.train)}, val {len(data.split.val)}, "
          f"test {len(data.split.test)}; cells: train {len(data.train_y)}, "
          f"val {len(data.val_y)}, test {len(data.test_y)}")

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.arch, pretrained=cfg.pretrained).to(memory_format=torch.channels_last)
    freeze_features(model, cfg.freeze if cfg.pretrained else 0)

    lr = cfg.lr
    if lr is None:
        result = lr_range_test(model, lambda: training_batches(
            data.train_x, data.train_y, contract, cfg=cfg, generator=gen),
            label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay,
            progress=progress)
        result.save(out)
        lr = result.suggested_lr
        print(f"LR range test suggests {lr:.2e}")
        if not result.reliable:
            raise SystemExit("the LR range test saw no descent of the loss (usual from scratch): "
                             f"see {out / 'lr_find.csv'} and pass --lr explicitly, e.g. --lr 3e-3")
    cfg = replace(cfg, lr=lr)

    steps_per_epoch = max(1, len(data.train_y) // cfg.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history: list[dict] = []
    best_loss, start_epoch = float("inf"), 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        gen.set_state(ckpt["gen"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        history = pd.read_csv(out / "history.csv").to_dict("records")[:int(ckpt["epoch"])]
        best_loss, start_epoch = float(ckpt["best_loss"]), int(ckpt["epoch"])
        print(f"resuming after epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(training_batches(data.train_x, data.train_y, contract, cfg=cfg, generator=gen),
                   total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        bar.close()
        train_seconds = time.perf_counter() - t0
        val_loss, val_prob = evaluate(model, data.val_x, data.val_y, contract)
        vm = binary_metrics(_is_positive(data.val_y, contract), val_prob,
                            threshold=contract.threshold)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), "val_loss": val_loss,
               "val_accuracy": vm["accuracy"], "val_auc": vm["auc"],
               "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0,
               "train_img_per_s": seen / train_seconds}
        history.append(row)
        pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        if val_loss < best_loss or not (out / "best.safetensors").is_file():
            best_loss = min(best_loss, val_loss)
            with atomic_path(out / "best.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        with atomic_path(ckpt_path) as tmp:  # an interrupt mid-write keeps the last checkpoint
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "gen": gen.get_state(),
                        "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                        "best_loss": best_loss, "config": asdict(cfg),
                        "split": data.split.to_json()}, tmp)
        print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
              f"val acc {vm['accuracy']:.4f}, val AUC {vm['auc']:.4f}, {row['seconds']:.0f} s",
              flush=True)

    model.load_state_dict(load_file(str(out / "best.safetensors")))
    metrics, frames = {}, {}
    for part in ("train", "val", "test"):
        x, y = getattr(data, f"{part}_x"), getattr(data, f"{part}_y")
        if len(y) == 0:
            continue
        _, prob = evaluate(model, x, y, contract)
        metrics[part] = binary_metrics(_is_positive(y, contract), prob,
                                       threshold=contract.threshold)
        metrics[part]["cases"] = len(getattr(data.split, part))
        if part != "train":
            frames[part] = _predictions_frame(data.samples[part], prob)
            frames[part].to_csv(out / f"{part}_predictions.csv", index=False)
    best_epoch = int(pd.DataFrame(history)["val_loss"].idxmin()) + 1
    card = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_command": _command(args),
        "training_data": [str(d) for d in args.data],
        "config": asdict(cfg),
        "best_epoch": best_epoch,
        "selected_by": "lowest validation loss",
        "split": data.split.to_json(),
        "metrics": metrics,
    }
    if "val" in frames:
        card["screening"] = screening_calibration(frames["val"], threshold=contract.threshold)
    card = save_model(out, model, contract, card)
    t = metrics.get("test", {})
    print(f"test ({t.get('cases')} unseen patients, {t.get('n')} cells): "
          f"accuracy {t.get('accuracy', float('nan')):.4f}, AUC {t.get('auc', float('nan')):.4f}, "
          f"sensitivity {t.get('sensitivity', float('nan')):.4f}, "
          f"specificity {t.get('specificity', float('nan')):.4f}, MCC {t.get('mcc', float('nan')):.4f}")
    return card


if __name__ == "__main__":
    main(get_args_parser().parse_args())
