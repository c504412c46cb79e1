"""Which image patches each idle layer runs on: one panel per idle layer over the preprocessed input.

Kept patches are drawn as they are; idle patches (copied unchanged through the layer) are faded
toward a blue tint, which shows on dark, light and grey images alike. The masks come from each
selector's `kept_index` after one forward of the model on the images.

>>> import vitidle
>>> model = vitidle.load("vit_fashion_mnist-idle")                                  # doctest: +SKIP
>>> masks = vitidle.visualize(model, ["shirt.png", "bag.png"], "idle.png")          # doctest: +SKIP
>>> {block: m.shape for block, m in masks.items()}                                  # doctest: +SKIP
{1: torch.Size([2, 7, 7]), 2: torch.Size([2, 7, 7]), ...}
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from .engine.rewrite import config_of, unwrap
from .errors import ConversionError, UsageError
from .idle import SELECTOR, TokenSelector
from .io import atomic_write

if TYPE_CHECKING:
    from PIL.Image import Image

    OneImage = str | os.PathLike | Image

TINT = np.array([0.16, 0.26, 0.55])  # idle patches: blended toward this colour
FADE = 0.7  # share of the tint in an idle patch


def visualize(model: nn.Module, image: OneImage | Sequence[OneImage], path: str | os.PathLike,
              layers: Iterable[int] | None = None) -> dict[int, Tensor]:
    """Draw the patches each idle layer of `model` keeps for `image` and write the figure to `path` (PNG).

    `image`: a file path or a PIL image, or a sequence of them (one row each). Each is preprocessed as
    the model's own input: timm's eval transform (`create_transform`) for the converted model's input
    config (`vitidle_config["input"]`: timm's data config, or a Hugging Face model's image size with
    the saved mean and std). `layers`: the block indices to draw (default: every idle block). Each row
    shows the input, then one panel per layer titled with its block index and kept count.

    Returns the drawn masks: block index -> (images, grid rows, grid cols) bool tensor, True where
    the layer kept the patch. Bad input (an unreadable image, a block that does not idle, a model with
    no idle layers) raises `UsageError`.
    """
    model = unwrap(model)
    try:
        config = config_of(model)
    except ConversionError:
        raise UsageError("the model has no idle layers: convert it first (vitidle.convert or `vitidle convert`)") from None
    selectors = idle_blocks(model, config)
    if not selectors:
        raise UsageError("the model has no idle layers (every block of its plan is dense)")
    chosen = check_layers(layers, selectors)
    path = check_output(path)
    pictures = [image] if isinstance(image, (str, os.PathLike)) or not isinstance(image, Sequence) else list(image)
    if not pictures:
        raise UsageError("give at least one image")
    names, x = preprocess(pictures, config["input"])
    masks = kept_masks(model, x, {b: selectors[b] for b in chosen}, config)
    shown = display_images(x, config["input"])
    atomic_write(path, draw(shown, masks, names))
    return masks


def idle_blocks(model: nn.Module, config: dict) -> dict[int, nn.Module]:
    """Block index -> the block's TokenSelector, for the idle blocks of a converted model (timm or HF)."""
    out = {}
    for i, name in enumerate(config["layout"]["blocks"]):
        selector = getattr(model.get_submodule(name), SELECTOR, None)
        if isinstance(selector, TokenSelector):
            out[i] = selector
    return out


def check_layers(layers: Iterable[int] | None, selectors: dict[int, nn.Module]) -> list[int]:
    """The requested block indices, sorted and checked to be idle blocks (all idle blocks for None)."""
    if layers is None:
        return sorted(selectors)
    chosen = sorted(set(layers))
    wrong = [b for b in chosen if b not in selectors]
    if wrong or not chosen:
        what = f"block {wrong[0]} is not an idle block" if wrong else "no block given"
        raise UsageError(f"--layers: {what}; the idle blocks are {span(sorted(selectors))}")
    return chosen


def parse_layers(text: str) -> list[int]:
    """'3,6,9-11' -> [3, 6, 9, 10, 11]; UsageError on anything else.

    >>> parse_layers("1, 3-4")
    [1, 3, 4]
    """
    out = []
    for entry in (e.strip() for e in text.split(",")):
        first, sep, last = entry.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise UsageError(f"--layers: {entry!r} is not a block index or FIRST-LAST (e.g. 3,6,9-11)")
        out += list(range(int(first), int(last if sep else first) + 1))
    return out


