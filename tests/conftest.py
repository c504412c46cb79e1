"""Shared test helpers: tiny random-init timm models, never a download."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import importlib
import sys

import pytest
import timm
import torch

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
