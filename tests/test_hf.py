"""Hugging Face transformers ViTs: the same guarantees as timm, on tiny configs built in code (no downloads)."""

import copy
import functools
import json
import linecache
import pickle
import sys
import time

import pytest
import timm
import torch
import transformers as T
from safetensors.torch import load_file

import vitidle
from vitidle import hf
from vitidle.errors import CheckpointError, UnsupportedModelError, UsageError
from vitidle_cli.main import main

SIZE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)  # 16 image tokens; IdleViT plan at 0.7: layer 0 dense, layers 1-3 keep 11, 7, 5
MODELS = {  # name -> (config class, model class, prefix tokens)
    "vit": (T.ViTConfig, T.ViTForImageClassification, 1),
    "deit": (T.DeiTConfig, T.DeiTForImageClassificationWithTeacher, 2),  # class + distillation token
    "dinov2": (T.Dinov2Config, T.Dinov2Model, 1),  # layer scale
    "dinov2_reg": (T.Dinov2WithRegistersConfig, T.Dinov2WithRegistersModel, 5),  # class + 4 registers
    "clip": (T.CLIPVisionConfig, T.CLIPVisionModel, 1),  # a norm before the layers; layers named self_attn
}
CASES = [(name, impl) for name in MODELS for impl in ("sdpa", "eager")]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (these tiny models run several times faster without a thread pool on a busy machine),
    reset after; the value is what `vitidle bench` takes for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def dense_model(name: str = "vit", impl: str = "sdpa", **overrides) -> torch.nn.Module:
    config_cls, model_cls, _ = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SIZE, **overrides}, attn_implementation=impl)).eval()


def first(output) -> torch.Tensor:
    """The model's main output: logits, else the last hidden state."""
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def layers_of(model):
    return [model.get_submodule(name) for name in model.vitidle_config["layout"]["blocks"]]


@pytest.mark.parametrize("name,impl", CASES)
def test_keep_one_equals_the_dense_model_and_keeps_it_an_hf_model(name, impl):
    dense = dense_model(name, impl)
    model = vitidle.convert(copy.deepcopy(dense), keep=1.0)
    assert type(model) is type(dense) and model.state_dict().keys() == dense.state_dict().keys()
    assert model.vitidle_config["layout"]["num_prefix"] == MODELS[name][2]
    assert [type(layer).__name__.startswith("Idle") for layer in layers_of(model)] == [False, True, True, True]
    x = images()
    with torch.no_grad():
        want, got = dense(x, output_hidden_states=True), model(x, output_hidden_states=True)
    assert type(got) is type(want)
    torch.testing.assert_close(first(got), first(want), rtol=0, atol=1e-5)  # kept tokens run in another order
    assert len(got.hidden_states) == len(want.hidden_states) == 5


@pytest.mark.parametrize("name,impl", CASES)
def test_idle_tokens_pass_bit_identical_and_the_kept_set_is_the_brute_force_top_k(name, impl):
    model = vitidle.convert(dense_model(name, impl), keep=0.5)
    num_prefix = MODELS[name][2]
    seen = {}
    for i, layer in enumerate(layers_of(model)):
        layer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
    with torch.no_grad():
        model(images())
    for i, layer in enumerate(layers_of(model)[1:], start=1):
        x, y = seen[i]
        B, N, C = x.shape
        # reference: every token's key, per head, then the class query's head-mean logit and a full sort
        attn = layer.get_submodule(layer.vitidle_layer.q_proj.rpartition(".")[0])
        norm = {"vit": "layernorm_before", "deit": "layernorm_before", "clip": "layer_norm1"}.get(name, "norm1")
        x_norm = layer.get_submodule(norm)(x)
        H = layer.selector.num_heads
        q = attn.q_proj(x_norm).view(B, N, H, -1)
        k = attn.k_proj(x_norm).view(B, N, H, -1)
        logits = torch.einsum("bhd,bnhd->bhn", q[:, 0], k).mean(1)  # B, N
        top = logits[:, num_prefix:].argsort(dim=1, descending=True)[:, : layer.selector.num_keep] + num_prefix
        for b in range(B):
            kept = set(layer.selector.kept_index[b].tolist())
            assert kept == set(range(num_prefix)) | set(top[b].tolist())
            idle = sorted(set(range(N)) - kept)
            assert torch.equal(y[b, idle], x[b, idle])  # bit-identical, not close
            assert not torch.equal(y[b, sorted(kept)], x[b, sorted(kept)])