def span(blocks: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def check_output(path: str | os.PathLike) -> Path:
    """`path` as a Path, if a PNG can be written there (a .png name in an existing folder); else UsageError."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the figure is a PNG; name it *.png")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: folder {path.parent} does not exist")
    return path


def preprocess(images: list, input_config: dict) -> tuple[list[str], Tensor]:
    """(names, (B, C, H, W) batch): each image read (a path) and put through timm's eval transform."""
    from PIL import Image

    from .data import _read_image, eval_transform

    transform = eval_transform(input_config)
    names, batch = [], []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise UsageError(f"image not found: {image}")
            names.append(Path(image).stem)
            image = _read_image(Path(image))
        elif isinstance(image, Image.Image):
            names.append(f"image {i + 1}")
        else:
            raise UsageError(f"an image is a file path or a PIL image, not {type(image).__name__}")
        batch.append(transform(image))
    return names, torch.stack(batch)


def kept_masks(model: nn.Module, x: Tensor, selectors: dict[int, nn.Module], config: dict) -> dict[int, Tensor]:
    """Run `model` on x once; per block, (B, rows, cols) bool masks of the image patches its selector kept."""
    from . import hf
    from .engine.discover import evaluating

    layout = config["layout"]
    num_prefix, num_patches = layout["num_prefix"], layout["num_tokens"] - layout["num_prefix"]
    rows, cols = grid_shape(model, num_patches, config["input"]["input_size"])
    param = next(model.parameters())
    x = x.to(param.device, param.dtype if param.is_floating_point() else torch.float32)
    for selector in selectors.values():
        selector.kept_index = None  # a selector that does not run must not leave an old answer
    with evaluating(model), torch.no_grad():
        model(pixel_values=x) if hf.is_hf_model(model) else model(x)
    masks = {}
    for block, selector in selectors.items():
        if selector.kept_index is None:
            raise UsageError(f"block {block} did not run in the model's forward")
        index = selector.kept_index.cpu()  # B, P + K token positions
        mask = torch.zeros(x.shape[0], num_prefix + num_patches, dtype=torch.bool)
        mask.scatter_(1, index, True)
        masks[block] = mask[:, num_prefix:].reshape(-1, rows, cols)
    return masks


def grid_shape(model: nn.Module, num_patches: int, input_size: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the patch grid: timm's `patch_embed.grid_size`, else the input's aspect ratio."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and math.prod(grid) == num_patches:
        return int(grid[0]), int(grid[1])
    height, width = input_size[-2:]
    rows = round(math.sqrt(num_patches * height / width))
    if rows < 1 or num_patches % rows:
        raise UsageError(f"cannot lay out {num_patches} image tokens as a grid over a {height}x{width} input")
    return rows, num_patches // rows


def display_images(x: Tensor, input_config: dict) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1]: the preprocessed batch with its normalisation undone (grey as RGB)."""
    channels = x.shape[1]
    mean = torch.tensor(input_config.get("mean") or [0.0] * channels, dtype=torch.float32)
    std = torch.tensor(input_config.get("std") or [1.0] * channels, dtype=torch.float32)
    if mean.numel() != channels:  # one value for all channels, or an average for one channel
        mean, std = mean.mean().expand(channels), std.mean().expand(channels)
    images = (x.float().cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    images = images.expand(-1, 3, -1, -1) if channels == 1 else images[:, :3]
    return images.permute(0, 2, 3, 1).numpy()


def overlay(image: np.ndarray, mask: Tensor) -> np.ndarray:
    """(H, W, 3) image with the patches where `mask` (rows, cols) is False blended toward the tint."""
    height, width = image.shape[:2]
    rows, cols = mask.shape
    # each pixel's patch; also where the grid does not divide the image (a hybrid stem's stride)
    kept = mask.numpy()[np.arange(height) * rows // height][:, np.arange(width) * cols // width]
    faded = (1 - FADE) * image + FADE * TINT
    return np.where(kept[..., None], image, faded)


def draw(images: np.ndarray, masks: dict[int, Tensor], names: list[str]) -> bytes:
    """The figure as PNG bytes: one row per image; the input, then one panel per block of `masks`, titled
    with the count of kept patches it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(images), 1 + len(masks)
    num_patches = next(iter(masks.values())).shape[1:].numel()
    fig = Figure(figsize=(1.55 * cols, 1.7 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, image in enumerate(images):
        panels = [(names[r], image)] + [(f"block {b}: {int(m[r].sum())}/{num_patches} kept", overlay(image, m[r]))
                                        for b, m in masks.items()]
        for ax, (title, picture) in zip(axes[r], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
