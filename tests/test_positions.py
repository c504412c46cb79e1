"""Idle blocks whose attention carries positions: rotary embeddings (timm's Eva) and a relative-position
bias passed to every block (BEiT, relpos ViTs with a shared bias); refusals of what is not supported."""

import copy
import pickle

import pytest
import timm
import torch
from reference import layer_logits, masked_idle_forward, positional_kept

import vitidle
from vitidle.errors import UnsupportedModelError
from vitidle.idle import PositionalSelector, TokenSelector

SMALL = dict(depth=4, img_size=32, patch_size=8, embed_dim=64, num_heads=2)  # 16 patches, head dim 32

# key -> (timm name, overrides); each keeps its family's structure
CONFIGS = {
    "rope": ("vit_small_patch16_rope_224", {}),  # AttentionRope, one rotary table for all heads
    "eva02": ("eva02_tiny_patch14_224", {}),  # EvaAttention: query bias beside the qkv Linear, SwiGLU
    "dinov3": ("vit_small_patch16_dinov3", {}),  # half rotation layout, class + 4 registers
    "rope_gap": ("vit_base_patch16_rope_reg1_gap_256", {}),  # a register, no class token: the mean query
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),  # a table per head and block: keys projected
    "rope_gqa": ("vit_small_patch16_rope_224", dict(qkv_fused=False, num_kv_heads=1)),  # grouped key heads
    "eva_registers": ("vit_small_patch16_rope_224", dict(use_rot_pos_emb=False, num_reg_tokens=2)),  # no rope
    "beit_shared": ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False)),
    "relpos_shared": ("vit_relpos_small_patch16_224", dict(shared_rel_pos=True)),  # no class token
    # each attention computes its own bias: traced inline, the bias gathered where the attention reads it
    "beit": ("beit_base_patch16_224", {}),  # a bias table with class-token entries
    "relpos": ("vit_relpos_small_patch16_224", {}),  # an MLP over log coordinates, no class token
    "relpos_cls_post": ("vit_relpos_medium_patch16_rpn_224", dict(class_token=True)),  # bias padded for the
    # class token; a residual post-norm block, whose attention reads the block input
}
# how the masked reference adds its -inf mask: the block argument the attention adds to its logits, or
# None (at the softmax: relpos attention ignores a shared bias beside its own)
BIAS_ARG = {"beit_shared": "shared_rel_pos_bias", "relpos_shared": "shared_rel_pos", "beit": "shared_rel_pos_bias",
            "relpos": None, "relpos_cls_post": None}


def dense(key, **overrides):
    name, kwargs = CONFIGS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kwargs, **overrides}).eval()
    with torch.no_grad():  # timm starts relative-position tables at zero: make the positions matter
        for param_name, param in model.named_parameters():
            if "relative_position_bias_table" in param_name:
                param.normal_(std=0.5)
    return model


def images(batch=3):
    return torch.randn(batch, 3, 32, 32)


def block_inputs(model):
    """Each block's (x, keyword arguments) of the next forward, as the model passes them."""
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0], kwargs)),
                                        with_kwargs=True)
    return seen


CASES = [(key, 2) for key in CONFIGS] + [("rope", 1), ("beit_shared", 1), ("beit", 1)]  # batch 1 has its own gather / merge


