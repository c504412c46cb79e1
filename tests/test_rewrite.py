import copy

import pytest
import torch
from conftest import TINY, images, tiny
from reference import idle_forward

import vitidle
from vitidle.engine import idle_block
from vitidle.idle import TokenSelector


@pytest.mark.parametrize("name", list(TINY))
def test_keep_one_equals_dense(name):
    dense = tiny(name)
    model = vitidle.convert(copy.deepcopy(dense), keep=1.0)
    assert sum(isinstance(m, TokenSelector) for m in model.modules()) == 3
    x = images(dense)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(x), dense.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224",
                                  "vit_base_patch16_reg4_gap_256"])
def test_traced_block_equals_eager_idle_layer(name):
    dense = tiny(name)
    layout = vitidle.engine.discover(dense)
    block = dense.blocks[2]
    traced = idle_block(copy.deepcopy(block), num_keep=5, num_prefix=layout.num_prefix, num_patches=layout.num_patches,
                        query=layout.query)
    x = torch.randn(3, layout.num_tokens, layout.dim)
    with torch.no_grad():
        want = idle_forward(block, x, 5, layout.num_prefix, layout.query)
        torch.testing.assert_close(traced(x), want, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_unchanged_and_checkpoints_interchange(deit):
    dense_keys = list(deit.state_dict())
    model = vitidle.convert(copy.deepcopy(deit), keep=0.5)
    assert list(model.state_dict()) == dense_keys
    other = tiny()
    model.load_state_dict(other.state_dict())  # a converted model loads a dense checkpoint
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())  # and a dense model loads a converted one
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key


def test_model_methods_still_work(deit):
    model = vitidle.convert(deit, keep=0.5)
    x = images(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 384)
        assert model.forward_head(feats).shape == (2, 1000)
        assert model(x).shape == (2, 1000)
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4


def test_train_mode_gradients_flow_through_kept_tokens(deit):
    model = vitidle.convert(deit, keep=0.5).train()
    x = images(model)
    model(x).sum().backward()
    for i, block in enumerate(model.blocks):
        assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0, i
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_converted_model_works_under_grad_checkpointing(deit):
    model = vitidle.convert(deit, keep=0.5).train()
    model.set_grad_checkpointing(True)
    model(images(model)).sum().backward()
    assert model.blocks[3].mlp.fc1.weight.grad is not None


def test_idle_model_differs_from_dense_below_keep_one(deit):
    dense = copy.deepcopy(deit)
    model = vitidle.convert(deit, keep=0.5)
    x = images(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), dense(x), atol=1e-4)


def test_pickle_round_trip_and_later_conversions(deit):
    import pickle

    model = vitidle.convert(deit, keep=0.5)
    copied = pickle.loads(pickle.dumps(model))
    x = images(model)
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))
    vitidle.convert(tiny(), keep=0.5)  # a loaded pickle must not break later traces in the process


def test_idle_block_refuses_an_attention_mask(deit):
    model = vitidle.convert(deit, keep=0.5)
    with pytest.raises(TypeError):
        model.blocks[1](torch.randn(1, 17, 384), attn_mask=torch.zeros(17, 17))
    with pytest.raises(TypeError, match="no attention mask"):  # by position: not the write_into_input flag
        model.blocks[1](torch.randn(1, 17, 384), torch.zeros(17, 17, dtype=torch.bool))


def test_fewer_tokens_than_the_plan_keeps(deit):
    model = vitidle.convert(tiny(patch_drop_rate=0.5), keep=1.0).train()  # token dropout in training
    model(images(model)).sum().backward()
    model.eval().blocks[2].selector.num_keep = 16  # every image token
    with torch.no_grad():
        assert model(images(model)).shape == (2, 1000)
    assert model.blocks[2].selector.kept_index.shape == (2, 17)


def test_block_whose_attention_reads_the_input_without_norm():
    from timm.layers import Attention

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(32, num_heads=2)

        def forward(self, x):
            return x + self.attn(x)

    block = Block().eval()
    idle = idle_block(copy.deepcopy(block), num_keep=3, num_prefix=1, num_patches=8)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(idle(x), idle_forward_no_norm(block, x, 3), atol=1e-6, rtol=1e-6)


def idle_forward_no_norm(block, x, num_keep):
    block.norm1 = torch.nn.Identity()  # the reference scores after norm1; here there is none
    return idle_forward(block, x, num_keep, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_converts_a_model_in_another_dtype(dtype):
    dense = tiny().to(dtype)
    model = vitidle.convert(copy.deepcopy(dense), keep=1.0)
    x = images(dense).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), atol=1e-2 if dtype == torch.bfloat16 else 1e-9, rtol=1e-2)


def test_an_empty_batch_gives_an_empty_output(deit):
    dense = copy.deepcopy(deit)
    model = vitidle.convert(deit, keep=0.5)
    x = images(model)[:0]
    with torch.no_grad():
        assert model(x).shape == dense(x).shape == (0, 1000)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_medium_patch16_gap_256"])
def test_a_converted_model_traces_with_fx_as_the_dense_one_does(name):
    model = vitidle.convert(tiny(name), keep=0.5).eval()
    traced = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
    for batch in (1, 3):  # one traced graph for every batch size: no batch-1 branch baked in
        x = images(model, batch)
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))


def test_batch_one_equals_its_row_in_a_batch(deit):
    model = vitidle.convert(deit, keep=0.5)
    x = images(model, batch=3)
    with torch.no_grad():
        whole = model(x)
        for i in range(3):
            torch.testing.assert_close(model(x[i : i + 1]), whole[i : i + 1], atol=1e-5, rtol=1e-5)
