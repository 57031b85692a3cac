"""Transfer learning with a patient-level split, resumable, evaluated on unseen patients.

    malaria train --data ../shared/data/nih_cells_dev.zip --out runs/mnv2 --epochs 8 \
        --lr auto

The run folder receives: ``split.json`` (which cases where), ``history.csv`` (one row per
epoch), ``lr_find.csv/json`` (with ``--lr auto``), ``checkpoint.pt`` (resume state),
``model.safetensors`` + ``card.json`` (the best epoch by validation loss; the last epoch with
``--all-patients``), and ``test_predictions.csv`` / ``val_predictions.csv`` (path, case_id,
label, prob_parasitized).

The stages, as torchvision's classification reference has them: the data is made ready by
``core.training.recipe.prepare_data``; ``fit`` wires ``start`` (model, optimiser, schedule, resume
state), ``train_one_epoch``, ``evaluate`` and ``finish`` (best weights, predictions, card).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from core.data.splits import Sample, Split, labelled_samples
from core.nets.model import (
    build_model,
    freeze_features,
    normalize,
    predict_proba,
    save_model,
)
from core.schema.contract import HISTORY_FILE, SPLIT_FILE, ModelContract
from core.schema.files import atomic_path, cpu_count, write_json
from core.schema.labels import CLASSES
from core.schema.metrics import binary_metrics, screening_calibration
from core.training.lr_find import lr_range_test
from core.training.recipe import (
    PreparedData,
    TrainConfig,
    TrainingError,
    command,
    config_from_args,
    data_from_args,
    recipe_contract,
    training_batches,
)

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
AVERAGED = "averaged.safetensors"


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, contract: ModelContract
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and P(Parasitized) (float64 (N,)) of ``model`` on uint8 images."""
    prob = predict_proba(model, x, contract).double().clamp(1e-7, 1 - 1e-7)
    positive = (y == contract.positive_index).double()
    loss = -(positive * prob.log() + (1 - positive) * (1 - prob).log()).mean()
    return float(loss), prob.numpy()


def _is_positive(y: torch.Tensor, contract: ModelContract) -> np.ndarray:
    return (y == contract.positive_index).numpy().astype(int)


def _predictions_frame(samples: Sequence[Sample], prob: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [s.path for s in samples],
            "case_id": [s.case_id for s in samples],
            "label": [CLASSES[s.label] for s in samples],
            "prob_parasitized": prob,
        }
    )


@dataclass
class RunState:
    """What an epoch changes, and what a checkpoint holds to resume exactly."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    history: list[dict] = field(default_factory=list)
    best_loss: float = float("inf")
    epoch: int = 0
    average: dict[str, torch.Tensor] = field(default_factory=dict)  # mean weights (SWA)
    averaged: int = 0  # how many epochs ``average`` holds


def update_average(state: RunState) -> None:
    """Fold the model's current floating-point weights into the running mean."""
    state.averaged += 1
    for name, value in state.model.state_dict().items():
        if not value.is_floating_point():
            continue
        if name not in state.average:
            state.average[name] = value.detach().clone()
        else:
            state.average[name] += (value.detach() - state.average[name]) / state.averaged