@pytest.mark.parametrize("key, batch", CASES)
def test_idle_layers_equal_the_dense_model_and_the_masked_reference(key, batch):
    base = dense(key)
    model = vitidle.convert(copy.deepcopy(base), keep=0.4, schedule="constant")
    selectors = [m for m in model.modules() if isinstance(m, TokenSelector)]
    assert len(selectors) == 3 and all(isinstance(s, PositionalSelector) for s in selectors)
    layout = model.vitidle_config["layout"]
    x = images(batch)
    plan = [s.num_keep for s in selectors]
    for s in selectors:  # keep 1.0 through the knob: the dense model, to float tolerance
        s.num_keep = layout["num_tokens"] - layout["num_prefix"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(x), base.forward_features(x), atol=1e-5, rtol=1e-5)
    for s, k in zip(selectors, plan):
        s.num_keep = k
    seen = block_inputs(model)
    with torch.no_grad():
        model(x)
    for i, block in enumerate(model.blocks):
        if not hasattr(block, "selector"):
            continue
        tokens, kwargs = seen[i]
        side = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}  # rope / shared bias
        sel = block.selector
        want = positional_kept(base.blocks[i], tokens, sel.num_keep, layout["num_prefix"], layout["query"], **side)
        kept = sel.kept_index
        # the prefix first (rotary attention leaves it unrotated), in any order
        assert torch.equal(kept[:, : layout["num_prefix"]].sort(1).values,
                           torch.arange(layout["num_prefix"]).expand(batch, -1))
        assert torch.equal(kept.sort(1).values, want), f"block {i}"
        with torch.no_grad():
            got = block(tokens, **kwargs)
        ref = masked_idle_forward(base.blocks[i], tokens, want, BIAS_ARG.get(key, "attn_mask"), **side)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        idle = torch.ones(tokens.shape[:2], dtype=torch.bool).scatter_(1, kept, False)
        assert torch.equal(got[idle], tokens[idle])  # idle tokens bit-identical
        assert not torch.allclose(got[~idle], tokens[~idle])


@pytest.mark.parametrize("key", ["rope", "rope_gap", "beit_shared", "relpos"])
def test_recorded_logits_are_the_layers_own(key):
    base = dense(key)
    model = vitidle.convert(copy.deepcopy(base), keep=0.5, schedule="constant")
    seen = block_inputs(model)
    block = model.blocks[2]
    block.selector.record_attention = True
    model(images(2))
    x, kwargs = seen[2]
    side = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    logits = block.selector.attention_logits
    torch.testing.assert_close(logits.detach(), layer_logits(base.blocks[2], x, **side).mean(1), atol=1e-5, rtol=1e-5)
    logits.sum().backward()  # differentiable, for the token cut loss
    assert block.attn.get_submodule(block.selector.qk.k_proj).weight.grad is not None


@pytest.mark.parametrize("key", ["rope", "rope_mixed", "beit_shared", "beit"])
def test_save_load_pickle_and_fx_retrace(key, tmp_path):
    model = vitidle.convert(dense(key), keep=0.5).eval()
    x = images()
    with torch.no_grad():
        want = model(x)
        vitidle.save(model, tmp_path / "m")
        assert torch.equal(vitidle.load(tmp_path / "m")(x), want)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), want)
        args = {"attn_mask": None, "is_causal": False} if "attn_mask" in model.blocks[0].attn.forward.__code__.co_varnames else {}
        traced = torch.fx.symbolic_trace(model, concrete_args=args or None)
        for batch in (1, 3):  # one traced graph for every batch size
            x = images(batch)
            assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("key", ["rope", "eva02", "dinov3"])
def test_the_conversion_records_that_timms_rotary_tables_pair_their_columns(key):
    model = vitidle.convert(dense(key), keep=0.5)  # what tracers (ONNX) score with: half-width products
    assert all(s.paired for s in model.modules() if isinstance(s, PositionalSelector))


@pytest.mark.parametrize("key", ["beit", "beit_shared", "relpos", "eva_registers", "rope_gqa", "rope", "eva02", "dinov3",
                                 "rope_gap"])
def test_frozen_selectors_keep_the_same_tokens(key):
    model = vitidle.convert(dense(key), keep=0.5, schedule="constant").eval()
    x = images()
    with torch.no_grad():
        want = model(x)
        kept = [s.kept_index for s in model.modules() if isinstance(s, PositionalSelector)]
        vitidle.freeze(model)  # one cached W_qᵀ W_k product instead of W_q and W_k; with rope, the pairs' key rows
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    selectors = [s for s in model.modules() if isinstance(s, PositionalSelector)]
    assert [torch.equal(s.kept_index.sort(1).values, k.sort(1).values) for s, k in zip(selectors, kept)] == [True] * len(kept)
    assert all(s._product_cache is not None for s in selectors) == (key != "rope_gqa")  # grouped key heads: none


