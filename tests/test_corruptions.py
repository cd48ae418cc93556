import pytest
import torch
from skimage import data as skdata

from frugalvision.data.corruptions import CORRUPTIONS, CorruptedDataset, corrupt


@pytest.fixture(scope="module")
def photo():
    img = torch.from_numpy(skdata.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 255
    return img[None]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_severity_increases_the_damage(kind, photo):
    err = [float((corrupt(photo, kind, s, torch.Generator().manual_seed(0)) - photo).abs().mean()) for s in (1, 3, 5)]
    assert err[0] > 0 and err[0] < err[1] < err[2], err


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_shape_range_and_determinism(kind, photo):
    a = corrupt(photo, kind, 4, torch.Generator().manual_seed(3))
    b = corrupt(photo, kind, 4, torch.Generator().manual_seed(3))
    assert a.shape == photo.shape and a.dtype == photo.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="severity must be 1-5"):
        corrupt(torch.zeros(3, 4, 4), "jpeg", 6)
    with pytest.raises(ValueError, match="expected float images"):
        corrupt(torch.zeros(3, 4, 4, dtype=torch.uint8), "jpeg", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        CorruptedDataset([], "snow", 1)


def test_dataset_wrapper_round_trips_normalisation(photo):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    norm = (photo[0] - m) / s
    ds = CorruptedDataset([{"image": norm, "label": 2}], "contrast", 2, mean, std)
    out = ds[0]
    assert out["label"] == 2
    torch.testing.assert_close(out["image"] * s + m, corrupt(photo[0], "contrast", 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds[0]["image"], out["image"])  # same sample, same corruption
