import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from reference import class_attention_scores, kept_positions
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitidle
from vitidle.idle import IdleSequential, keep_mask


def converted(name="deit_small_patch16_224", keep=0.5, **kw):
    return vitidle.convert(tiny(name, **kw), keep, schedule="constant")


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224",
                                  "vit_small_patch14_reg4_dinov2", "vit_medium_patch16_gap_256"])
def test_kept_set_equals_brute_force_top_k(name):
    model = converted(name)
    layout = model.vitidle_config["layout"]
    inputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
    model(torch.randn(3, 3, *model.patch_embed.img_size))
    dense = tiny(name)
    dense.load_state_dict(model.state_dict())
    checked = 0
    for i, block in enumerate(model.blocks):
        if not hasattr(block, "selector"):
            continue
        sel = block.selector
        want = kept_positions(dense.blocks[i], inputs[i], sel.num_keep, layout["num_prefix"], layout["query"])
        assert torch.equal(sel.kept_index.sort(1).values, want), f"block {i}"
        checked += 1
    assert checked == 3


def test_recorded_attention_logits_are_the_full_head_mean_logits():
    model = converted()
    block = model.blocks[2]
    block.selector.record_attention = True
    x = torch.randn(2, 17, 384, requires_grad=True)
    block(x)
    logits = block.selector.attention_logits
    dense = tiny()
    dense.load_state_dict(model.state_dict())
    assert torch.allclose(logits[:, 0], class_attention_scores(dense.blocks[2], x), atol=1e-5)
    assert logits.shape == (2, 17, 17)
    logits.sum().backward()  # differentiable, for the token cut loss
    assert model.blocks[2].attn.qkv.weight.grad is not None
    mask = keep_mask(block.selector, 17)
    assert mask.sum(1).tolist() == [1 + block.selector.num_keep] * 2 and mask[:, 0].eq(1).all()


@pytest.mark.parametrize("batch", [1, 4])  # batch 1 has its own gather and merge path
def test_idle_tokens_are_bit_identical_through_an_idle_layer(batch):
    model = converted(keep=0.3)
    block = model.blocks[1]
    x = torch.randn(batch, 17, 384)
    y = block(x)
    idle = torch.ones(batch, 17, dtype=torch.bool).scatter_(1, block.selector.kept_index, False)
    assert idle.sum() == batch * (16 - block.selector.num_keep)
    assert torch.equal(y[idle], x[idle])
    assert not torch.allclose(y[~idle], x[~idle])  # the kept tokens did go through the block


def test_num_keep_is_the_knob():
    model = converted(keep=0.5)
    block = model.blocks[3]
    block.selector.num_keep = 3
    block(torch.randn(2, 17, 384))
    assert block.selector.kept_index.shape == (2, 4)


def test_selector_adds_no_state():
    model = converted()
    assert list(model.blocks[1].selector.state_dict()) == []


def frozen(**kw):
    return vitidle.freeze(converted(**kw))


def assert_kept_as_brute_force(model, block_index, x, dense=None):
    block = model.blocks[block_index]
    if dense is None:
        dense = tiny().to(x.dtype)
        dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = kept_positions(dense.blocks[block_index], x, block.selector.num_keep, 1)
    assert torch.equal(block.selector.kept_index.sort(1).values, want)


def _new_keys_in_place(model):
    model.blocks[2].attn.qkv.weight[384:768].normal_()  # as an optimizer step updates


def _new_query_bias_by_load_state_dict(model):
    state = model.state_dict()
    state["blocks.2.attn.qkv.bias"] = torch.randn(3 * 384)
    model.load_state_dict(state)


def _new_weight_storage(model):
    model.blocks[2].attn.qkv.weight.data = torch.randn(3 * 384, 384) * 0.05


def _float64(model):
    model.double()


def _data_edit_in_train_mode(model):
    mode = model.training
    model.train()  # a fused optimizer step writes without bumping versions, as a .data edit does
    model.blocks[2].attn.qkv.weight.data[384:768].normal_()
    model.train(mode)


@pytest.mark.parametrize("change", [_new_keys_in_place, _new_query_bias_by_load_state_dict, _new_weight_storage,
                                    _float64, _data_edit_in_train_mode])