def recompute_batch_norm(
    model: nn.Module, x: torch.Tensor, contract: ModelContract, batch_size: int = 256
) -> None:
    """Batch-norm running statistics recomputed over the images ``x``: the statistics the
    epochs kept belong to their own weights, not to their average. Batches are drawn in a fixed
    shuffled order (``x`` is ordered by class) and weighted by their size, so the running mean is
    the mean over ``x`` and the variance the mean of the batches' variances."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            for m in norms:  # this batch's share of the images seen so far
                m.momentum = len(idx) / (i + len(idx))
            model(normalize(x[idx], contract))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def steps_per_epoch(data: PreparedData, cfg: TrainConfig) -> int:
    return max(1, len(data.train_y) // cfg.batch_size)


def start(
    cfg: TrainConfig,
    data: PreparedData,
    out: Path,
    *,
    contract: ModelContract,
    ckpt: dict | None,
    progress: bool,
) -> tuple[RunState, TrainConfig]:
    """Model, optimiser and one-cycle schedule, restored from ``ckpt`` when resuming.

    With ``cfg.lr`` None the LR range test runs first (its curve is saved in ``out``) and
    its suggestion becomes the recipe's LR.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.arch, pretrained=cfg.pretrained).to(memory_format=torch.channels_last)
    freeze_features(model, cfg.freeze if cfg.pretrained else 0)
    if cfg.lr is None:
        result = lr_range_test(
            model,
            lambda: training_batches(data.train_x, data.train_y, contract, cfg=cfg, generator=gen),
            label_smoothing=cfg.label_smoothing,
            weight_decay=cfg.weight_decay,
            progress=progress,
        )
        result.save(out)
        print(f"LR range test suggests {result.suggested_lr:.2e}")
        if not result.reliable:
            raise TrainingError(
                "the LR range test saw no descent of the loss (usual from scratch): "
                f"see {out / 'lr_find.csv'} and pass --lr explicitly, e.g. --lr 3e-3"
            )
        cfg = replace(cfg, lr=result.suggested_lr)
    assert cfg.lr is not None
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch(data, cfg),
        pct_start=0.2,
    )
    state = RunState(model, opt, sched, gen)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        gen.set_state(ckpt["gen"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generator
        state.epoch = int(ckpt["epoch"])
        state.history = pd.read_csv(out / HISTORY_FILE).to_dict("records")[: state.epoch]
        state.best_loss = float(ckpt["best_loss"])
        state.average, state.averaged = ckpt.get("average", {}), int(ckpt.get("averaged", 0))
        print(f"resuming after epoch {state.epoch}")
    return state, cfg


def train_one_epoch(
    state: RunState,
    data: PreparedData,
    loss_fn: nn.Module,
    *,
    cfg: TrainConfig,
    contract: ModelContract,
    progress: bool,
) -> dict:
    """One pass over the training patients; returns the epoch's loss, accuracy and speed."""
    state.model.train()
    n_steps = steps_per_epoch(data, cfg)
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(
        training_batches(data.train_x, data.train_y, contract, cfg=cfg, generator=state.gen),
        total=n_steps,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        disable=not progress,
    )
    for step, (x, y) in enumerate(bar):
        if step >= n_steps:
            break
        logits = state.model(x)
        loss = loss_fn(logits, y)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.sched.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(
            loss=f"{loss_sum / seen:.4f}",
            img_s=f"{seen / (time.perf_counter() - t0):.0f}",
            refresh=False,
        )
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_img_per_s": seen / seconds,
    }


def save_checkpoint(state: RunState, out: Path, cfg: TrainConfig, split: Split) -> None:
    with atomic_path(out / CHECKPOINT) as tmp:  # an interrupt mid-write keeps the last one
        torch.save(
            {
                "model": state.model.state_dict(),
                "opt": state.opt.state_dict(),
                "sched": state.sched.state_dict(),
                "gen": state.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": state.epoch,
                "best_loss": state.best_loss,
                "average": state.average,
                "averaged": state.averaged,
                "config": asdict(cfg),
                "split": split.to_json(),
            },
            tmp,
        )


def finish(
    state: RunState,
    data: PreparedData,
    out: Path,
    *,
    cfg: TrainConfig,
    contract: ModelContract,
    card: dict,
) -> dict:
    """Reload the kept weights, score every part, write the predictions and the model card."""
    if cfg.average_from or not cfg.keep_last:  # else the model holds the last epoch already
        state.model.load_state_dict(load_file(str(out / (AVERAGED if cfg.average_from else BEST))))
    metrics, frames = {}, {}
    for part in ("train", "val", "test"):
        x, y = getattr(data, f"{part}_x"), getattr(data, f"{part}_y")
        if len(y) == 0:
            continue
        _, prob = evaluate(state.model, x, y, contract)
        metrics[part] = binary_metrics(
            _is_positive(y, contract), prob, threshold=contract.threshold
        )
        metrics[part]["cases"] = len(getattr(data.split, part))
        if part != "train":
            frames[part] = _predictions_frame(data.samples[part], prob)
            frames[part].to_csv(out / f"{part}_predictions.csv", index=False)
    history = pd.DataFrame(state.history)
    has_val = len(data.val_y) > 0
    if cfg.average_from:
        kept = (
            len(history),
            (
                f"mean of the weights after epochs {cfg.average_from}-{len(history)} (stochastic "
                "weight averaging), batch-norm statistics recomputed on the training cells"
            ),
        )
    elif has_val and not cfg.keep_last:
        kept = int(history["val_loss"].idxmin()) + 1, "lowest validation loss"
    elif has_val:
        kept = (
            len(history),
            "last epoch (--keep-last: the rule of a model trained on every patient)",
        )
    else:
        kept = len(history), "last epoch (no validation patients: trained on all of them)"
    card = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **card,
        "config": asdict(cfg),
        "best_epoch": kept[0],
        "selected_by": kept[1],
        "split": data.split.to_json(),
        "metrics": metrics,
    }
    if "val" in frames:
        card["screening"] = screening_calibration(frames["val"], threshold=contract.threshold)
    return save_model(out, state.model, contract, card)