def test_an_exported_model_gets_a_filled_mask_and_equals_eager():
    model = vitidle.convert(dense_model("deit", "eager"), keep=0.7)
    x = images(2)
    with torch.no_grad():
        want = first(model(x))
        masks = []
        hooks = [layer.register_forward_pre_hook(lambda m, args: masks.append(args[1]))
                 for layer in layers_of(model)]
        exported = torch.export.export(model, (x,), strict=False).module()  # passes a (B, 1, N, N) float mask
        assert [tuple(m.shape) for m in masks] == [(2, 1, 18, 18)] * 4
        torch.testing.assert_close(first(exported(images(2))), want, rtol=0, atol=1e-6)
        # what `vitidle export` exports (one tensor out) is traced without a mask to build and gather, as eager runs
        wrapped = hf.TensorOutput(model)
        masks.clear()
        exported = torch.export.export(wrapped, (x,), strict=False).module()
        assert masks == [None] * 4
        torch.testing.assert_close(exported(images(2)), want, rtol=0, atol=1e-6)
        for hook in hooks:
            hook.remove()
    mask = torch.zeros(2, 1, 18, 18)
    mask[..., 0] = -1e9  # a real mask: no token may attend to the class token
    layer = layers_of(model)[2]
    with torch.no_grad():
        h = torch.randn(2, 18, 32)
        out = layer(h, mask)
        dense_layer = copy.deepcopy(layer)
        dense_layer.__class__ = layer.vitidle_base
        kept = layer.selector.kept_index
        for b in range(2):  # the kept tokens saw the mask cut to their rows and columns
            rows = kept[b].tolist()
            ref = dense_layer(h[b : b + 1, rows], mask[b : b + 1][..., rows, :][..., rows])
            torch.testing.assert_close(out[b, rows], ref[0], rtol=0, atol=1e-5)


