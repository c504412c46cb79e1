"""Names to models: aliases, creation, weights files (safe loading, clear errors), offline behaviour."""

import random
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from vitidle import models
from vitidle.errors import CheckpointError, UnknownModelError, WeightsUnavailableError
from vitidle.models import create, hub_reachable, load_weights, resolve_name

SMALL = dict(depth=2, img_size=64)


@pytest.fixture
def small():
    return create("deit_tiny", pretrained=False, **SMALL)


def randomized(model):
    """A model of the same kind whose weights differ from `model`'s."""
    other = create("deit_tiny", pretrained=False, **SMALL)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    return other


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_one_line(error):
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message


# names


@pytest.mark.parametrize("alias, full", [
    ("deit_tiny", "deit_tiny_patch16_224"),
    ("deit_small", "deit_small_patch16_224"),
    ("deit_small_distilled", "deit_small_distilled_patch16_224"),
    ("deit3_small", "deit3_small_patch16_224"),
    ("vit_base", "vit_base_patch16_224"),
])
def test_aliases(alias, full):
    assert resolve_name(alias) == full


def test_every_alias_names_a_timm_model():
    import timm

    for alias, full in models.ALIASES.items():
        assert timm.is_model(full), alias


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_patch16_224.fb_in1k",
                                  "vit_small_patch14_reg4_dinov2.lvd142m"])
def test_timm_names_and_tags_pass_through(name):
    assert resolve_name(name) == name


def test_alias_with_a_tag():
    assert resolve_name("deit_small.fb_in1k") == "deit_small_patch16_224.fb_in1k"


@pytest.mark.parametrize("name, suggestion", [("deit_smal", "deit_small"), ("deit_small_patch16_244", "deit_small_patch16_224")])
def test_unknown_name_lists_close_matches(name, suggestion):
    with pytest.raises(UnknownModelError) as info:
        resolve_name(name)
    message = str(info.value)
    assert repr(name) in message and "close matches" in message and suggestion in message
    assert_one_line(info.value)


def test_unknown_name_without_close_match_says_how_to_list():
    with pytest.raises(UnknownModelError, match="list_models"):
        resolve_name("zzzzqqqq")


# creation


def test_create_random_init_with_kwargs(small):
    assert type(small).__name__ == "VisionTransformer"
    assert len(small.blocks) == 2
    assert tuple(small.patch_embed.img_size) == (64, 64)
    assert small.pretrained_cfg["architecture"] == "deit_tiny_patch16_224"


def test_create_with_weights_file(small, tmp_path):
    source = randomized(small)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    model = create("deit_tiny", weights=path, **SMALL)
    assert_same_weights(model, source)


# weights files


def test_load_weights_safetensors(small, tmp_path):
    source = randomized(small)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    assert load_weights(small, tmp_path / "w.safetensors") is small
    assert_same_weights(small, source)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
def test_load_weights_torch_save(small, tmp_path, suffix):
    source = randomized(small)
    torch.save(source.state_dict(), tmp_path / f"w{suffix}")
    load_weights(small, tmp_path / f"w{suffix}")
    assert_same_weights(small, source)


@pytest.mark.parametrize("key", ["model", "state_dict", "model_ema"])
def test_load_weights_deit_style_wrapper(small, tmp_path, key):
    source = randomized(small)
    torch.save({key: source.state_dict(), "epoch": 299}, tmp_path / "w.pth")
    load_weights(small, str(tmp_path / "w.pth"))
    assert_same_weights(small, source)


def test_missing_file(small, tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        load_weights(small, tmp_path / "nope.pth")
    assert_one_line(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_file(small, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(random.Random(0).randbytes(4096))
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(small, path)
    assert str(path) in str(info.value)
    assert_one_line(info.value)
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing half-loaded


def test_truncated_safetensors(small, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(small.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_weights(small, path)
    assert_one_line(info.value)


def test_missing_keys(small, tmp_path):
    state = small.state_dict()
    del state["head.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="missing keys.*head.weight") as info:
        load_weights(small, tmp_path / "w.pth")
    assert_one_line(info.value)


def test_unexpected_keys(small, tmp_path):
    state = small.state_dict()
    state["extra.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra.weight") as info:
        load_weights(small, tmp_path / "w.safetensors")
    assert_one_line(info.value)


def test_wrong_shapes(small, tmp_path):
    bigger = create("deit_tiny", pretrained=False, depth=2, img_size=96)  # other pos_embed shape
    save_file(bigger.state_dict(), tmp_path / "w.safetensors")
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatches.*pos_embed") as info:
        load_weights(small, tmp_path / "w.safetensors")
    assert_one_line(info.value)
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_not_a_state_dict(small, tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="state dict"):
        load_weights(small, tmp_path / "w.pth")


class Payload:
    """Unpickling this would run code: weights_only must refuse it."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return {}


class Plain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("obj", [lambda s: Plain(), lambda s: {"model": s, "args": Plain()}, lambda s: Payload()],
                         ids=["object", "wrapped-object", "reduce-payload"])
def test_pickled_objects_are_refused(small, tmp_path, obj):
    Payload.ran = False
    torch.save(obj(small.state_dict()), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="weights_only=True and will not run them") as info:
        load_weights(small, tmp_path / "w.pth")
    assert_one_line(info.value)
    assert not Payload.ran


# offline


def test_pretrained_offline_fails_fast(offline):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create("deit_tiny", **SMALL)  # pretrained is the default; the fixture makes the hub unreachable
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "--weights" in message and "--no-pretrained" in message
    assert_one_line(info.value)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_hub_unreachable_when_offline(monkeypatch, value):
    def no_network(*args, **kwargs):
        raise AssertionError("hub_reachable opened a connection although HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert hub_reachable() is False


def test_hub_unreachable_when_the_connection_fails(monkeypatch):
    seen = {}

    def refused(address, timeout=None):
        seen["address"], seen["timeout"] = address, timeout
        raise ConnectionRefusedError("refused")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(socket, "create_connection", refused)
    assert hub_reachable(timeout=0.5) is False
    assert seen == {"address": ("hub.example.org", 443), "timeout": 0.5}