@pytest.mark.parametrize("mode", ["eval", "train"])  # frozen eval reads a cached product of the weights
def test_selection_follows_weight_updates(change, mode):
    model = frozen(keep=0.5).train(mode == "train")
    block = model.blocks[2]
    block(torch.randn(2, 17, 384))
    with torch.no_grad():
        change(model)
    x = torch.randn(2, 17, 384, dtype=block.attn.qkv.weight.dtype)
    block(x)
    assert_kept_as_brute_force(model, 2, x)


def test_selection_follows_a_removed_bias():
    model, x = frozen(), torch.randn(2, 17, 384)
    with torch.no_grad():
        model.blocks[2].attn.qkv.bias.normal_()  # a query bias that changes the ranking
    model.blocks[2](x)
    model.blocks[2].attn.qkv.bias = None
    model.blocks[2](x)
    dense = tiny()
    dense.load_state_dict(model.state_dict(), strict=False)
    dense.blocks[2].attn.qkv.bias = None
    assert_kept_as_brute_force(model, 2, x, dense)


def test_frozen_scorer_follows_the_token_count():
    model = frozen()
    with torch.no_grad():  # a frozen model at inference scores from its caches
        for n in (17, 13, 17):  # the cached prefix bias has one score per token: a new count makes a new one
            x = torch.randn(1, n, 384)
            model.blocks[2](x)
            assert_kept_as_brute_force(model, 2, x)


def test_weights_made_under_inference_mode_are_scored_without_a_cache():
    x = torch.randn(2, 17, 384)
    with torch.inference_mode():  # inference tensors keep no version counter: in-place updates go unseen
        model = frozen()
        model.blocks[2](x)
        model.blocks[2].attn.qkv.weight[384:768].normal_()  # so the scorer must not cache
        model.blocks[2](x)
    assert model.blocks[2].selector._product_cache is None
    assert_kept_as_brute_force(model, 2, x)