def test_an_image_classification_pipeline_runs_the_converted_model():
    import numpy as np
    from PIL import Image

    model = vitidle.convert(dense_model("vit"), keep=0.5)
    processor = T.ViTImageProcessor(size={"height": 32, "width": 32})
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    got = T.pipeline("image-classification", model=model, image_processor=processor, device="cpu")(picture)
    with torch.no_grad():
        probs = model(**processor(picture, return_tensors="pt")).logits.softmax(-1)[0]
    assert got[0]["label"] == model.config.id2label[int(probs.argmax())]
    assert got[0]["score"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert all(s.kept_index is not None for s in vitidle.idle_selectors(model))  # the idle layers ran


def test_attention_maps_are_refused_with_a_clear_error():
    model = vitidle.convert(dense_model("vit", "eager"), keep=0.7)
    with pytest.raises(UsageError, match="output_attentions=True is not supported"):
        model(images(1), output_attentions=True)


def test_pickle_and_deepcopy_keep_the_idle_layers():
    model = vitidle.convert(dense_model("vit"), keep=0.7)
    x = images()
    with torch.no_grad():
        want = first(model(x))
        for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(layers_of(copied)[1]) is type(layers_of(model)[1])
            assert torch.equal(first(copied(x)), want)


def merges(monkeypatch) -> list[bool]:
    """Whether each merge from now on writes into its input (`into_x`), in call order."""
    into, merge = [], hf.merge_tokens
    monkeypatch.setattr(hf, "merge_tokens", lambda x, rows, y, into_x=False: into.append(into_x) or
                        merge(x, rows, y, into_x))
    return into


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_the_models_own_loop_merges_in_place_and_every_other_caller_gets_a_copy(name, monkeypatch):
    model = vitidle.convert(dense_model(name), keep=0.5)
    x, layers = images(), layers_of(model)
    into = merges(monkeypatch)
    with torch.no_grad():
        fast = first(model(x))
        assert into == [False, True, True]  # the first idle layer copies the dense layer's output
        into.clear()
        out = model(x, output_hidden_states=True)  # transformers' hooks keep every layer's output: copies
        assert into == [False] * 3 and torch.equal(first(out), fast)
        for i, layer in enumerate(layers[1:], start=1):  # each hidden state is its own: kept tokens moved
            before, after = out.hidden_states[i], out.hidden_states[i + 1]
            moved = (before != after).any(-1)  # B, N
            assert moved.sum(1).tolist() == [MODELS[name][2] + layer.selector.num_keep] * len(x)
        into.clear()
        assert torch.equal(first(model(x)), fast) and into == [False, True, True]  # the hooks, left, are idle
        # a loop of the caller's own, which keeps every layer's input: nothing it holds is written
        into.clear()
        hidden = [out.hidden_states[0]]
        for layer in layers:
            hidden.append(layer(hidden[-1], None))
        assert into == [False] * 3
        assert all(torch.equal(a, b) for a, b in zip(hidden, out.hidden_states))
    into.clear()
    with torch.enable_grad():
        model(x)
    assert into == [False] * 3


class Loop(torch.nn.Module):
    """A module of the caller's own whose forward is a rebinding loop over the model's layer list."""

    def __init__(self, layers: torch.nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class Keep(torch.nn.Module):
    """Hands its input on, and keeps it (and a copy)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.held, self.copy = h, h.clone()
        return h


def test_a_rebinding_loop_writes_in_place_only_what_the_layer_before_it_in_that_list_just_made(monkeypatch):
    model = vitidle.convert(dense_model("vit"), keep=0.5)
    layers = model.vit.layers
    h = torch.randn(3, 17, 32)
    into = merges(monkeypatch)
    with torch.no_grad():
        want = Loop(layers)(h)
        assert into == [False, True, True]
        into.clear()  # another order: in place wherever the list's previous layer made the input
        shuffled = torch.nn.ModuleList([layers[0], layers[2], layers[1], layers[3]])
        got = Loop(shuffled)(h)
        assert into == [False, True, True]
        monkeypatch.setattr(hf, "_owns_input", lambda *args: False)
        assert torch.equal(got, Loop(shuffled)(h))
        monkeypatch.undo()
        into = merges(monkeypatch)
        keep = Keep()  # between two idle layers, at another index than theirs: holds what layer 1 made
        Loop(torch.nn.ModuleList([layers[0], layers[1], keep, layers[2], layers[3]]))(h)
        assert into == [False, False, True] and torch.equal(keep.held, keep.copy)
        into.clear()  # a layer twice in the list: which of its places the loop calls it from is unknown
        Loop(torch.nn.ModuleList([layers[0], layers[1], layers[2], layers[3], keep, layers[3]]))(h)
        assert into == [False, True, False, False] and torch.equal(keep.held, keep.copy)
        into.clear()
        kept = layers[1](layers[0](h))  # a patched forward that hands on a tensor the caller holds
        held = kept.clone()
        layers[1].forward = lambda h, *args, **kwargs: kept
        Loop(layers)(h)
        assert into == [False, False, True] and torch.equal(kept, held)  # (layer 3 writes what layer 2 made)


def test_a_mode_or_a_wrapped_forward_that_may_keep_a_layers_input_turns_the_in_place_merge_off(monkeypatch):
    from test_idle import Recorder  # keeps every op's output, as an activation recorder does

    model = vitidle.convert(dense_model("vit"), keep=0.5)
    into, x = merges(monkeypatch), images()
    with torch.no_grad():
        with Recorder() as recorder:
            recorder.kept = []
            model(x)
        assert into == [False] * 3 and all(torch.equal(a, b) for a, b in recorder.kept)
        into.clear()
        cls = type(model.vit.layers[1])
        forward, seen = cls.forward, []

        @functools.wraps(forward)
        def recording(self, h, *args, **kwargs):
            seen.append((h, h.clone()))
            return forward(self, h, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", recording)
        hf._call_wrappers.cache_clear()
        model(x)
        hf._call_wrappers.cache_clear()
        assert into == [False] * 3 and all(torch.equal(a, b) for a, b in seen)
        monkeypatch.undo()
        into, seen = merges(monkeypatch), []
        norm = model.vit.layers[2].layernorm_before  # a probe on the norm's instance: it sees the input
        norm.forward = lambda h, forward=norm.forward: (seen.append((h, h.clone())), forward(h))[1]
        model(x)
        assert into == [False, False, True] and all(torch.equal(a, b) for a, b in seen)
        del norm.forward
        into.clear()
        sys.setprofile(lambda *args: None)  # a profile or trace function sees every return value
        try:
            model(x)
        finally:
            sys.setprofile(None)
        assert into == [False] * 3
        into.clear()  # what keeps nothing leaves it on: torch.device's mode, a layer's own bound forward
        layers_of(model)[1].forward = layers_of(model)[1].forward  # (as accelerate leaves it after its hooks)
        with torch.device("cpu"):
            model(x)
        assert into == [False, True, True]


@pytest.mark.parametrize("ran,reads", [
    ("h = layer(h); seen.append(h)", "h = layer(h)                 "),
    ("h = layer(h, keep(h))", "h = layer(h, mask_xy)"),  # the same span, other names
])
def test_a_source_edited_since_import_is_not_trusted(ran, reads, tmp_path):
    path = tmp_path / "edited.py"
    source = "class Owner:\n    def forward(self, h, seen, keep, mask_xy):\n        for layer in self.layers:\n            {}\n"
    path.write_text(source.format(ran))
    namespace = {}
    exec(compile(source.format(ran), str(path), "exec"), namespace)
    path.write_text(source.format(reads))  # now reads as a rebinding loop
    linecache.checkcache(str(path))
    assert hf._find_rebinding_calls(namespace["Owner"].forward.__code__) == {}
    exec(compile(source.format(reads), str(path), "exec"), namespace)  # as it reads, it is one
    assert list(hf._find_rebinding_calls(namespace["Owner"].forward.__code__).values()) == ["layers"]


REBINDING = "for layer in self.layers:\n    h = layer(h, mask)"


@pytest.mark.parametrize("body,found", [
    (REBINDING, True),
    ("for layer in self.layers:\n    h = layer(\n        h,\n        mask=mask,\n    )", True),
    (REBINDING + "\n    seen.append(h)", False),  # a second statement may keep the input
    ("for layer in self.layers:\n    out = layer(h, mask)", False),  # h still holds the input
    ("for layer in self.layers:\n    h = layer(h, h.shape)", False),  # another argument reads it
    ("for layer in self.layers:\n    h = layer(h, kept(h))", False),
    ("for layer in self.layers:\n    h = layer(h, (self := other))", False),  # the loop's list may not be self's
    ("for layer in layers:\n    h = layer(h, mask)", False),  # not a list of self's
    ("for layer in self.layers:\n    h = other(h, mask)", False),
    (REBINDING + "\nelse:\n    seen.append(h)", False),
    ("def inner(h):\n    " + REBINDING.replace("\n", "\n    ") + "\n    return h", False),  # another function's
])
def test_a_call_counts_as_rebinding_only_if_its_loop_passes_each_output_straight_on(body, found, tmp_path):
    source = ("class Owner:\n    def forward(self, h, mask, layers, seen, other, kept):\n        \"\"\"Doc\nstring.\"\"\"\n"
              + "".join(f"        {line}\n" for line in body.splitlines()) + "        return h\n")
    path = tmp_path / "owner.py"
    path.write_text(source)
    namespace = {}
    exec(compile(source, str(path), "exec"), namespace)
    calls = hf._find_rebinding_calls(namespace["Owner"].forward.__code__)
    assert list(calls.values()) == (["layers"] if found else [])


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_save_load_and_the_dense_class_reads_the_weights(tmp_path, name):
    dense = dense_model(name)
    model = vitidle.convert(copy.deepcopy(dense), keep=0.7)
    layers_of(model)[3].selector.num_keep = 3  # the knob, saved as it is
    vitidle.save(model, tmp_path / "m")
    loaded = vitidle.load(tmp_path / "m")
    assert type(loaded) is type(model) and [layer.selector.num_keep for layer in layers_of(loaded)[1:]] == [11, 7, 3]
    x = images()
    with torch.no_grad():
        assert torch.equal(first(loaded(x)), first(model(x)))
        assert torch.equal(first(vitidle.load(tmp_path / "m", dense=True)(x)), first(dense(x)))
        # the weights file has the HF keys: the dense class loads it strictly
        plain = type(dense)(dense.config).eval()
        plain.load_state_dict(load_file(tmp_path / "m" / "model.safetensors"), strict=True)
        assert torch.equal(first(plain(x)), first(dense(x)))
        # the model folder has HF's config.json: the dense class's from_pretrained reads it as it is
        assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [type(dense).__name__]
        direct = type(dense).from_pretrained(tmp_path / "m").eval()
        assert torch.equal(first(direct(x)), first(dense(x)))
        # save_pretrained of a converted model is a folder the dense class loads
        model.save_pretrained(tmp_path / "pretrained")
        again = type(dense).from_pretrained(tmp_path / "pretrained").eval()
        assert not any(isinstance(m, vitidle.TokenSelector) for m in again.modules())
        assert torch.equal(first(again(x)), first(dense(x)))


def test_a_timm_model_saved_over_an_hf_model_takes_its_hf_config_away(tmp_path):
    folder = tmp_path / "m"
    vitidle.save(vitidle.convert(dense_model("vit"), keep=0.7), folder)
    (folder / "notes.txt").write_text("mine")
    timm_model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    vitidle.save(vitidle.convert(timm_model, keep=0.7), folder, force=True)
    # the old config.json would make the dense HF class read the timm weights as an HF ViT
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "notes.txt", "vitidle.json"]
    assert type(vitidle.load(folder)) is type(timm_model)
    vitidle.save(vitidle.convert(dense_model("vit"), keep=0.7), folder, force=True)  # and back: written again
    assert (folder / "config.json").is_file() and isinstance(vitidle.load(folder), type(dense_model("vit")))


def twin(name: str):
    """A timm ViT and the HF model holding the same weights (keys mapped here)."""
    torch.manual_seed(0)
    size = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4)
    if name == "dinov2":  # layer scale, no head: timm's pooled class token is HF's pooler_output
        tm = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **size).eval()
        with torch.no_grad():
            for block in tm.blocks:  # away from timm's 1e-5 init, so that every layer moves the tokens
                block.ls1.gamma.uniform_(0.5, 1.5)
                block.ls2.gamma.uniform_(0.5, 1.5)
        hm = dense_model(name, "sdpa", layer_norm_eps=1e-6)
        p, layers, norms = "", "encoder.layer", ("norm1", "norm2")
    elif name == "clip":  # a norm before the layers, no patch bias; the pooler norms the class token
        tm = timm.create_model("vit_base_patch32_clip_224", num_classes=0, mlp_ratio=2, **size).eval()
        hm = dense_model(name, "sdpa", hidden_act="gelu")
        return tm, clip_state(tm, hm)
    else:
        distilled = name == "deit"
        arch = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
        tm = timm.create_model(arch, mlp_ratio=2, num_classes=10, **size).eval()
        hm = dense_model(name, "eager" if distilled else "sdpa", layer_norm_eps=1e-6, num_labels=10)
        p = "deit." if distilled else "vit."
        layers, norms = f"{p}layers", ("layernorm_before", "layernorm_after")
    head = "cls_classifier" if name == "deit" else "classifier"
    state = {k: v for k, v in hm.state_dict().items() if k.endswith("mask_token")}  # HF only (masked pretraining)
    renames = {"norm1": norms[0], "norm2": norms[1], "attn.proj": "attention.o_proj",
               "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    for k, v in tm.state_dict().items():
        if k.startswith("blocks."):
            state.update(block_state(k, v, layers, "attention", renames))
            continue
        state[{"cls_token": f"{p}embeddings.cls_token", "dist_token": f"{p}embeddings.distillation_token",
               "pos_embed": f"{p}embeddings.position_embeddings",
               "patch_embed.proj.weight": f"{p}embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": f"{p}embeddings.patch_embeddings.projection.bias",
               "norm.weight": f"{p}layernorm.weight", "norm.bias": f"{p}layernorm.bias",
               "head.weight": f"{head}.weight", "head.bias": f"{head}.bias",
               "head_dist.weight": "distillation_classifier.weight",
               "head_dist.bias": "distillation_classifier.bias"}[k]] = v
    hm.load_state_dict(state, strict=True)
    return tm, hm


def block_state(key: str, value: torch.Tensor, layers: str, attention: str, renames: dict) -> dict:
    """A timm block's tensor under HF keys: the fused qkv split into q/k/v_proj, other names renamed."""
    _, i, rest = key.split(".", 2)
    layer = f"{layers}.{i}."
    if rest.startswith("attn.qkv."):
        param = rest.rpartition(".")[2]
        return {f"{layer}{attention}.{proj}_proj.{param}": part for proj, part in zip("qkv", value.chunk(3))}
    for old, new in renames.items():
        rest = rest.replace(old, new)
    return {layer + rest: value}


def clip_state(tm, hm):
    """`hm` (a `CLIPVisionModel`) holding the timm CLIP ViT's weights, keys mapped."""
    state, norms = {}, {"norm_pre": "pre_layrnorm", "norm": "post_layernorm"}
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj"}
    for k, v in tm.state_dict().items():
        if k.startswith("blocks."):
            state.update(block_state(k, v, "encoder.layers", "self_attn", renames))
            continue
        name, _, param = k.rpartition(".")
        key, value = {"cls_token": ("embeddings.class_embedding", v.flatten()),
                      "pos_embed": ("embeddings.position_embedding.weight", v[0]),
                      "patch_embed.proj.weight": ("embeddings.patch_embedding.weight", v)}.get(k, (None, v))
        state[key or f"{norms[name]}.{param}"] = value
    hm.load_state_dict(state, strict=True)
    return hm


def pooled(output) -> torch.Tensor:
    """What a timm model returns: logits, else the pooled class token."""
    return output.logits if getattr(output, "logits", None) is not None else output.pooler_output


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "clip"])
def test_a_timm_vit_and_its_hf_twin_keep_the_same_tokens_and_logits(name):
    tm, hm = twin(name)
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(pooled(hm(x)), tm(x), rtol=0, atol=1e-5)  # the twins are twins
        dense_out = tm(x)
        tm, hm = vitidle.convert(tm, keep=0.7), vitidle.convert(hm, keep=0.7)
        got, want = pooled(hm(x)), tm(x)
    for block, layer in zip(tm.blocks[1:], layers_of(hm)[1:]):
        assert block.selector.num_keep == layer.selector.num_keep
        assert torch.equal(block.selector.kept_index.sort(1).values, layer.selector.kept_index.sort(1).values)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(want, dense_out, atol=1e-3)  # idling changed the output: the twins agree on it


