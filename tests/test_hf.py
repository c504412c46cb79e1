"""Hugging Face transformers ViTs: the same guarantees as timm, on tiny configs built in code (no downloads)."""

import copy
import json
import pickle
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


def dense_model(name: str = "vit", impl: str = "sdpa", **overrides) -> torch.nn.Module:
    config_cls, model_cls, _ = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**SIZE, attn_implementation=impl, **overrides)).eval()


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
        exported = torch.export.export(model, (x,), strict=False).module()  # passes a (B, 1, N, N) float mask
        torch.testing.assert_close(first(exported(images(2))), want, rtol=0, atol=1e-6)
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
        # save_pretrained of a converted model is a folder the dense class loads
        model.save_pretrained(tmp_path / "pretrained")
        again = type(dense).from_pretrained(tmp_path / "pretrained").eval()
        assert not any(isinstance(m, vitidle.TokenSelector) for m in again.modules())
        assert torch.equal(first(again(x)), first(dense(x)))


def twin(name: str):
    """A timm ViT and the HF model holding the same weights (keys mapped here)."""
    distilled = name == "deit"
    arch = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    torch.manual_seed(0)
    tm = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4,
                           mlp_ratio=2, num_classes=10).eval()
    hm = dense_model(name, "eager" if distilled else "sdpa", layer_norm_eps=1e-6, num_labels=10)
    p = "deit." if distilled else "vit."
    state = {}
    for k, v in tm.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            layer = f"{p}layers.{i}."
            if rest.startswith("attn.qkv."):
                for proj, part in zip("qkv", v.chunk(3)):
                    state[f"{layer}attention.{proj}_proj.{rest.rpartition('.')[2]}"] = part
                continue
            rest = (rest.replace("norm1", "layernorm_before").replace("norm2", "layernorm_after")
                    .replace("attn.proj", "attention.o_proj"))
            state[layer + rest] = v
            continue
        state[{"cls_token": f"{p}embeddings.cls_token", "dist_token": f"{p}embeddings.distillation_token",
               "pos_embed": f"{p}embeddings.position_embeddings",
               "patch_embed.proj.weight": f"{p}embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": f"{p}embeddings.patch_embeddings.projection.bias",
               "norm.weight": f"{p}layernorm.weight", "norm.bias": f"{p}layernorm.bias",
               "head.weight": "cls_classifier.weight" if distilled else "classifier.weight",
               "head.bias": "cls_classifier.bias" if distilled else "classifier.bias",
               "head_dist.weight": "distillation_classifier.weight",
               "head_dist.bias": "distillation_classifier.bias"}[k]] = v
    hm.load_state_dict(state, strict=True)
    return tm, hm


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_a_timm_vit_and_its_hf_twin_keep_the_same_tokens_and_logits(name):
    tm, hm = twin(name)
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(hm(x).logits, tm(x), rtol=0, atol=1e-5)  # the twins are twins
        tm, hm = vitidle.convert(tm, keep=0.7), vitidle.convert(hm, keep=0.7)
        got, want = hm(x).logits, tm(x)
    for block, layer in zip(tm.blocks[1:], layers_of(hm)[1:]):
        assert block.selector.num_keep == layer.selector.num_keep
        assert torch.equal(block.selector.kept_index.sort(1).values, layer.selector.kept_index.sort(1).values)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


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
