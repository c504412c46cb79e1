"""sample_images: scikit-image's photos or a folder of the user's, preprocessed with timm's eval transform."""

import pytest
import torch
from conftest import tiny
from PIL import Image
from timm.data import resolve_model_data_config

from vitidle.convert import data_config
from vitidle.data import SAMPLE_PHOTOS, sample_images
from vitidle.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# statistics unlike timm's ImageNet defaults, so that a config whose mean and std were dropped shows
PLAIN = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5], "crop_pct": 1.0,
         "interpolation": "bilinear"}


def normalised(rgb):
    """A solid-colour pixel after ToTensor and Normalize with PLAIN's statistics, per channel."""
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, PLAIN["mean"], PLAIN["std"])])


def test_sample_photos_with_a_timm_data_config():
    model = tiny("deit_small_patch16_224")  # img_size 64
    config = data_config(model)  # lists: the config saved in vitidle.json, with the size the model was built for
    assert config["input_size"] == [3, 64, 64]
    x = sample_images(config)
    assert x.shape == (len(SAMPLE_PHOTOS), 3, 64, 64) and x.dtype == torch.float32
    # normalised with the config's statistics: ImageNet-normalised RGB photos go below 0 and above 1
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert low - 1e-5 <= x.min() < 0 and 1 < x.max() <= high + 1e-5
    # timm's own config (tuples) gives the same batch
    timm_config = {**resolve_model_data_config(model), "input_size": (3, 64, 64)}
    assert torch.equal(sample_images(timm_config), x)
    assert torch.equal(sample_images(timm_config, limit=3), x[:3])


def test_sample_photos_follow_the_input_size():
    config = {**PLAIN, "input_size": [3, 48, 40]}
    assert sample_images(config, limit=2).shape == (2, 3, 48, 40)


def test_a_folder_of_images(tmp_path):
    Image.new("RGB", (80, 60), (255, 0, 0)).save(tmp_path / "a_red.png")
    Image.new("L", (40, 50), 128).save(tmp_path / "b_gray.PNG")  # one channel, upper-case suffix
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(tmp_path / "c_blue.png")
    Image.new("RGB", (100, 33), (10, 200, 30)).save(tmp_path / "d_green.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    x = sample_images(PLAIN, tmp_path, limit=4)
    assert x.shape == (4, 3, 32, 32)  # resized and centre-cropped to the input size, RGB
    for i, rgb in enumerate([(255, 0, 0), (128, 128, 128), (0, 0, 255), (10, 200, 30)]):  # sorted by name
        expect = normalised(rgb)[:, None, None].expand(3, 32, 32)
        torch.testing.assert_close(x[i], expect, atol=1e-5, rtol=0)
    two = sample_images(PLAIN, tmp_path, limit=2)
    assert torch.equal(two, x[:2])


def test_an_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no images") as info:
        sample_images(PLAIN, tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "photo.gif.txt").write_text("neither")
    with pytest.raises(UsageError, match="no images"):
        sample_images(PLAIN, tmp_path)


def test_sample_photos_follow_the_models_channels():
    cfg = {"input_size": [1, 28, 28], "mean": [0.3], "std": [0.35], "crop_pct": 1.0}
    assert sample_images(cfg, limit=3).shape == (3, 1, 28, 28)  # a grey model gets grey photos