@pytest.mark.parametrize("model", [
    T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
    T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
], ids=["bert", "resnet"])
def test_text_models_and_cnns_are_refused(model, tmp_path, capsys):
    with pytest.raises(UnsupportedModelError, match="no attention blocks found"):
        vitidle.convert(model)
    model.save_pretrained(tmp_path / "src")
    capsys.readouterr()
    code, err = cli(capsys, "convert", "--model", f"hf:{tmp_path / 'src'}", "-o", tmp_path / "out")
    assert code == 2 and "no attention blocks found" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_relative_position_bias_is_refused():
    config = T.BeitConfig(**SIZE, use_relative_position_bias=True)
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
        vitidle.convert(T.BeitForImageClassification(config))


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return info.value.code or 0, capsys.readouterr().err


def test_cli_converts_a_save_pretrained_folder(tmp_path, capsys, monkeypatch):
    dense = dense_model("deit")
    dense.save_pretrained(tmp_path / "deit-tiny")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "convert", "--model", "hf:./deit-tiny", "--keep", "0.5", "--model-arg",
                    "attn_implementation=eager")
    assert code == 0, err
    loaded = vitidle.load(tmp_path / "deit-tiny-idle")  # the default folder: <folder name>-idle
    assert loaded.config._attn_implementation == "eager"
    assert [layer.selector.num_keep for layer in layers_of(loaded)[1:]] == [8, 4, 2]
    x = images()
    with torch.no_grad():
        # eager here, sdpa in `dense`: the same computation up to rounding
        torch.testing.assert_close(first(loaded(x)), first(vitidle.convert(dense, keep=0.5)(x)), rtol=0, atol=1e-6)
    code, err = cli(capsys, "convert", "--model", "hf:./deit-tiny", "--model-arg", "trust_remote_code=true",
                    "-o", "x")
    assert code == 2 and "trust_remote_code cannot be given" in err and len(err.splitlines()) == 1