@pytest.mark.parametrize("key", ["rope", "dinov3", "beit"])  # dinov3: a class token and 4 registers
@pytest.mark.parametrize("frozen", [False, True])
def test_a_nan_token_in_one_image_leaves_the_others_alone(key, frozen):
    # top-k ranks NaN above +inf: a NaN score must not take the prefix's place (rope would rotate it)
    model = vitidle.freeze(vitidle.convert(dense(key), keep=0.5, schedule="constant").eval(), frozen)
    seen = block_inputs(model)
    x = images(2)
    with torch.no_grad():
        model(x)
        i = next(i for i, b in enumerate(model.blocks) if hasattr(b, "selector"))
        tokens, kwargs = seen[i]
        alone = model.blocks[i](tokens[:1].clone(), **kwargs)
        tokens = tokens.clone()
        tokens[1, -1] = float("nan")
        out = model.blocks[i](tokens, **kwargs)
    P = model.vitidle_config["layout"]["num_prefix"]
    assert torch.equal(model.blocks[i].selector.kept_index[:, :P].sort(1).values, torch.arange(P).expand(2, P))
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


def _rope_mixed_block():
    """An idle block of a model with a rotary table per head, and its inputs; layer scale at 1 (timm starts it at
    1e-5, under which a wrong attention output hardly shows in the block's)."""
    base = dense("rope_mixed")
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                param.fill_(1.0)
    model = vitidle.convert(base, keep=0.5, schedule="constant").eval()
    seen = block_inputs(model)
    with torch.no_grad():
        model(images(2))
    return model.blocks[3], seen[3]


def test_an_attention_reuses_the_keys_its_selector_projected():
    # a rotary table per head: the selector projects every token's key to score; the attention takes the kept
    # tokens' from there instead of projecting them again, (P + K)·C² MACs a block less, with the same output
    from torch.utils.flop_counter import FlopCounterMode

    from vitidle.idle import KeyedLinear

    block, (tokens, kwargs) = _rope_mixed_block()
    assert isinstance(block.attn.qkv, KeyedLinear) and set(block.state_dict()) >= {"attn.qkv.weight", "attn.qkv.bias"}
    out, macs = {}, {}
    for grad in (False, True):  # with gradients recorded, the attention projects its keys itself
        counter = FlopCounterMode(display=False)
        with torch.set_grad_enabled(grad), counter:
            out[grad] = block(tokens, **kwargs)
        macs[grad] = counter.get_total_flops() // 2
    kept = block.selector.num_prefix + block.selector.num_keep
    assert macs[True] - macs[False] == 2 * kept * 64 * 64  # batch 2, 64 dims
    torch.testing.assert_close(out[False], out[True].detach(), atol=1e-5, rtol=1e-5)
    assert "vitidle_given" not in block.attn.qkv.__dict__  # handed over once, taken once


def test_keys_projected_from_other_tokens_are_never_handed_over():
    # a direct call of the selector (or another thread's forward) leaves keys of other tokens behind: a forward
    # that projects none (recording its logits) must not take them
    block, (tokens, kwargs) = _rope_mixed_block()
    with torch.no_grad():
        want = block(tokens, **kwargs)
        block.selector(block.norm1(torch.randn_like(tokens)), block.attn, kwargs["rope"])
        block.selector.record_attention = True
        torch.testing.assert_close(block(tokens, **kwargs), want, atol=1e-5, rtol=1e-5)
        block.selector.record_attention = False
    # nor taken for an attention input changed since (by a hook, in place): the keys are projected again
    handle = block.attn.register_forward_pre_hook(lambda module, args: args[0].mul_(2.0))
    with torch.no_grad():
        got = block(tokens, **kwargs)
    want = block(tokens, **kwargs).detach()  # with gradients recorded, no key is handed over
    handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "vitidle_given" not in block.attn.qkv.__dict__


