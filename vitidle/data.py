"""Images for checks and demos: the sample photos that ship with scikit-image, or a folder of the user's own."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UsageError

# RGB photos bundled in scikit-image's wheel (no download): people, animals, objects, scenes
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def sample_images(input_config: dict, folder: str | os.PathLike | None = None, limit: int = 8) -> torch.Tensor:
    """Up to `limit` photos as a (B, C, H, W) batch, preprocessed with timm's eval transform for `input_config`.

    `input_config` is timm's data config (`resolve_model_data_config`, or `vitidle_config["input"]`).
    Without `folder`, the sample photos of scikit-image are used.

    >>> cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    >>> sample_images(cfg, limit=2).shape
    torch.Size([2, 3, 32, 32])
    """
    from PIL import Image

    if folder is None:
        import skimage.data

        pictures = [Image.fromarray(getattr(skimage.data, name)()) for name in SAMPLE_PHOTOS[:limit]]
    else:
        if not Path(folder).is_dir():
            raise UsageError(f"image folder not found: {folder}")
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        pictures = [_read_image(p) for p in paths[:limit]]
    transform = eval_transform(input_config)
    return torch.stack([transform(p) for p in pictures])


def eval_transform(input_config: dict):
    """timm's eval transform for `input_config`, after converting a PIL image to the model's channels (grey for
    a one-channel model)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    transform = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in input_config.items()
                                    if k in keys}, is_training=False)
    mode = "L" if input_config["input_size"][0] == 1 else "RGB"
    return lambda image: transform(image.convert(mode))


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read image {path}: {type(e).__name__}") from e