def test_frozen_scorer_after_autocast_and_torch_func():
    model, x = frozen(), torch.randn(2, 17, 384)
    block = model.blocks[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    block(x)  # the product was formed in float32, not in the autocast dtype
    assert_kept_as_brute_force(model, 2, x)
    grads = torch.func.grad(lambda p: torch.func.functional_call(block, p, (x,)).sum())(dict(block.named_parameters()))
    assert grads["attn.qkv.weight"].shape == (3 * 384, 384)
    block(x)  # torch.func's wrapped weights were not cached
    assert_kept_as_brute_force(model, 2, x)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap falls back to a loop for sdpa, index_copy_
def test_a_first_forward_under_vmap_leaves_the_model_usable():
    model, x = frozen().eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        batched = torch.func.vmap(model)(torch.stack([x, x]))  # nothing of vmap's may stay in a cache
        torch.testing.assert_close(model(x), batched[0])


def test_deepcopy_after_recording_attention():
    model = converted().train()
    for selector in vitidle.idle_selectors(model):
        selector.record_attention = True
    model(torch.randn(2, 3, 64, 64)).sum().backward()  # the logits hold their graph
    copied = copy.deepcopy(model)  # e.g. the best or the EMA model of a finetune
    assert all(s.attention_logits is None for s in vitidle.idle_selectors(copied))
    assert all(s.attention_logits is not None for s in vitidle.idle_selectors(model))


class Products(TorchDispatchMode):
    """Records the matrix products whose operands are both C×C: the scorer's product of weights."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.count = dim, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        square = [a for a in args if isinstance(a, torch.Tensor) and a.shape == (self.dim, self.dim)]
        self.count += func.overloadpacket is torch.ops.aten.mm and len(square) == 2
        return func(*args, **(kwargs or {}))


def test_frozen_scorer_forms_the_weight_product_once():
    model, x = converted(), torch.randn(1, 3, 64, 64)
    with Products(384) as unfrozen:
        model(x)
        model(x)
    assert unfrozen.count == 0  # not frozen: W_q and W_k are read as they are
    vitidle.freeze(model)
    with Products(384) as first:
        model(x)
    with Products(384) as again:
        model(x)
    assert (first.count, again.count) == (3, 0)
    clone = copy.deepcopy(model)  # a copy does not carry the cache: it forms its own
    assert clone.blocks[1].selector._product_cache is None
    with Products(384) as copied:
        assert torch.equal(clone(x), model(x))
    assert copied.count == 3
    model.float()  # .to() and friends drop the cache, and the old weights with it
    assert model.blocks[1].selector._product_cache is None
    with Products(384) as training:
        model.train()(x)
    assert training.count == 0  # training reads W_q and W_k, whose product changes at every step


def test_selector_follows_the_block_mode():
    model = converted()
    assert not model.blocks[1].selector.training
    model.train()
    assert model.blocks[1].selector.training


class InPlaceMerges:
    """Counts the merges that write into the block input (index_copy_) instead of a copy (index_copy), by a
    spy on the method: under a torch dispatch mode, which may keep tensors, no block writes in place."""

    def __enter__(self):
        self.count, method = 0, torch.Tensor.index_copy_

        def counted(tensor, *args):
            self.count += 1
            return method(tensor, *args)

        torch.Tensor.index_copy_, self.method = counted, method
        return self

    def __exit__(self, *exc):
        torch.Tensor.index_copy_ = self.method


class Recorder(TorchDispatchMode):
    """Keeps every op's tensor output and a copy of it, as an activation recorder does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.kept.append((out, out.clone()))
        return out


def chained(**kw):
    """A converted 4-block DeiT-S (blocks 1-3 idle) and the same model with a plain nn.Sequential."""
    model = vitidle.convert(tiny(**kw), 0.5)
    plain = copy.deepcopy(model)
    plain.blocks = nn.Sequential(*plain.blocks)
    return model, plain


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])  # timm's RmsNorm is no nn.RMSNorm
def test_idle_blocks_write_into_inputs_the_chain_made(batch, norm):
    model, plain = chained(norm_layer=norm)
    assert isinstance(model.blocks, IdleSequential)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad(), InPlaceMerges() as merges:
        y = model(x)
    assert merges.count == 2  # blocks 2 and 3: their inputs come from idle blocks 1 and 2
    with torch.no_grad(), InPlaceMerges() as merges:
        copy.deepcopy(model)(x)
    assert merges.count == 2  # a copy of the model keeps what it needs
    with torch.no_grad():
        assert torch.equal(y, plain(x))
    with InPlaceMerges() as merges:  # autograd may need the inputs: copy
        model(x).sum().backward()
    assert merges.count == 0


def test_a_dispatch_mode_sees_tensors_as_they_were_made():
    model, _ = chained()
    with torch.no_grad(), InPlaceMerges() as merges, Recorder() as recorder:
        recorder.kept = []
        model(torch.randn(2, 3, 64, 64))
    assert merges.count == 0 and all(torch.equal(out, copy) for out, copy in recorder.kept)


def test_the_callers_tensor_is_never_written():
    model = vitidle.convert(tiny(), plan=[0.5] * 4)  # block 0 idle too: its input is the caller's
    x = torch.randn(2, 17, 384)
    kept = x.clone()
    with torch.no_grad(), InPlaceMerges() as merges:
        model.blocks(x)
    assert merges.count == 3 and torch.equal(x, kept)


# each registers a hook on `net` that passes one tensor of the idle chain (blocks 1-3) to `keep`
HOOKS = {
    "output of the block before": lambda net, keep: net.blocks[1].register_forward_hook(lambda m, a, y: keep(y)),
    "input of the block": lambda net, keep: net.blocks[2].register_forward_pre_hook(lambda m, a: keep(a[0])),
    "input, after the block": lambda net, keep: net.blocks[2].register_forward_hook(lambda m, a, y: keep(a[0])),
    "input of its norm": lambda net, keep: net.blocks[2].norm1.register_forward_pre_hook(lambda m, a: keep(a[0])),
    "global": lambda net, keep: nn.modules.module.register_module_forward_hook(
        lambda m, a, y: keep(y) if m is net.blocks[1] else None),
}


@pytest.mark.parametrize("hook", HOOKS)
def test_a_hook_sees_tensors_as_they_were_made(hook):
    model, plain = chained()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    for net in (model, plain):
        kept = []
        handle = HOOKS[hook](net, kept.append)
        with torch.no_grad():
            net(x)
        handle.remove()
        seen.append(kept)
    (got,), (want,) = seen
    assert torch.equal(got, want)


