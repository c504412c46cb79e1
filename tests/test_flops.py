"""count_macs against the closed form of a ViT, dense and idle, with the CPU fused attention counted."""

import copy

import pytest
import timm
from conftest import tiny

import vitidle
from vitidle.flops import count_macs


def block_macs(n: int, dim: int) -> int:
    """One ViT block at n tokens: qkv 3nC², proj nC², MLP (ratio 4) 8nC², QK^T and AV 2n²C."""
    return 12 * n * dim**2 + 2 * n**2 * dim


def vit_macs(tokens: list[int], dim: int, num_patches: int, patch: int, num_classes: int,
             idle_tokens: int | None = None, frozen: bool = False) -> int:
    """Blocks at the given token counts + patch embedding + head, + scoring per idle block (2C² + N·C).

    Scoring projects the class token's query (C²), maps it through W_k (C²), then scores N tokens;
    a frozen model reads one cached product W_qᵀ W_k instead of the first two (`frozen`).
    """
    total = sum(block_macs(n, dim) for n in tokens)
    total += num_patches * (3 * patch * patch) * dim + dim * num_classes
    if idle_tokens is not None:
        num_idle = sum(n != idle_tokens for n in tokens)
        total += num_idle * ((1 if frozen else 2) * dim**2 + idle_tokens * dim)
    return total


@pytest.fixture(scope="module")
def deit_small():
    """Full-size DeiT-S (random init), 224x224."""
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def test_dense_deit_small_matches_the_closed_form(deit_small):
    want = vit_macs([197] * 12, 384, 196, 16, 1000)
    assert round(want / 1e9, 2) == 4.60
    got = count_macs(deit_small)
    assert got == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("frozen", [False, True])
def test_idle_deit_small_matches_the_closed_form(deit_small, frozen):
    model = vitidle.freeze(vitidle.convert(copy.deepcopy(deit_small), keep=0.7), frozen)
    # IdleViT plan: blocks 3-5 at 137 image tokens, 6-8 at 96, 9-11 at 67, plus the class token
    assert model.vitidle_config["plan"]["num_keep"] == [None] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    tokens = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    want = vit_macs(tokens, 384, 196, 16, 1000, idle_tokens=197, frozen=frozen)
    assert round(want / 1e9, 2) == 2.88
    assert count_macs(model) == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("keep", [None, 0.5])
def test_cpu_fused_attention_is_counted(keep):
    model = tiny("deit_tiny_patch16_224", depth=4, img_size=128)  # 64 image tokens
    if keep is not None:
        model = vitidle.convert(model, keep=keep)
    assert all(b.attn.fused_attn for b in model.blocks)
    fused = count_macs(model)
    for b in model.blocks:
        b.attn.fused_attn = False
    unfused = count_macs(model)
    assert fused == pytest.approx(unfused, rel=1e-3)
    if keep is None:
        assert fused == pytest.approx(vit_macs([65] * 4, 192, 64, 16, 1000), rel=0.01)


def test_batch_size_scales_macs():
    model = tiny("deit_tiny_patch16_224")
    one = count_macs(model)
    assert count_macs(model, batch_size=3) == pytest.approx(3 * one, rel=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_count_macs_leaves_the_mode(training):
    model = tiny("deit_tiny_patch16_224", drop_rate=0.1).train(training)
    count_macs(model)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_count_macs_counts_an_eval_forward():
    """Token dropout off in the counted forward: a train-mode model counts like an eval one."""
    model = tiny("deit_tiny_patch16_224", patch_drop_rate=0.5)
    eval_macs = count_macs(model.eval())
    assert count_macs(model.train()) == eval_macs


def test_count_macs_leaves_each_submodule_mode():
    model = tiny("deit_tiny_patch16_224").train()
    model.blocks[0].eval()
    count_macs(model)
    assert model.training and not model.blocks[0].training


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad", "enable_grad"])
def test_torchs_own_flop_counter_counts_a_converted_model(grad_mode):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dense = tiny()
    model = vitidle.convert(copy.deepcopy(dense), keep=0.5).eval()
    counts = []
    for net in (model, model, dense):  # twice: the module tracker's hooks must survive a second count
        counter = FlopCounterMode(display=False)
        with counter, getattr(torch, grad_mode)():
            net(torch.randn(1, 3, 64, 64))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] < counts[2]