def test_an_image_text_model_folder_converts_its_vision_model(tmp_path, capsys):
    config = T.CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64), vision_config=SIZE, projection_dim=16)
    torch.manual_seed(0)
    clip = T.CLIPModel(config).eval()
    with pytest.raises(UnsupportedModelError, match="takes input_ids.*vision model alone"):
        vitidle.convert(clip)
    clip.save_pretrained(tmp_path / "clip")
    code, err = cli(capsys, "convert", "--model", f"hf:{tmp_path / 'clip'}", "--keep", "1.0", "-o", tmp_path / "out")
    assert code == 0, err
    vision = vitidle.load(tmp_path / "out")
    assert type(vision).__name__ == "CLIPVisionModel"
    x = images()
    with torch.no_grad():  # keep 1.0: CLIP's own vision tower, with the weights of the checkpoint
        torch.testing.assert_close(vision(pixel_values=x).pooler_output, clip.vision_model(pixel_values=x).pooler_output)


def test_a_hub_id_offline_fails_in_seconds_on_one_line(tmp_path, capsys, offline):
    start = time.monotonic()
    code, err = cli(capsys, "convert", "--model", "hf:google/vit-base-patch16-224", "-o", tmp_path / "out")
    assert time.monotonic() - start < 10
    assert code == 1 and len(err.splitlines()) == 1 and "hub is unreachable" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="no such model folder"):
        hf.create("hf:./no-such-folder")