class KeepInput(nn.Module):
    """A module that keeps the tensor it is given, as a user's feature probe might."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.kept = inner, None

    def forward(self, x):
        self.kept = x
        return self.inner(x)


@pytest.mark.parametrize("change", ["norm swapped for a module", "forward patched", "norm's forward patched"])
def test_a_changed_block_sees_tensors_as_they_were_made(change):
    model, plain = chained()
    x = torch.randn(2, 3, 64, 64)
    kept = []
    for net in (model, plain):
        block = net.blocks[2]
        if change == "norm swapped for a module":
            block.norm1 = KeepInput(block.norm1)
            run = lambda: block.norm1.kept  # noqa: E731
        elif change == "norm's forward patched":
            inputs, forward = [], block.norm1.forward
            block.norm1.forward = lambda t: (inputs.append(t), forward(t))[1]
            run = lambda inputs=inputs: inputs[0]  # noqa: E731
        else:
            inputs, forward = [], block.forward
            block.forward = lambda t: (inputs.append(t), forward(t))[1]
            run = lambda inputs=inputs: inputs[0]  # noqa: E731
        with torch.no_grad():
            net(x)
        kept.append(run())
    assert torch.equal(*kept)


def test_forward_intermediates_are_unchanged_by_later_blocks():
    model, plain = chained()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, got = model.forward_intermediates(x)
        _, want = plain.forward_intermediates(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_compiles_into_one_graph():
    model, plain = chained()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo only: no C++ compiler needed
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), plain(x))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # deprecation; timm's asserts
def test_a_trace_at_batch_1_runs_every_batch_size():
    model = converted().eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))  # as torch.onnx.export(dynamo=False) traces
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


class WrappedLinear(nn.Module):
    """An adapter around a Linear, as peft's LoRA layers are: `weight` is the base weight, the output is not."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer, self.delta = base, nn.Linear(base.in_features, base.out_features, bias=False)
        nn.init.normal_(self.delta.weight, std=0.5)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.delta(x)


def assert_scored_with_the_adapted_layer(model, block_index, x, dense):
    block = model.blocks[block_index]
    block.selector.record_attention = True
    block(x)
    torch.testing.assert_close(block.selector.attention_logits[:, 0], class_attention_scores(dense.blocks[block_index], x),
                               atol=1e-4, rtol=1e-4)
    block.selector.record_attention = False
    with torch.no_grad():
        block(x)
    want = kept_positions(dense.blocks[block_index], x, block.selector.num_keep, 1)
    assert torch.equal(block.selector.kept_index.sort(1).values, want)


@pytest.mark.parametrize("mode", ["eval", "frozen", "train"])
def test_a_wrapped_projection_is_scored_as_it_computes(mode):
    model = converted().train(mode == "train")
    vitidle.freeze(model, mode == "frozen")
    x = torch.randn(2, 17, 384)
    model.blocks[2](x)  # a frozen model caches the plain weights' product first
    model.blocks[2].attn.qkv = WrappedLinear(model.blocks[2].attn.qkv)
    dense = copy.deepcopy(model)  # the reference reads the block's own (wrapped) attention
    assert_scored_with_the_adapted_layer(model, 2, x, dense)


def test_lora_adapters_are_scored_with_their_update():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(converted(), peft.LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    base = model.base_model.model
    base.eval()
    assert_scored_with_the_adapted_layer(base.train(), 2, torch.randn(2, 17, 384), base)
    merged = copy.deepcopy(model).merge_and_unload()  # W + BA as a plain Linear again: the fast path, same choice
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(merged.eval()(x), model.eval()(x), atol=1e-4, rtol=1e-4)
        assert torch.equal(merged.blocks[3].selector.kept_index, base.blocks[3].selector.kept_index)


@pytest.mark.parametrize("value", [0, -1, 17, 2.5, True, "3"])
def test_num_keep_outside_1_to_num_patches_is_refused(value):
    model = converted()
    with pytest.raises(vitidle.VitidleError, match=r"num_keep must be a whole number of image tokens in 1\.\.16"):
        model.blocks[1].selector.num_keep = value
    assert model.blocks[1].selector.num_keep == 8


def test_fx_trace_and_eager_agree_at_every_allowed_num_keep():
    model = converted().eval()
    x = torch.randn(2, 3, 64, 64)
    for k in (1, 16):
        for selector in vitidle.idle_selectors(model):
            selector.num_keep = k
        traced = torch.fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": False})
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))


