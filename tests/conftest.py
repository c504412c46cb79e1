"""Shared test helpers: tiny random-init timm models, never a download."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import csv
import importlib
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

# test the repo's cli/ folder, not whatever copy of it `pip install .` last put in site-packages
sys.modules["vitidle_cli"] = importlib.import_module("cli")
sys.modules["vitidle_cli.main"] = importlib.import_module("cli.main")

torch.manual_seed(0)

# timm name -> small overrides (16 image tokens, 4 blocks) that keep each family's structure
TINY = {
    "vit_tiny_patch16_224": dict(depth=4, img_size=64),
    "vit_small_patch16_224": dict(depth=4, img_size=64),
    "vit_base_patch16_224": dict(depth=4, img_size=64),
    "deit_tiny_patch16_224": dict(depth=4, img_size=64),
    "deit_small_patch16_224": dict(depth=4, img_size=64),
    "deit_base_patch16_224": dict(depth=4, img_size=64),
    "deit_small_distilled_patch16_224": dict(depth=4, img_size=64),  # class + distillation token
    "deit3_small_patch16_224": dict(depth=4, img_size=64),  # layer scale, pos embed without class
    "vit_small_patch14_reg4_dinov2": dict(depth=4, img_size=56),  # class + 4 register tokens
    "vit_medium_patch16_gap_256": dict(depth=4, img_size=64),  # no class token: mean-query score
    "vit_base_patch16_reg4_gap_256": dict(depth=4, img_size=64),  # registers, no class token
}


def tiny(name: str = "deit_small_patch16_224", **overrides) -> torch.nn.Module:
    """A random-init small model of a timm family, in eval mode."""
    kwargs = {**TINY.get(name, dict(depth=4, img_size=64)), **overrides}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached weights anywhere, and no network calls."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def deit():
    return tiny("deit_small_patch16_224")


# a tiny DeiT for finetune runs (tests/test_loop.py, tests/test_evaluate.py): 16 patches of 8 px, 2 classes
TINY_KWARGS = {"depth": 4, "img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 2, "num_classes": 2}


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """Two classes a ViT tells apart in a few steps: dark top half vs bright bottom half."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("validation", 8)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (32, 32, 3))
                a[:16] += 180 if c else 0
                a[16:] += 0 if c else 180
                Image.fromarray(a.astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def recipe(folder, out, **sections):
    from vitidle.train.recipe import recipe_from_dict

    data = {
        "model": {"name": "deit_tiny", "model_kwargs": TINY_KWARGS, "keep": 0.5},
        "data": {"root": str(folder), "auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0,
                 "color_jitter": 0.0, "scale": [0.9, 1.0]},
        "optim": {"lr": 1e-3, "scale_lr": False, "min_lr": 1e-4},
        "run": {"epochs": 3, "batch_size": 8, "num_workers": 0, "output": str(out), "device": "cpu", "seed": 0},
    }
    for section, fields in sections.items():
        data.setdefault(section, {}).update(fields)
    return recipe_from_dict(data)


def summary(out):
    with open(out / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def idle_run(folder, tmp_path_factory):
    """A 3-epoch idle finetune with the cut loss and the teacher on (the paper's loss)."""
    out = tmp_path_factory.mktemp("runs") / "idle"
    torch.manual_seed(0)
    from vitidle.train import loop

    start = loop.build_models(recipe(folder, out)).student.state_dict()
    return loop.finetune(recipe(folder, out, model={"drop_path": 0.1}), progress=False, log=lambda s: None), start