def test_only_the_built_in_attention_kernels_are_accepted(tmp_path, capsys):
    dense = dense_model("vit")
    dense.save_pretrained(tmp_path / "vit")
    code, err = cli(capsys, "convert", "--model", f"hf:{tmp_path / 'vit'}", "--model-arg",
                    "attn_implementation=kernels-community/flash-attn", "-o", tmp_path / "x")
    assert code == 2 and "is not supported: use one of sdpa, eager" in err and not (tmp_path / "x").exists()
    vitidle.save(vitidle.convert(dense, keep=0.5), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "vitidle.json").read_text())
    config["hf"]["attn_implementation"] = "kernels-community/flash-attn"  # transformers would fetch and load it
    (tmp_path / "m" / "vitidle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is not supported"):
        vitidle.load(tmp_path / "m")


def test_eval_reads_an_hf_model_folder(tmp_path, capsys, folder):
    model = vitidle.convert(dense_model("vit", num_labels=2), keep=0.5)
    vitidle.save(model, tmp_path / "m")
    results = {}
    for extra in ([], ["--dense"]):
        with pytest.raises(SystemExit) as info:
            main(["eval", str(tmp_path / "m"), "--data", str(folder), "--json", "--workers", "0", *extra])
        out, err = capsys.readouterr()
        assert (info.value.code or 0) == 0, err
        results[bool(extra)] = json.loads(out)
    assert results[False]["images"] == results[True]["images"] == 16
    assert results[True]["gmacs"] > results[False]["gmacs"]


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_an_idle_layer_norms_once_and_equals_norming_again(name, monkeypatch):
    model = vitidle.convert(dense_model(name), keep=0.5)
    x = images()
    calls = []
    layer_norm = torch.nn.functional.layer_norm
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda t, *a, **k: calls.append(t.shape[1]) or
                        layer_norm(t, *a, **k))
    with torch.no_grad():
        once = first(model(x))
        norms_once = len(calls)
        for layer in layers_of(model)[1:]:  # the dense norm class: the idle layer norms its kept tokens again
            norm = layer.get_submodule(layer.vitidle_layer.norm)
            assert isinstance(norm, hf.ReusedNorm) and norm.vitidle_given is None  # nothing held after a forward
            norm.__class__ = norm.vitidle_base
        calls.clear()
        again = first(model(x))
    assert len(calls) == norms_once + 3  # one more norm in each of the 3 idle layers
    assert torch.equal(once, again)