def test_recording_attention_without_gradients_in_training_is_refused():
    import timm.layers

    model = converted().train()
    model.set_grad_checkpointing(True)
    for selector in vitidle.idle_selectors(model):
        selector.record_attention = True
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()  # timm's default, non-reentrant checkpointing records with gradients
    assert model.blocks[1].selector.attention_logits.requires_grad
    timm.layers.set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match="reentrant checkpointing"):
            model(x)
    finally:
        timm.layers.set_reentrant_ckpt(False)
    with torch.no_grad():
        model.eval()(x)  # eval mode records for a look at the attention, without gradients


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_torch_jit_script_names_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.export.export, torch.compile"):
        torch.jit.script(converted())


def _rope_selector():
    """An idle Eva block's selector, its attention, the model's rotary table (a copy) and normed tokens."""
    model = converted("vit_small_patch16_rope_224", img_size=32, patch_size=8, embed_dim=64, num_heads=2)
    block = model.blocks[-1]
    rope = model.rope.get_embed().clone()
    x_norm = torch.randn(2, block.selector.num_prefix + rope.shape[0], 64)
    return block.selector, block.attn, rope, x_norm


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("key_bias", [False, True])  # timm initializes biases to zeros; frozen scoring leaves those out
@pytest.mark.parametrize("query", ["cls", "mean"])
def test_rotary_scores_are_the_layers_logits(paired, key_bias, query):
    # timm's tables turn partners c, |P|(c) by one angle (the score sums their rows); a table that does
    # not gets the full product (tracers take the pairing the conversion saw)
    sel, attn, rope, x_norm = _rope_selector()
    sel.query = query
    if not paired:
        rope += 0.01 * torch.randn_like(rope)
    with torch.no_grad():
        if key_bias:
            attn.qkv.bias.normal_()
        for x in (x_norm, x_norm[:1]):  # batch 1 takes views where a batch copies
            logits = sel._logits(x, attn, rope, None)
            want = (logits[:, 0] if query == "cls" else logits.mean(1))[:, sel.num_prefix:]
            for cached, frozen in ((False, False), (True, False), (True, True)):
                sel.frozen, sel._product_cache = frozen, None
                scores = sel._token_scores(x, attn, rope, None, cached)
                torch.testing.assert_close(scores[:, sel.num_prefix:], want)
                if cached and not frozen:
                    assert sel._rotary_cache[-1].paired is paired
                # frozen: what does not depend on the image is kept, for timm's tables (the key bias if not zero)
                made = sel._product_cache
                assert (made is not None and made[2] is not None and made[2].keys.shape[-1] == x.shape[-1] + key_bias) == (frozen and paired)


def test_frozen_rotary_scores_follow_a_change_of_the_query():
    sel, attn, rope, x_norm = _rope_selector()
    sel.frozen = True
    with torch.no_grad():
        logits = sel._logits(x_norm, attn, rope, None)[..., sel.num_prefix:]
        for query, want in (("cls", logits[:, 0]), ("mean", logits.mean(1)), ("cls", logits[:, 0])):
            sel.query = query  # what the frozen path keeps differs by query: kept apart
            torch.testing.assert_close(sel._token_scores(x_norm, attn, rope, None, True)[:, sel.num_prefix:], want)


