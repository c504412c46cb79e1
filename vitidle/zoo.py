"""Models vitidle trains and ships: registered with timm, their weights inside the package (no download).

`vit_fashion_mnist`: a 1.0 M-parameter timm VisionTransformer (28×28 grey images, patch 4: 49 patch
tokens, dim 128, depth 6, 4 heads, mlp ratio 3, 10 classes) trained from scratch on Fashion-MNIST
with `vitidle finetune recipes/fashion_mnist/pretrain.yaml`; fp16 weights, checked by sha256.
Its accuracy, idle and dense, is in docs/results.md.

>>> import timm, vitidle
>>> model = timm.create_model("vit_fashion_mnist", pretrained=True)   # doctest: +SKIP
>>> vitidle.convert("vit_fashion_mnist", keep=0.7)                    # offline, real weights  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from .errors import CheckpointError

WEIGHTS = Path(__file__).parent / "weights"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# the file's sha256: the package's weights are these bytes or the model refuses to load
SHA256 = {"vit_fashion_mnist.safetensors": "e8cd891ce3f21d453d82b2965dadb2b5a0e7f4ff5e1e14426e1cf8fbd6bee594"}
FASHION_MNIST_ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4,
                          mlp_ratio=3)

default_cfgs = generate_default_cfgs({
    "vit_fashion_mnist.vitidle": {
        "file": str(WEIGHTS / "vit_fashion_mnist.safetensors"),
        "num_classes": 10, "input_size": (1, 28, 28), "fixed_input_size": True, "interpolation": "bicubic",
        "crop_pct": 1.0, "crop_mode": "center", "mean": (0.286,), "std": (0.353,),
        "first_conv": "patch_embed.proj", "classifier": "head", "label_names": FASHION_MNIST_CLASSES,
        "license": "apache-2.0", "tag": "vitidle",
    },
})


def eval_sample(model_name: str):
    """The labelled test images to report a shipped model's top-1 on, where they are on this machine, else None:
    the first 2,000 Fashion-MNIST test images (Debian's dataset-fashion-mnist) for `vit_fashion_mnist`."""
    from .train.data import FASHION_MNIST_ROOT
    from .train.recipe import DataSection

    if model_name.partition(".")[0] != "vit_fashion_mnist" or not Path(FASHION_MNIST_ROOT).is_dir():
        return None
    return DataSection(dataset="fashion_mnist", val_split="test", val_limit=2000)


def check_weights(name: str) -> Path:
    """The shipped weights file `name`, after checking its sha256; CheckpointError if it is missing or altered."""
    path = WEIGHTS / name
    if not path.is_file():
        raise CheckpointError(f"the shipped weights {path} are missing: reinstall vitidle")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise CheckpointError(f"the shipped weights {path} are altered (sha256 {digest[:12]}..., expected "
                              f"{str(SHA256[name])[:12]}...): reinstall vitidle")
    return path


@register_model
def vit_fashion_mnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 28×28 grey Fashion-MNIST images, trained by vitidle (see the module docstring)."""
    if pretrained:
        check_weights("vit_fashion_mnist.safetensors")
    return _create_vision_transformer("vit_fashion_mnist", pretrained=pretrained, **{**FASHION_MNIST_ARGS, **kwargs})
