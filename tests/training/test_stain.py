"""Stain jitter in HED space (core.training.recipe.stain_jitter)."""

from __future__ import annotations

import torch

from core.training.recipe import augment, stain_jitter


def _cells(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.6 + 0.3
    x[:, :, :3, :3] = 0.0  # the black around a segmented crop
    return x


def test_no_strength_changes_nothing_and_black_stays_black():
    x = _cells()
    same = stain_jitter(x, 0.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same[:, :, 4:, 4:], x[:, :, 4:, 4:], atol=1e-5, rtol=0)
    assert same[:, :, :3, :3].max() <= 1 / 255 + 1e-6  # black is read as the darkest 8-bit value
    out = stain_jitter(x, 0.2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert out[:, :, :3, :3].max() < 0.02


def test_each_image_gets_its_own_stain_and_stronger_moves_further():
    x = _cells()
    light = stain_jitter(x, 0.05, torch.Generator().manual_seed(2))
    strong = stain_jitter(x, 0.3, torch.Generator().manual_seed(2))
    shift_light = (light - x)[:, :, 4:, 4:].abs().mean()
    shift_strong = (strong - x)[:, :, 4:, 4:].abs().mean()
    assert 0 < shift_light < shift_strong
    # a per-image change: the mean colour shift differs between images
    per_image = (strong - x)[:, :, 4:, 4:].mean(dim=(2, 3))
    assert per_image.std(dim=0).max() > 0.01


def test_augment_applies_it_from_uint8():
    x = (torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(3)) * 255).byte()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    plain = augment(x, jitter=0.0, generator=g1)
    stained = augment(x, jitter=0.0, generator=g2, stain=0.2)
    assert plain.shape == stained.shape == (4, 3, 16, 16)
    assert not torch.allclose(plain, stained)
