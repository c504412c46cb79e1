"""discover: the block chain and token layout of each timm ViT family, found by tracing; refusals."""

import copy

import pytest
import timm
import torch
from conftest import TINY, tiny
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import vitidle
from vitidle.engine import discover
from vitidle.engine.discover import input_size
from vitidle.errors import UnsupportedModelError

BLOCKS = ("blocks.0", "blocks.1", "blocks.2", "blocks.3")

# name -> (num_tokens, num_prefix, dim, query); every TINY model has 16 image tokens
LAYOUTS = {
    "vit_tiny_patch16_224": (17, 1, 192, "cls"),
    "vit_small_patch16_224": (17, 1, 384, "cls"),
    "deit_tiny_patch16_224": (17, 1, 192, "cls"),
    "deit_small_patch16_224": (17, 1, 384, "cls"),
    "deit3_small_patch16_224": (17, 1, 384, "cls"),
    "deit_small_distilled_patch16_224": (18, 2, 384, "cls"),  # class + distillation token
    "vit_small_patch14_reg4_dinov2": (21, 5, 384, "cls"),  # class + 4 registers
    "vit_medium_patch16_gap_256": (16, 0, 512, "mean"),  # no class token
    "vit_base_patch16_reg4_gap_256": (20, 4, 768, "mean"),  # 4 registers, no class token
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_of_each_family(name):
    assert name in TINY
    layout = discover(tiny(name))
    num_tokens, num_prefix, dim, query = LAYOUTS[name]
    assert layout.blocks == BLOCKS
    assert (layout.num_tokens, layout.num_prefix, layout.dim, layout.query) == (num_tokens, num_prefix, dim, query)
    assert layout.num_patches == 16


def test_layout_follows_the_model_size():
    layout = discover(tiny("deit_tiny_patch16_224", depth=6, img_size=96))
    assert layout.blocks == tuple(f"blocks.{i}" for i in range(6))
    assert (layout.num_tokens, layout.num_patches) == (37, 36)


def test_resnet_has_no_attention_blocks():
    with pytest.raises(UnsupportedModelError, match="no attention blocks"):
        discover(timm.create_model("resnet18", pretrained=False))


def test_already_converted_model_is_refused():
    model = vitidle.convert(tiny("deit_tiny_patch16_224"), keep=0.5)
    with pytest.raises(UnsupportedModelError, match="already converted"):
        discover(model)


def test_qk_norm_is_refused():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64, qk_norm=True)
    with pytest.raises(UnsupportedModelError, match="qk-norm"):
        discover(model)


def test_talking_heads_are_refused():
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=2, img_size=64)
    with pytest.raises(UnsupportedModelError, match="talking heads"):
        discover(model)


def test_a_prefix_the_blocks_do_not_see_is_refused():
    model = tiny("deit_tiny_patch16_224")
    model.num_prefix_tokens = 2  # says 2 + 16 tokens; the blocks see 17 (as CaiT's class token joins later)
    with pytest.raises(UnsupportedModelError, match="blocks see 17 tokens"):
        discover(model)


def test_a_hybrid_vit_takes_images_and_converts():
    dense = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, depth=2, img_size=64).eval()
    assert input_size(dense) == (3, 64, 64)  # the stem's channels, not the projection's
    idle = vitidle.convert(copy.deepcopy(dense), keep=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(idle(x), dense(x))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=32, patch_size=16, embed_dim=64)
        self.first = Block(64, num_heads=4)
        self.second = Block(64, num_heads=4)


class ParallelBlocks(TwoBlocks):
    """Two attention blocks fed from the same input and summed: not a chain."""

    def forward(self, x):
        x = self.patch_embed(x)
        return self.first(x) + self.second(x)


class ChainWithSkip(TwoBlocks):
    """A chain whose second block also reads the embedding: not a plain chain either."""

    def forward(self, x):
        x = self.patch_embed(x)
        return self.second(self.first(x) + x)


@pytest.mark.parametrize("cls", [ParallelBlocks, ChainWithSkip])
def test_blocks_that_are_not_a_chain_are_refused(cls):
    model = cls().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # the model itself runs
    with pytest.raises(UnsupportedModelError) as info:
        discover(model)
    message = str(info.value)
    assert "pass discover" in message and "chain" in message


def test_a_custom_chain_of_timm_blocks_is_found():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed(img_size=32, patch_size=16, embed_dim=64)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 64))
            self.num_prefix_tokens = 1
            self.layers = nn.Sequential(*[Block(64, num_heads=4) for _ in range(3)])

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
            return self.layers(x)[:, 0]

    layout = discover(Chain())
    assert layout.blocks == ("layers.0", "layers.1", "layers.2")
    assert (layout.num_tokens, layout.num_prefix, layout.dim, layout.query) == (5, 1, 64, "cls")


@pytest.mark.parametrize("training", [True, False])
def test_discover_leaves_the_training_flag(training):
    model = tiny("deit_tiny_patch16_224").train(training)
    discover(model)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_discover_leaves_each_submodule_mode():
    model = tiny("deit_tiny_patch16_224").train()
    model.blocks[0].eval()  # e.g. a frozen block
    discover(model)
    assert model.training and not model.blocks[0].training


def test_a_failed_sample_forward_is_one_line_and_prints_nothing(capfd):
    model = tiny()
    model.patch_embed.img_size = (8, 8)  # smaller than a patch: the sample forward fails in the convolution
    with pytest.raises(vitidle.errors.ConversionError, match="pass discover: a sample forward .* failed: "
                                                             "RuntimeError: Calculated padded input size") as info:
        discover(model)
    assert "\n" not in str(info.value)
    assert capfd.readouterr() == ("", "")
