"""The model folder: save/load round trip, plain timm weights, atomic writes, clear errors."""

import json
import os
import pathlib
import shutil

import pytest
import timm
import torch
from conftest import TINY, images, tiny
from safetensors.torch import load_file

import vitidle
import vitidle.io
from vitidle.errors import CheckpointError, ConversionError, UsageError

NAME = "deit_small_patch16_224"
KWARGS = TINY[NAME]


def converted(keep=0.5):
    return vitidle.convert(NAME, keep=keep, pretrained=False, model_kwargs=KWARGS).eval()


def leftovers(parent: pathlib.Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, folder) of one converted model saved once for the read-only tests."""
    model = converted()
    folder = tmp_path_factory.mktemp("io") / "model-idle"
    assert vitidle.save(model, folder) == folder
    return model, folder


def test_round_trip_gives_the_same_outputs(saved):
    model, folder = saved
    loaded = vitidle.load(folder)
    assert not loaded.training
    assert [b.selector.num_keep for b in loaded.blocks[1:]] == [b.selector.num_keep for b in model.blocks[1:]]
    x = images(model, batch=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_folder_holds_plain_timm_weights(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "vitidle.json"]
    state = load_file(folder / "model.safetensors")
    dense = tiny(NAME)
    assert set(state) == set(dense.state_dict())
    dense.load_state_dict(state, strict=True)
    x = images(dense)
    with torch.no_grad():
        # the same weights: with every image token kept, the converted model is the dense one
        for block in model.blocks[1:]:
            block.selector.num_keep = 16
        try:
            torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
        finally:
            for block, k in zip(model.blocks[1:], model.vitidle_config["plan"]["num_keep"][1:]):
                block.selector.num_keep = k
        keep_all = vitidle.convert(tiny(NAME), keep=1.0)
        keep_all.load_state_dict(state, strict=True)
        torch.testing.assert_close(keep_all(x), dense(x), atol=1e-5, rtol=1e-5)


def test_config_fields(saved):
    model, folder = saved
    config = json.loads((folder / "vitidle.json").read_text())
    assert config["base_model"] == NAME
    assert config["vitidle_version"] == vitidle.__version__
    assert config["plan"]["keep"] == [None, 0.5, 0.25, 0.125]
    assert config["plan"]["num_keep"] == [None, 8, 4, 2]
    assert config["input"]["input_size"] == [3, 64, 64]
    assert config["model_kwargs"] == KWARGS


def test_save_refuses_an_existing_folder(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        vitidle.save(model, folder)
    assert tree(folder) == {"keep.txt": b"mine"}
    assert leftovers(tmp_path, "out") == []


def test_force_replaces_the_model_files_and_keeps_every_other_file(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "proj"  # a run folder: a model beside the user's notes and checkpoints
    (folder / "runs").mkdir(parents=True)
    (folder / "vitidle.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "runs" / "epoch1.ckpt").write_bytes(b"weights")
    vitidle.save(model, folder, force=True)
    assert tree(folder)["notes.txt"] == b"mine" and tree(folder)["runs/epoch1.ckpt"] == b"weights"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "notes.txt", "runs", "vitidle.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]
    assert vitidle.load(folder).vitidle_config["plan"] == model.vitidle_config["plan"]
    vitidle.save(vitidle.convert(tiny(NAME), keep=0.7), folder, force=True)  # and once more over a model
    assert vitidle.load(folder).vitidle_config["plan"]["keep"][1] == 0.7 and tree(folder)["notes.txt"] == b"mine"


def test_force_replaces_no_folder_of_other_files(saved, tmp_path, monkeypatch):
    model, _ = saved
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"mine")
    with pytest.raises(UsageError, match="replaces only model folders"):
        vitidle.save(model, folder, force=True)
    assert tree(folder) == {"cat.jpg": b"mine"}
    vitidle.save(model, tmp_path / "model")
    monkeypatch.chdir(tmp_path / "model")
    with pytest.raises(UsageError, match="current folder"):
        vitidle.save(model, ".", force=True)
    assert (tmp_path / "model" / "vitidle.json").is_file()


def test_force_through_a_link_replaces_the_model_it_points_to(saved, tmp_path):
    model, _ = saved
    real, link = tmp_path / "real", tmp_path / "link"
    vitidle.save(vitidle.convert(tiny(NAME), keep=0.7), real)
    link.symlink_to(real, target_is_directory=True)
    vitidle.save(model, link, force=True)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert vitidle.load(real).vitidle_config["plan"] == model.vitidle_config["plan"]


def test_save_returns_the_path_as_given_and_refuses_a_link_loop(saved, tmp_path, monkeypatch):
    model, _ = saved
    monkeypatch.chdir(tmp_path)
    assert vitidle.save(model, "rel") == pathlib.Path("rel")  # what the user typed, for messages
    pathlib.Path("loop").symlink_to("loop")
    with pytest.raises(UsageError, match="cannot save to loop"):
        vitidle.save(model, "loop")


def test_saved_folder_has_the_umask_mode(saved, tmp_path):
    model, _ = saved
    old = os.umask(0o022)
    try:
        vitidle.save(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_save_creates_missing_parents(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "a" / "b" / "out"
    vitidle.save(model, folder)
    assert (folder / "vitidle.json").is_file()


def test_save_of_an_unconverted_model_writes_nothing(tmp_path):
    with pytest.raises(ConversionError):
        vitidle.save(tiny(NAME), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def fail(*args, **kwargs):
    raise OSError("disk full")


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model, _ = saved
    monkeypatch.setattr(vitidle.io, "save_file", fail)
    with pytest.raises(UsageError, match="cannot write .*: disk full"):
        vitidle.save(model, tmp_path / "a" / "out")
    assert list(tmp_path.iterdir()) == []  # the parent it made is gone too


def test_failed_forced_save_keeps_the_old_folder(saved, tmp_path, monkeypatch):
    model, _ = saved
    folder = tmp_path / "out"
    vitidle.save(model, folder)
    before = tree(folder)
    monkeypatch.setattr(vitidle.io, "save_file", fail)
    with pytest.raises(UsageError, match="disk full"):
        vitidle.save(model, folder, force=True)
    assert tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_save_cut_between_its_two_renames_is_detected(saved, tmp_path, monkeypatch):
    model, _ = saved
    folder = tmp_path / "out"
    vitidle.save(vitidle.convert(tiny(NAME), keep=0.7), folder)
    (folder / "notes.txt").write_text("mine")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("vitidle.json"):  # the weights are in place, the new config is not
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UsageError, match="disk full"):
        vitidle.save(model, folder, force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "notes.txt", "vitidle.json"]
    with pytest.raises(CheckpointError, match="come from different saves"):
        vitidle.load(folder)


def test_saved_files_have_the_umask_mode(saved, tmp_path):
    model, _ = saved
    old = os.umask(0o022)
    try:
        vitidle.save(model, tmp_path / "out")
        (tmp_path / "out" / "model.safetensors").chmod(0o600)
        vitidle.save(model, tmp_path / "out", force=True)  # replaced files get the umask's mode too
    finally:
        os.umask(old)
    assert [(p.name, p.stat().st_mode & 0o777) for p in sorted((tmp_path / "out").iterdir())] == [
        ("model.safetensors", 0o644), ("vitidle.json", 0o644)]


def test_round_trip_of_a_converted_model_object(tmp_path):
    model = vitidle.convert(tiny(NAME), keep=0.5)
    vitidle.save(model, tmp_path / "out")
    loaded = vitidle.load(tmp_path / "out")
    x = images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_round_trip_of_a_default_size_model_object(tmp_path):
    """A timm model at its default size round-trips through convert(object) (no kwargs needed)."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model = vitidle.convert(model, keep=0.5).eval()
    vitidle.save(model, tmp_path / "out")
    loaded = vitidle.load(tmp_path / "out")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# load errors


