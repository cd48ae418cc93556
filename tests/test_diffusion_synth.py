import numpy as np
import pytest
import torch

from frugalvision.errors import DataError
from frugalvision.inspect.synthesis.diffusion import DefectDiffusion, DefectDiffusionConfig

TINY = {"crop": 16, "channels": (16, 32), "batch_size": 16, "sample_steps": 10, "timesteps": 200}


def _red_squares(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey noisy surfaces with one saturated red square each: a defect whose look and shape are known."""
    images, masks = [], []
    for _ in range(n):
        img = np.clip(rng.normal(120, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
        m = np.zeros((32, 32), bool)
        y, x = rng.integers(4, 20, 2)
        m[y : y + 7, x : x + 7] = True
        img[m] = (230, 30, 30)
        images.append(img)
        masks.append(m)
    return images, masks


def test_generated_pixels_stay_inside_the_mask_and_are_reproducible():
    rng = np.random.default_rng(0)
    images, masks = _red_squares(3, rng)
    gen = DefectDiffusion(DefectDiffusionConfig(steps=3, **TINY))
    stats = gen.fit(images, masks, [0, 1, 1], progress=False)
    assert stats["steps"] == 3 and stats["windows"] == 3 and gen.num_kinds == 2
    clean = np.full((40, 48, 3), 100, np.uint8)
    a = gen.inpaint(clean, 1, np.random.default_rng(5))
    b = gen.inpaint(clean, 1, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    new, mask = a
    assert new.shape == clean.shape and mask.shape == clean.shape[:2] and mask.dtype == bool
    assert (new[~mask] == clean[~mask]).all()


@pytest.mark.slow
def test_learns_the_look_and_size_of_a_simple_defect():
    rng = np.random.default_rng(0)
    images, masks = _red_squares(8, rng)
    gen = DefectDiffusion(DefectDiffusionConfig(steps=600, lr=2e-3, min_area=4, **TINY))
    gen.fit(images, masks, [0] * 8, progress=False)
    clean = np.clip(rng.normal(120, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    areas, redness = [], []
    for i in range(6):
        new, m = gen.inpaint(clean, 0, np.random.default_rng(i))
        areas.append(m.sum())
        if m.any():
            px = new[m].astype(float)
            redness.append(px[:, 0].mean() - px[:, 1:].mean())
    assert np.median(areas) > 10, areas  # squares are 49 px; an untrained model paints nothing or noise
    assert np.mean(redness) > 60, redness  # painted pixels are red, like the training defects


def test_bad_training_data_is_named():
    rng = np.random.default_rng(0)
    images, masks = _red_squares(2, rng)
    gen = DefectDiffusion(DefectDiffusionConfig(steps=1, **TINY))
    with pytest.raises(DataError, match="same non-zero number"):
        gen.fit(images, masks[:1], [0, 0])
    with pytest.raises(DataError, match="training defect 1: its mask is empty"):
        gen.fit(images, [masks[0], np.zeros_like(masks[1])], [0, 0])
    with pytest.raises(DataError, match="smaller than crop"):
        gen.fit([images[0][:8, :8]], [masks[0][:8, :8]], [0])
    with pytest.raises(RuntimeError, match="call fit"):
        gen.sample(torch.zeros(1, 3, 16, 16), torch.tensor([0]), torch.Generator())
    with pytest.raises(ValueError, match="divisible"):
        DefectDiffusionConfig(crop=18, channels=(16, 16, 16))