def test_training_with_patch_dropout_and_gradients():
    from timm.layers import PatchDropoutWithIndices

    model = vitidle.convert(dense("rope"), keep=0.7).train()
    model.patch_drop = PatchDropoutWithIndices(0.25, num_prefix_tokens=1)  # rotary rows per image, fewer tokens
    model(images(2)).sum().backward()
    assert model.blocks[3].selector.kept_index.shape == (2, 1 + 5)  # int(16 · 0.7³) image tokens
    for i, block in enumerate(model.blocks):
        assert block.attn.qkv.weight.grad.abs().sum() > 0, i


@pytest.mark.parametrize("key", ["beit", "relpos"])
def test_an_attentions_own_bias_learns_through_the_gather(key):
    model = vitidle.convert(dense(key), keep=0.5, schedule="constant").train()
    model(images(2)).sum().backward()
    for block in model.blocks[1:]:  # idle blocks: the gathered bias rows carry the gradient to the table
        table = next(p for n, p in block.named_parameters() if "relative_position_bias_table" in n or "rel_pos.mlp" in n)
        assert table.grad is not None and table.grad.abs().sum() > 0


def test_an_idle_block_refuses_an_attention_mask():
    model = vitidle.convert(dense("rope"), keep=0.5)
    x, rope = torch.randn(1, 17, 64), model.rope.get_embed()
    model.blocks[1](x, rope=rope, attn_mask=None, is_causal=False)
    with pytest.raises(TypeError, match="attn_mask"):
        model.blocks[1](x, rope=rope, attn_mask=torch.zeros(1, 1, 17, 17))


@pytest.mark.parametrize("name, kwargs, match", [
    # a bias of its own beside a shared one: two position terms
    ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True), "does not run on a subset of its tokens"),
    ("beit_base_patch16_224", dict(attn_drop_rate=0.1), "branches on training mode.*attn_drop_rate=0"),
    ("vit_small_patch16_18x2_224", {}, "parallel attention branches"),
])
def test_unsupported_position_schemes_are_refused_with_the_reason(name, kwargs, match):
    model = timm.create_model(name, pretrained=False, **SMALL, **kwargs)
    with pytest.raises(UnsupportedModelError, match=match) as info:
        vitidle.convert(model, keep=0.5)
    assert "\n" not in str(info.value)


def test_plain_vit_keeps_the_plain_selector():
    model = vitidle.convert(timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL), keep=0.5)
    assert {type(m) for m in model.modules() if isinstance(m, TokenSelector)} == {TokenSelector}


@pytest.mark.parametrize("key, legacy", [("rope", True), ("rope", False), ("rope_mixed", False), ("beit_shared", True),
                                         ("beit", True), ("relpos", True)])
def test_onnx_export_matches_onnxruntime(key, legacy, tmp_path):
    from vitidle.export import export_onnx

    model = vitidle.convert(dense(key, depth=2), keep=0.5, schedule="constant").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("qkv.bias"):  # timm starts them at zero: make the key bias count
                param.normal_()
    # rope: the exported graph gathers each pair's key rows from the weights (`_traced_pair_rows`)
    report = export_onnx(model, tmp_path / "model.onnx", legacy=legacy, images=images(2))
    assert report.max_diff <= 1e-4


@pytest.mark.parametrize("key", ["rope", "beit_shared", "beit", "relpos"])
def test_bench_limit_cuts_each_blocks_tokens_and_positions(key):
    from vitidle.bench import bench, limit_model

    base = dense(key)
    idle = vitidle.convert(copy.deepcopy(base), keep=0.5, schedule="constant")
    limit = limit_model(base, idle)
    seen = []
    for block in limit.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        limit(images(2))
    P = idle.vitidle_config["layout"]["num_prefix"]
    assert seen == [P + 16] + [P + 8] * 3  # the first quarter dense, then half of the 16 patches
    with torch.no_grad():  # at keep 1.0 nothing is cut: the dense model
        x = images(2)
        torch.testing.assert_close(limit_model(base, vitidle.convert(copy.deepcopy(base), 1.0))(x), base(x))
    macs = bench(base, idle, batch_sizes=(1,), repeats=1, warmup=0, onnx=False)["gmacs"]
    assert macs["limit"] <= macs["idle"] < macs["dense"]