def test_gmacs_of_an_hf_model_equal_the_closed_form():
    from test_flops import vit_macs  # the timm tests' closed form: the same blocks, scoring included

    from vitidle.bench import limit_model
    from vitidle.flops import count_macs

    dense = dense_model("vit", intermediate_size=128, num_labels=10)  # MLP ratio 4, as the closed form has it
    assert count_macs(dense) == vit_macs([17] * 4, 32, 16, 8, 10)
    tokens = [17, 1 + 11, 1 + 7, 1 + 5]  # layer 0 dense, then the class token + 11, 7, 5 image tokens
    outputs = []
    for frozen in (False, True):
        model = vitidle.freeze(vitidle.convert(copy.deepcopy(dense), keep=0.7), frozen)
        assert count_macs(model) == vit_macs(tokens, 32, 16, 8, 10, idle_tokens=17, frozen=frozen)
        with torch.no_grad():
            outputs.append((first(model(images())), [s.kept_index for s in vitidle.idle_selectors(model)]))
        # bench's limit: the same layers at the same counts, with no scoring
        assert count_macs(limit_model(dense, model)) == vit_macs(tokens, 32, 16, 8, 10)
    (thawed, thawed_kept), (frozen, frozen_kept) = outputs  # freeze scores with W_qᵀ W_k: the same tokens, outputs
    assert all(torch.equal(a.sort(1).values, b.sort(1).values) for a, b in zip(thawed_kept, frozen_kept))
    torch.testing.assert_close(frozen, thawed, rtol=0, atol=1e-6)