@pytest.mark.parametrize("name, grid", [("vit_small_patch16_rope_224", (4, 6)), ("vit_small_patch16_dinov3", (3, 5))])
def test_shared_angles_factor_an_axial_table_exactly(name, grid):
    from vitidle.idle import shared_angles

    model = converted(name, img_size=(8 * grid[0], 8 * grid[1]), patch_size=8, embed_dim=64, num_heads=2)
    sel = model.blocks[-1].selector
    x = torch.randn(1, sel.num_prefix + grid[0] * grid[1], 64)
    _, table, paired, _ = sel._rotary_tables(model.rope.get_embed(shape=list(grid)), x, 32, 1.0, False)
    mix, E = shared_angles(table, sel.num_prefix)
    # each pair turns by the token's column or its row: one class per column and per row, for all pairs together
    assert paired and E.shape[1] == sum(grid) < table.shape[1]
    assert torch.equal(E @ mix, table)  # exact: one product by 1 per entry
    assert torch.equal(E.sum(1), torch.tensor([0.0] * sel.num_prefix + [2.0] * (grid[0] * grid[1])))
    assert shared_angles(torch.rand(1 + 40, 16), 1)[0] is None  # every token its own angles: 40 rows, not 8


@pytest.mark.parametrize("rotate_half", [False, True])
def test_rotary_pair_layout_is_timms_rotation(rotate_half):
    from timm.layers.pos_embed_sincos import rope_rotate_half, rot

    from vitidle.idle import rotary_pair_layout

    d, heads = 8, 3
    q = torch.randn(heads, d)
    minus_p = -(rope_rotate_half if rotate_half else rot)(q)  # −P(q), as timm turns the keys
    order, twice, signs = (torch.tensor(t) for t in rotary_pair_layout(d, heads, rotate_half))
    q2 = (q.flatten()[twice] * signs).view(d // 2, 2, 2, heads)  # pair, t, member, head
    members = (order.view(d // 2, 2, heads) % d)[..., 0]  # each pair's two columns
    assert sorted(members.flatten().tolist()) == list(range(d))
    for pair, (a, b) in enumerate(members.tolist()):
        assert torch.equal(q2[pair, 0], torch.stack([q[:, a], q[:, b]]))
        assert torch.equal(q2[pair, 1], torch.stack([minus_p[:, a], minus_p[:, b]]))


@pytest.mark.parametrize("key_bias", [False, True])
def test_exported_graphs_form_the_same_rotary_rows(key_bias):
    # exported graphs gather each pair's key rows from the weights (onnxruntime folds them) instead of
    # summing partners: the same rows m and biases, in the same order
    sel, attn, rope, x_norm = _rope_selector()
    with torch.no_grad():
        if key_bias:
            attn.qkv.bias.normal_()
        q = sel._queries(x_norm, attn, rope)  # B, H, d
        k_weight, k_bias = sel._weights(attn, "k")
        turns = sel._rotary_tables(rope, x_norm, q.shape[-1], 1.0, False)[0]
        m, bias = sel._traced_pair_rows(q, k_weight, k_bias)
        want_m, want_bias = sel._pair_rows(q, k_weight, k_bias, turns, True)
        torch.testing.assert_close(m, want_m)
        torch.testing.assert_close(bias, want_bias)


@pytest.mark.parametrize("frozen", [False, True])
def test_rotary_tables_follow_an_in_place_change_of_the_rotary_table(frozen):
    sel, attn, rope, x_norm = _rope_selector()
    sel.frozen = frozen
    with torch.no_grad():
        sel._token_scores(x_norm, attn, rope, None, True)
        rope[:, rope.shape[1] // 2:] *= 0.5  # the cosines
        torch.testing.assert_close(sel._token_scores(x_norm, attn, rope, None, True)[:, sel.num_prefix:],
                                   sel._logits(x_norm, attn, rope, None)[:, 0, sel.num_prefix:])


def test_rotary_tables_are_kept_for_a_new_table_with_the_same_values():
    # DINOv3 makes its table anew at every forward: one comparison instead of rebuilding (and factoring) them
    sel, attn, rope, x_norm = _rope_selector()
    with torch.no_grad():
        kept = sel._rotary_tables(rope, x_norm, 32, 1.0, True)
        assert kept.mix is not None  # a 4 x 4 grid: 4 angles a pair (by column or by row), 8 rows for 32 columns
        assert sel._rotary_tables(rope.clone(), x_norm, 32, 1.0, True) is kept
        other = rope.clone()
        other[0, 0] += 1
        assert sel._rotary_tables(other, x_norm, 32, 1.0, True) is not kept
        assert sel._rotary_tables(rope, x_norm, 32, 1.0, False) is not kept  # training and tracers rebuild them