def fit(
    cfg: TrainConfig,
    data: PreparedData,
    out: Path,
    *,
    contract: ModelContract,
    card: dict,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``cfg`` on ``data`` into the run folder ``out``; returns the model card written.

    ``card``: what the card says of where the run came from (its command, its data).
    ``resume``: go on from ``out/checkpoint.pt`` (the recipe and split it holds win).
    """
    if not 0 <= cfg.average_from <= cfg.epochs:
        raise TrainingError(f"--average-from must be an epoch in 1..{cfg.epochs} (or 0: off)")
    if "OMP_NUM_THREADS" not in os.environ:  # a user's thread cap wins
        torch.set_num_threads(cpu_count())
    out.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(out / CHECKPOINT, weights_only=True) if resume else None
    write_json(out / SPLIT_FILE, data.split.to_json())
    state, cfg = start(cfg, data, out, contract=contract, ckpt=ckpt, progress=progress)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    while state.epoch < cfg.epochs:
        t0 = time.perf_counter()
        fitted = train_one_epoch(
            state, data, loss_fn, cfg=cfg, contract=contract, progress=progress
        )
        val_loss, vm = float("nan"), {"accuracy": float("nan"), "auc": float("nan")}
        if len(data.val_y):
            val_loss, val_prob = evaluate(state.model, data.val_x, data.val_y, contract)
            vm = binary_metrics(
                _is_positive(data.val_y, contract), val_prob, threshold=contract.threshold
            )
        state.epoch += 1
        row = {
            "epoch": state.epoch,
            "train_loss": fitted["train_loss"],
            "train_accuracy": fitted["train_accuracy"],
            "val_loss": val_loss,
            "val_accuracy": vm["accuracy"],
            "val_auc": vm["auc"],
            "lr": state.sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
            "train_img_per_s": fitted["train_img_per_s"],
        }
        state.history.append(row)
        pd.DataFrame(state.history).to_csv(out / HISTORY_FILE, index=False)
        if cfg.average_from and state.epoch >= cfg.average_from:
            update_average(state)
        keep = not len(data.val_y) or val_loss < state.best_loss
        if keep or not (out / BEST).is_file():
            state.best_loss = min(state.best_loss, val_loss) if len(data.val_y) else val_loss
            with atomic_path(out / BEST) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in state.model.state_dict().items()}, str(tmp)
                )
        save_checkpoint(state, out, cfg, data.split)
        print(
            f"epoch {state.epoch}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
            f"val acc {vm['accuracy']:.4f}, val AUC {vm['auc']:.4f}, {row['seconds']:.0f} s",
            flush=True,
        )
    if cfg.average_from:
        save_average(state, data, out, contract=contract)
    return finish(state, data, out, cfg=cfg, contract=contract, card=card)


def save_average(
    state: RunState, data: PreparedData, out: Path, *, contract: ModelContract
) -> None:
    """Averaged weights with their own batch-norm statistics, into ``out/averaged.safetensors``."""
    state.model.load_state_dict({**state.model.state_dict(), **state.average})
    recompute_batch_norm(state.model, data.train_x, contract)
    with atomic_path(out / AVERAGED) as tmp:
        save_file({k: v.contiguous() for k, v in state.model.state_dict().items()}, str(tmp))
    if len(data.val_y):
        loss, prob = evaluate(state.model, data.val_x, data.val_y, contract)
        m = binary_metrics(_is_positive(data.val_y, contract), prob, threshold=contract.threshold)
        print(
            f"mean of {state.averaged} epochs: val loss {loss:.4f}, val acc {m['accuracy']:.4f}, "
            f"val AUC {m['auc']:.4f}",
            flush=True,
        )


def read_split(path: Path) -> Split:
    """The split saved in a ``split.json`` or a model's ``card.json``."""
    saved = json.loads(path.read_text())
    return Split.from_json(saved.get("split", saved))


def all_patients(data: Sequence[str | Path], *, seed: int, follow_links: bool = False) -> Split:
    samples, _ = labelled_samples(data, follow_links=follow_links)
    return Split(tuple(sorted({s.case_id for s in samples})), (), (), seed)


def run(args: argparse.Namespace) -> dict:
    out: Path = args.out
    if args.resume and not (out / CHECKPOINT).is_file():
        raise TrainingError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    cfg = config_from_args(args)
    split = read_split(args.split) if args.split else None
    if args.resume:  # an interrupted run goes on as it was started
        ckpt = torch.load(out / CHECKPOINT, weights_only=True)
        cfg, split = TrainConfig(**ckpt["config"]), Split.from_json(ckpt["split"])
    elif args.all_patients:
        split = all_patients(args.data, seed=cfg.seed, follow_links=args.follow_links)
    contract = recipe_contract(cfg)
    data = data_from_args(args, cfg, split)
    print(
        f"cases: train {len(data.split.train)}, val {len(data.split.val)}, "
        f"test {len(data.split.test)}; cells: train {len(data.train_y)}, "
        f"val {len(data.val_y)}, test {len(data.test_y)}"
    )
    where = (
        ["--split", str(args.split)]
        if args.split
        else ["--all-patients"]
        if args.all_patients
        else []
    )
    card = fit(
        cfg,
        data,
        out,
        contract=contract,
        resume=args.resume,
        progress=not args.no_progress,
        card={
            "training_command": command("train", args, "--out", str(out), *where),
            "training_data": [str(d) for d in args.data],
        },
    )
    t = card["metrics"].get("test", {})
    nan = float("nan")
    if t:
        print(
            f"test ({t.get('cases')} unseen patients, {t.get('n')} cells): "
            f"accuracy {t.get('accuracy', nan):.4f}, AUC {t.get('auc', nan):.4f}, "
            f"sensitivity {t.get('sensitivity', nan):.4f}, "
            f"specificity {t.get('specificity', nan):.4f}, MCC {t.get('mcc', nan):.4f}"
        )
    return card