def test_the_limit_runs_each_layer_on_its_count_with_masks_cut_alike():
    from vitidle.bench import limit_model

    dense = dense_model("deit", "eager")
    idle = vitidle.convert(copy.deepcopy(dense), plan="1-2:0.5")  # layer 3 dense again: the limit pads back to N
    limit = limit_model(dense, idle)
    assert not any(isinstance(m, hf.Swapped) for m in dense.modules())  # a copy was changed, not the dense model
    limit_layers = [limit.get_submodule(name) for name in idle.vitidle_config["layout"]["blocks"]]
    seen = []
    for layer in limit_layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        assert first(limit(images())).shape == first(dense(images())).shape
    assert seen == [18, 18, 10, 10]  # inputs: layer 1 cuts to 2 + 8 tokens, layer 3 pads to 18
    layer = limit_layers[1]
    h, mask = torch.randn(2, 18, 32), torch.zeros(2, 1, 18, 18)
    mask[..., 3] = -1e9  # no token may attend to token 3: the limit keeps it, and its mask with it
    dense_layer = copy.deepcopy(layer)
    dense_layer.__class__ = layer.vitidle_base
    with torch.no_grad():
        torch.testing.assert_close(layer(h, mask), dense_layer(h[:, :10], mask[..., :10, :10]), rtol=0, atol=0)


def saved_folder(tmp_path, name: str = "deit", **overrides):
    vitidle.save(vitidle.convert(dense_model(name, **overrides), keep=0.5), tmp_path / name)
    return tmp_path / name


def test_cli_exports_an_hf_folder_behind_the_parity_gate(tmp_path, capsys, one_thread):
    from vitidle.errors import ParityError
    from vitidle.export import check_onnx

    folder = saved_folder(tmp_path)  # two prefix tokens
    with pytest.raises(SystemExit) as info:
        main(["export", "--onnx", str(folder), "--legacy", "--json"])  # torch.export (dynamo): see above
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, err
    report = json.loads(out)
    assert report["outputs"] == ["logits"] and report["max_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    model = vitidle.load(folder)
    with torch.no_grad():
        model.deit.layers[3].mlp.fc2.weight.mul_(2.0)  # PyTorch no longer computes what the file holds
    with pytest.raises(ParityError, match="parity failed"):
        check_onnx(model, folder / "model.onnx")
    # a model without logits exports its pooled features
    folder = saved_folder(tmp_path, "dinov2")
    code, err = cli(capsys, "export", "--onnx", folder, "--legacy", "--dense")
    assert code == 0 and (folder / "dense.onnx").is_file(), err
    import onnx

    assert [o.name for o in onnx.load(str(folder / "dense.onnx")).graph.output] == ["features"]


def test_cli_benches_an_hf_folder_and_an_hf_name(tmp_path, capsys, one_thread):
    folder = saved_folder(tmp_path, "vit")
    with pytest.raises(SystemExit) as info:
        main(["bench", str(folder), "--repeats", "1", "--warmup", "0", "-b", "2", "--legacy", "--json", *one_thread])
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, err
    report = json.loads(out)
    assert [(r["runtime"], r["batch_size"]) for r in report["results"]] == [("pytorch", 2), ("onnxruntime", 2)]
    assert report["plan"]["num_keep"] == [None, 8, 4, 2] and report["frozen"]
    # --model hf:FOLDER converts on the fly (the vitidle folder is a save_pretrained folder too: config.json)
    with pytest.raises(SystemExit) as info:
        main(["bench", "--model", f"hf:{folder}", "--keep", "0.7", "--repeats", "1", "--warmup", "0", "-b", "1",
              "--no-onnx", "--json", *one_thread])
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, err
    assert json.loads(out)["plan"]["num_keep"] == [None, 11, 7, 5]
