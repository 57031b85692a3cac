"""Learning-rate range test (Smith 2017): grow the LR exponentially per batch, watch the loss.

malaria lr-find --data ../shared/data/nih_cells_dev.zip --arch mobilenet_v2 --out runs/lr
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from core.nets.model import build_model, freeze_features
from core.schema.contract import LR_FIND_FILES
from core.schema.files import invocation, write_json
from core.training.recipe import TrainConfig, prepare_data, recipe_contract, training_batches


@dataclass(frozen=True)
class LRFindResult:
    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # raw batch losses
    smoothed: tuple[float, ...]  # bias-corrected exponential moving average
    suggested_lr: float
    diverged: bool
    # False when the smoothed loss never fell by 5% below its start: the suggestion is noise
    # (typical of a network trained from scratch over so few steps)
    reliable: bool = True

    def save(self, out: Path, *, command: str | None = None) -> None:
        """Write ``lr_find.csv`` (lr, loss, smoothed_loss) and ``lr_find.json`` into ``out``
        (with the ``command`` that ran the test, when given)."""
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"lr": self.lrs, "loss": self.losses, "smoothed_loss": self.smoothed}).to_csv(
            out / LR_FIND_FILES[0], index=False
        )
        write_json(
            out / LR_FIND_FILES[1],
            {
                "suggested_lr": self.suggested_lr,
                "diverged": self.diverged,
                "reliable": self.reliable,
                "steps": len(self.lrs),
                "method": "steepest descent of the smoothed loss",
                **({"command": command} if command else {}),
            },
        )


def suggest_lr(lrs: np.ndarray, smoothed: np.ndarray, *, skip_start: int = 10) -> float:
    """LR at the steepest descent of the smoothed loss against log10(lr).

    The slope is taken over a window of a tenth of the steps, and only before the loss's
    minimum, so early noise and the divergence at the end cannot win.
    """
    n = len(lrs)
    if n < 4:
        return float(lrs[n // 2]) if n else 1e-3
    end = int(np.argmin(smoothed)) + 1
    start = min(skip_start, max(0, end - 3))
    k = max(1, n // 10)
    logs = np.log10(lrs)
    best_i, best_slope = start, np.inf
    for i in range(start, max(start + 1, end - k)):
        j = min(i + k, n - 1)
        slope = (smoothed[j] - smoothed[i]) / (logs[j] - logs[i])
        if slope < best_slope:
            best_i, best_slope = (i + j) // 2, slope
    return float(lrs[best_i])


def lr_range_test(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    *,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge_factor: float = 4.0,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    progress: bool = True,
) -> LRFindResult:
    """Run the range test on a deep copy of ``model``; ``model`` itself is left untouched.

    ``batches()`` yields (inputs float NCHW, labels int64 (N,)) and is restarted if it runs out.
    Stops after ``num_steps`` or when the smoothed loss exceeds ``diverge_factor`` times its
    minimum.
    """
    net = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=start_lr, weight_decay=weight_decay
    )
    gamma = (end_lr / start_lr) ** (1 / max(1, num_steps - 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    it = batches()
    bar = tqdm(range(num_steps), desc="lr range test", disable=not progress)
    for step in bar:
        try:
            x, y = next(it)
        except StopIteration:
            it = batches()
            x, y = next(it)
        lr = start_lr * gamma**step
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        avg = beta * avg + (1 - beta) * value
        smooth = avg / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smooth:.3f}", refresh=False)
        if not math.isfinite(smooth) or smooth > diverge_factor * best:
            diverged = True
            break
        best = min(best, smooth)
    bar.close()
    del net, opt
    lr_arr, sm_arr = np.array(lrs), np.array(smoothed)
    finite = np.isfinite(sm_arr)
    reliable = bool(finite.any() and sm_arr[finite].min() < 0.95 * sm_arr[0])
    return LRFindResult(
        tuple(lrs),
        tuple(losses),
        tuple(smoothed),
        suggest_lr(lr_arr[finite], sm_arr[finite]),
        diverged,
        reliable,
    )


def run(args: argparse.Namespace) -> LRFindResult:

    cfg = TrainConfig(
        arch=args.arch,
        batch_size=args.batch_size,
        seed=args.seed,
        pretrained=not args.no_pretrained and args.arch == "mobilenet_v2",
    )
    contract = recipe_contract(cfg)
    data = prepare_data(args.data, contract=contract, cfg=cfg, follow_links=args.follow_links)
    model = build_model(cfg.arch, pretrained=cfg.pretrained).to(memory_format=torch.channels_last)
    freeze_features(model, cfg.freeze if cfg.pretrained else 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = lr_range_test(
        model,
        lambda: training_batches(data.train_x, data.train_y, contract, cfg=cfg, generator=gen),
        num_steps=args.steps,
        label_smoothing=cfg.label_smoothing,
    )
    result.save(args.out, command=invocation("lr-find"))
    print(f"suggested learning rate: {result.suggested_lr:.2e} (written to {args.out})")
    if not result.reliable:
        print(
            "warning: the loss never fell during the test; the suggestion is not reliable. "
            "Pick a learning rate by hand (from scratch, try 1e-3 to 3e-3)."
        )
    return result