def test_load_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        vitidle.load(tmp_path / "nope")


def test_load_folder_without_config(saved, tmp_path):
    _, folder = saved
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="vitidle.json"):
        vitidle.load(tmp_path / "m")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"plan": {"keep": [null, 0.5]}}', '{"base_model": "x"}',
                                  '{"base_model": "", "plan": {"keep": [null]}}'])
def test_load_corrupt_config(saved, tmp_path, text):
    _, folder = saved
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "m" / "vitidle.json").write_text(text)
    with pytest.raises(CheckpointError) as info:
        vitidle.load(tmp_path / "m")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("where, value", [("idle", -3), ("idle", 0), ("idle", 2.7), ("idle", True), ("idle", "8"),
                                          ("dense", 4), ("short", None)])
def test_load_refuses_a_corrupt_num_keep(saved, tmp_path, where, value):
    _, folder = saved
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((folder / "vitidle.json").read_text())
    num_keep = config["plan"]["num_keep"]
    if where == "short":
        num_keep.pop()
    else:
        num_keep[[k is None for k in num_keep].index(where == "dense")] = value  # the first such block
    (tmp_path / "m" / "vitidle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="plan.num_keep"):
        vitidle.load(tmp_path / "m")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_load_corrupt_weights(saved, tmp_path, damage):
    _, folder = saved
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vitidle.json").write_text((folder / "vitidle.json").read_text())
    weights = (folder / "model.safetensors").read_bytes()
    if damage == "garbage":
        (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00\xff" * 512)
    elif damage == "truncated":
        (tmp_path / "m" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError) as info:
        vitidle.load(tmp_path / "m")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [[None, 1.5, 0.5, 0.5], [None, 0, 0.5, 0.5], [None, "abc", 0.5, 0.5], 0.5],
                         ids=["1.5", "0", "abc", "not-a-list"])
def test_load_refuses_an_invalid_plan(saved, tmp_path, keep):
    _, folder = saved
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "vitidle.json").read_text())
    config["plan"]["keep"] = keep
    (tmp_path / "m" / "vitidle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        vitidle.load(tmp_path / "m")


def test_the_num_keep_knob_survives_save_and_load(tmp_path):
    model = vitidle.convert(tiny(NAME), keep=0.5)
    model.blocks[1].selector.num_keep = 3
    vitidle.save(model, tmp_path / "m")
    loaded = vitidle.load(tmp_path / "m")
    assert loaded.blocks[1].selector.num_keep == 3
    x = images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_save_refuses_a_model_its_config_would_not_rebuild(tmp_path):
    dense = timm.create_model(NAME, pretrained=False, depth=4, img_size=64, global_pool="avg", fc_norm=False)
    del dense._model_args  # as timm before 1.0.2x: no record of the kwargs
    model = vitidle.convert(dense, keep=0.5)
    with pytest.raises(UsageError, match="model_kwargs"):
        vitidle.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    model.vitidle_config["model_kwargs"].update(global_pool="avg", fc_norm=False)
    vitidle.save(model, tmp_path / "m")  # with the full kwargs it saves and rebuilds


TRAINING_KWARGS = dict(drop_path_rate=0.3, patch_drop_rate=0.5, proj_drop_rate=0.1)


@pytest.mark.parametrize("record", ["timm's record", "none"])
def test_training_settings_survive_save_and_load(tmp_path, record):
    dense = tiny(NAME, **TRAINING_KWARGS)
    if record == "none":
        del dense._model_args
    model = vitidle.convert(dense, keep=0.5)
    if record == "none":  # eval outputs are the same without the rates: the modules tell the difference
        with pytest.raises(UsageError, match=r"builds patch_drop as Identity\(\), not PatchDropout"):
            vitidle.save(model, tmp_path / "m")
        return
    vitidle.save(model, tmp_path / "m")
    loaded = vitidle.load(tmp_path / "m")
    assert vitidle.io.module_settings(loaded) == vitidle.io.module_settings(model)
    assert type(loaded.patch_drop).__name__ == "PatchDropout" and loaded.blocks[3].drop_path1.drop_prob == pytest.approx(0.3)
    assert vitidle.load(tmp_path / "m", dense=True).blocks[0].attn.proj_drop.p == 0.1


def test_save_refuses_a_file_path(tmp_path):
    target = tmp_path / "f"
    target.write_text("keep me")
    with pytest.raises(UsageError, match="is a file"):
        vitidle.save(vitidle.convert(tiny(NAME), keep=0.5), target, force=True)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("edit", [
    lambda c: c["model_kwargs"].update(bogus=1),
    lambda c: c.update(base_model="not_a_model"),
    lambda c: c["plan"].update(keep=[None, 0.5]),
], ids=["bad-kwargs", "unknown-base", "plan-length"])
def test_load_reports_a_bad_config_as_a_checkpoint_error(saved, tmp_path, edit):
    _, folder = saved
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "vitidle.json").read_text())
    edit(config)
    (tmp_path / "m" / "vitidle.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        vitidle.load(tmp_path / "m")


# find_model: the model folder a command run in a directory means


def model_copy(saved, folder: pathlib.Path, mtime: float | None = None) -> pathlib.Path:
    """A copy of the saved model folder at `folder`, its vitidle.json dated `mtime`."""
    shutil.copytree(saved[1], folder)
    if mtime is not None:
        os.utime(folder / "vitidle.json", (mtime, mtime))
    return folder


def test_find_model_in_a_model_folder(saved, tmp_path, monkeypatch):
    folder = model_copy(saved, tmp_path / "m", mtime=1_000_000)
    model_copy(saved, folder / "newer", mtime=2_000_000)  # the folder itself wins over a model inside it
    assert vitidle.io.find_model(folder) == (folder, 1)
    monkeypatch.chdir(folder)
    found, count = vitidle.io.find_model()
    assert found.resolve() == folder.resolve() and count == 1
    vitidle.load(found)


def test_find_model_takes_the_newest_subfolder(saved, tmp_path, monkeypatch):
    a = model_copy(saved, tmp_path / "a", mtime=2_000_000)
    b = model_copy(saved, tmp_path / "b", mtime=1_000_000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.safetensors").write_bytes(b"")  # weights without vitidle.json: not a model folder
    (tmp_path / "vitidle.txt").write_text("")
    assert vitidle.io.find_model(tmp_path) == (a, 2)
    os.utime(b / "vitidle.json", (3_000_000, 3_000_000))
    os.utime(a / "model.safetensors", (4_000_000, 4_000_000))  # only vitidle.json's time counts
    assert vitidle.io.find_model(tmp_path) == (b, 2)
    monkeypatch.chdir(tmp_path)
    found, count = vitidle.io.find_model()
    assert found.resolve() == b.resolve() and count == 2


def test_find_model_ignores_hidden_folders(saved, tmp_path):
    a = model_copy(saved, tmp_path / "a", mtime=1_000_000)
    model_copy(saved, tmp_path / ".a.tmp1234", mtime=2_000_000)  # e.g. save's temporary folder
    model_copy(saved, tmp_path / ".old", mtime=3_000_000)
    assert vitidle.io.find_model(tmp_path) == (a, 1)
    shutil.rmtree(a)
    with pytest.raises(UsageError, match="no model folder"):
        vitidle.io.find_model(tmp_path)


def test_find_model_without_a_model_folder(saved, tmp_path):
    with pytest.raises(UsageError) as info:
        vitidle.io.find_model(tmp_path)
    message = str(info.value)
    assert "vitidle convert" in message and str(tmp_path.resolve()) in message and "\n" not in message
    model_copy(saved, tmp_path / "x" / "y")  # only direct subfolders count
    with pytest.raises(UsageError):
        vitidle.io.find_model(tmp_path)


# load(dense=True): the base timm model with the same weights


def test_load_dense_gives_the_base_model_with_the_same_weights(saved):
    model, folder = saved
    dense = vitidle.load(folder, dense=True)
    assert not hasattr(dense, "vitidle_config")
    assert not dense.training
    assert not any(name.endswith("selector") for name, _ in dense.named_modules())
    state, converted_state = dense.state_dict(), model.state_dict()
    assert set(state) == set(converted_state)
    for key, value in converted_state.items():
        assert torch.equal(state[key], value), key
    reference = tiny(NAME)
    reference.load_state_dict(converted_state)
    x = images(model, batch=3)
    with torch.no_grad():
        assert torch.equal(dense(x), reference(x))
        assert not torch.allclose(dense(x), model(x), atol=1e-3)  # dense, not the idle model
    assert hasattr(vitidle.load(folder), "vitidle_config")  # the default is still the converted model


@pytest.mark.parametrize("edit, error", [
    ({"img_size": 4096}, "do not fit"), ({"depth": 2000}, "are not those of the weights"),
    ({"embed_dim": 16384, "num_heads": 8}, "do not fit"), ({"device": "meta"}, "device cannot be given"),
    ({"checkpoint_path": "/etc/passwd"}, "checkpoint_path cannot be given"), ({"img_size": 8}, "do not fit"),
])
def test_a_tampered_config_fails_before_the_model_is_built(saved, tmp_path, monkeypatch, edit, error):
    _, folder = saved
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((folder / "vitidle.json").read_text())
    config["model_kwargs"].update(edit)
    (tmp_path / "m" / "vitidle.json").write_text(json.dumps(config))
    built = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(torch.empty(0).device) or real_create(*a, **k))
    with pytest.raises(CheckpointError, match=error) as info:
        vitidle.load(tmp_path / "m")
    assert "\n" not in str(info.value)
    assert all(device.type == "meta" for device in built)  # nothing was allocated for real


def test_a_deeply_nested_config_is_a_checkpoint_error(saved, tmp_path):
    _, folder = saved
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "vitidle.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="is corrupt: RecursionError"):
        vitidle.load(tmp_path / "m")


@pytest.mark.filterwarnings("ignore::UserWarning")  # gloo's warnings on a one-process group
def test_compiled_and_ddp_wrapped_models_save_as_the_model_inside(saved, tmp_path, monkeypatch):
    import torch.distributed as dist

    model, _ = saved
    vitidle.save(torch.compile(model), tmp_path / "compiled")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        vitidle.save(torch.nn.parallel.DistributedDataParallel(model), tmp_path / "ddp")
    finally:
        dist.destroy_process_group()
    for name in ("compiled", "ddp"):
        assert load_file(tmp_path / name / "model.safetensors").keys() == model.state_dict().keys()
        assert vitidle.load(tmp_path / name).vitidle_config["plan"] == model.vitidle_config["plan"]
