"""`vitidle convert` in-process: the summary, the folder it writes, and one-line errors that write nothing."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import vitidle
from vitidle_cli.main import main

TINY_ARGS = ["--model", "deit_tiny", "--no-pretrained", "--model-arg", "depth=4", "--model-arg", "img_size=64"]


def run(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), out, err


def convert(capsys, out, *extra):
    return run(capsys, "convert", *TINY_ARGS, "-o", out, *extra)


def assert_one_error_line(err):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vitidle: error:"), err
    assert "Traceback" not in err


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_prints_the_table_and_writes_a_loadable_folder(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = convert(capsys, out)
    assert code == 0, err
    assert err == ""
    rows = {line[:12].rstrip(): line[13:] for line in stdout.splitlines()}  # f"{key:<12} {value}"
    for key in ("model", "parameters", "GMACs dense", "GMACs idle", "plan", "output"):
        assert key in rows, stdout
    assert rows["model"].startswith("deit_tiny_patch16_224")
    assert "random init" in rows["model"]
    assert rows["plan"].startswith("blocks 1: 0.7 (11), 2: 0.49 (7), 3: 0.343 (5)")
    assert rows["output"].rstrip("/") == str(out)
    assert float(rows["GMACs idle"].split()[0]) < float(rows["GMACs dense"])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "vitidle.json"]
    model = vitidle.load(out)
    assert [b.selector.num_keep for b in model.blocks[1:]] == [11, 7, 5]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_json_summary(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = convert(capsys, out, "--json", "--keep", "0.5")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["model"] == "deit_tiny_patch16_224"
    assert summary["gmacs_dense"] > summary["gmacs_idle"] > 0
    assert summary["plan"]["num_keep"] == [None, 8, 4, 2]
    assert summary["plan"]["keep"] == [None, 0.5, 0.25, 0.125]
    assert summary["output"] == str(out)
    assert summary["input_size"] == [3, 64, 64]
    assert summary["parameters"] == sum(p.numel() for p in vitidle.load(out).parameters())


def test_schedule_constant(capsys, tmp_path):
    code, stdout, _ = convert(capsys, tmp_path / "out", "--json", "--keep", "0.5", "--schedule", "constant")
    assert code == 0
    assert json.loads(stdout)["plan"]["num_keep"] == [None, 8, 8, 8]


def test_plan_is_honoured(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = convert(capsys, out, "--plan", "1-3:0.5")
    assert code == 0, err
    config = json.loads((out / "vitidle.json").read_text())
    assert config["plan"]["keep"] == [None, 0.5, 0.5, 0.5]
    assert config["plan"]["num_keep"] == [None, 8, 8, 8]
    assert [b.selector.num_keep for b in vitidle.load(out).blocks[1:]] == [8, 8, 8]


def test_weights_file_is_used(capsys, tmp_path):
    source = vitidle.models.create("deit_tiny", pretrained=False, depth=4, img_size=64)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "out"
    args = ["convert", "--model", "deit_tiny", "--weights", tmp_path / "w.safetensors",
            "--model-arg", "depth=4", "--model-arg", "img_size=64", "-o", out]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    loaded = vitidle.load(out).state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def corrupt_weights(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(random.Random(0).randbytes(2048))
    return path


BAD = {
    # id: (arguments after "convert", exit code, text in the message)
    "keep-0": (TINY_ARGS + ["--keep", "0"], 2, "--keep"),
    "keep-1.5": (TINY_ARGS + ["--keep", "1.5"], 2, "--keep"),
    "unknown-model": (["--model", "deit_smal", "--no-pretrained"], 2, "close matches: deit_small"),
    "resnet18": (["--model", "resnet18", "--no-pretrained"], 2, "no attention blocks"),
    "bad-plan-syntax": (TINY_ARGS + ["--plan", "3-5=0.7"], 2, "'3-5=0.7'"),
    "bad-plan-range": (TINY_ARGS + ["--plan", "1-9:0.5"], 2, "'1-9:0.5'"),
    "bad-plan-keep": (TINY_ARGS + ["--plan", "1:0"], 2, "'1:0'"),
    "model-arg-without-=": (TINY_ARGS + ["--model-arg", "depth"], 2, "KEY=VALUE"),
    "model-arg-unknown": (TINY_ARGS + ["--model-arg", "foo=1"], 2, "cannot build"),
    "model-arg-bad-value": (["--model", "deit_tiny", "--model-arg", "img_size=-5"], 2, "cannot build"),
    "bad-schedule": (TINY_ARGS + ["--schedule", "linear"], 2, "--schedule"),
    "missing-weights": (["--model", "deit_tiny", "--model-arg", "depth=4", "--weights", "{tmp}/nope.pth"], 1,
                        "not found"),
    "corrupt-weights": (["--model", "deit_tiny", "--model-arg", "depth=4", "--weights", "{corrupt}"], 1,
                        "cannot read weights"),
    "offline-pretrained": (["--model", "deit_tiny", "--model-arg", "depth=4"], 1, "--weights FILE or --no-pretrained"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_and_writes_nothing(capsys, tmp_path, offline, case):
    args, want_code, text = BAD[case]
    corrupt = corrupt_weights(tmp_path)
    args = [a.format(tmp=tmp_path, corrupt=corrupt) for a in args]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "convert", *args, "-o", out)
    assert code == want_code, err
    assert_one_error_line(err)
    assert text in err
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder either


def test_existing_output_needs_force(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, stdout, err = convert(capsys, out)
    assert code == 2
    assert_one_error_line(err)
    assert "--force" in err and str(out) in err
    assert tree(out) == {"mine.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_a_model_folder_only(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    code, _, err = convert(capsys, out, "--force")
    assert code == 2 and "replaces only model folders" in err  # not a model folder: the user's files stay
    assert_one_error_line(err)
    assert tree(out) == {"mine.txt": b"old"}
    (out / "vitidle.json").write_text("{}")  # a model folder, even a broken one, may be replaced
    (out / "runs").mkdir()
    (out / "runs" / "epoch1.ckpt").write_text("x")
    code, _, err = convert(capsys, out, "--force")
    assert code == 0, err
    assert tree(out)["mine.txt"] == b"old" and tree(out)["runs/epoch1.ckpt"] == b"x"  # only vitidle's files change
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "model.safetensors", "runs", "vitidle.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    vitidle.load(out)


def test_failed_conversion_with_force_keeps_the_old_folder(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    code, _, err = convert(capsys, out, "--force", "--plan", "7:0.5")
    assert code == 2
    assert_one_error_line(err)
    assert tree(out) == {"mine.txt": b"old"}


def test_debug_shows_the_traceback(tmp_path):
    from vitidle.errors import UsageError

    with pytest.raises(UsageError):
        main(["--debug", "convert", *TINY_ARGS, "--plan", "x", "-o", str(tmp_path / "out")])


def test_convert_help_documents_the_plan_syntax(capsys):
    code, stdout, _ = run(capsys, "convert", "--help")
    assert code == 0
    assert "--plan" in stdout and "BLOCKS:KEEP" in stdout
    assert "3-5:0.7,6-8:0.49,9-11:0.343" in stdout
    assert "0-indexed" in stdout
    for option in ("--keep", "--schedule", "--weights", "--no-pretrained", "--model-arg", "--force", "--json"):
        assert option in stdout


def test_no_command_lists_convert(capsys):
    code, stdout, err = run(capsys, "--help")
    assert code == 0
    assert "convert" in stdout


def test_unknown_command(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2
    assert_one_error_line(err)


def test_installed_console_script():
    script = shutil.which("vitidle")
    command = [script] if script else [sys.executable, "-m", "vitidle_cli.main"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert version.returncode == 0 and vitidle.__version__ in version.stdout


# ---------------------------------------------------------------------------------------------------------------------
# `vitidle export`: finds the model folder in the current directory, writes only a file that passed the parity gate
# ---------------------------------------------------------------------------------------------------------------------

SMALL_ARGS = ["--model", "deit_tiny", "--keep", "0.5", "--no-pretrained", "--model-arg", "depth=2",
              "--model-arg", "img_size=32"]
FOLDER = "deit_tiny_patch16_224-idle"  # convert's default output folder
REPORT_KEYS = {"file", "exporter", "opset", "outputs", "batch_sizes", "max_diff", "atol", "images", "top1_agreement",
               "precision", "rel_diff_median", "rel_diff_max", "max_rel_diff", "min_top1"}


def table(stdout):
    """The export summary's rows: {key: value} of f"{key:<width}{value}" lines (keys may hold one space)."""
    return {line[:13].rstrip(): line[13:] for line in stdout.splitlines()}


@pytest.fixture(scope="module")
def exported_folder(tmp_path_factory):
    """A model folder made by `vitidle convert`, with the model.onnx `vitidle export` wrote in it."""
    root = tmp_path_factory.mktemp("export-cli")
    for args in (["convert", *SMALL_ARGS, "-o", root / FOLDER], ["export", root / FOLDER, "--onnx", "--legacy"]):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
        assert info.value.code in (0, None)
    return root / FOLDER


@pytest.fixture
def here(exported_folder, tmp_path, monkeypatch):
    """cwd: a fresh directory holding one model folder (without its model.onnx); returns that folder."""
    shutil.copytree(exported_folder, tmp_path / FOLDER, ignore=shutil.ignore_patterns("*.onnx"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / FOLDER


@pytest.fixture
def here_exported(exported_folder, tmp_path, monkeypatch):
    """cwd: a fresh directory holding one model folder with a good model.onnx; returns that folder."""
    shutil.copytree(exported_folder, tmp_path / FOLDER)
    monkeypatch.chdir(tmp_path)
    return tmp_path / FOLDER


def test_export_after_convert_in_the_same_folder(capsys, tmp_path, monkeypatch):
    from vitidle.export import check_onnx

    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "convert", *SMALL_ARGS)
    assert code == 0, err
    code, stdout, err = run(capsys, "export", "--onnx", "--legacy")
    assert code == 0, err
    assert err == ""
    folder = tmp_path / FOLDER
    onnx_file = folder / "model.onnx"
    rows = table(stdout)
    assert rows["model"] == f"{FOLDER}/"
    assert rows["onnx"].startswith(f"{FOLDER}/model.onnx (") and "opset 18" in rows["onnx"]
    assert "torchscript" in rows["onnx"]
    assert float(rows["max diff"].split()[0]) <= 1e-4
    assert rows["top-1 agree"] == "100%"
    assert rows["parity"] == "passed: written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.safetensors", "vitidle.json"]
    assert check_onnx(vitidle.load(folder), onnx_file).max_diff <= 1e-4

    before = onnx_file.read_bytes()
    code, stdout, err = run(capsys, "export", "--onnx", "--legacy")
    assert code == 2
    assert_one_error_line(err)
    assert "already exists" in err and "--force" in err
    assert stdout == ""
    assert onnx_file.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.safetensors", "vitidle.json"]


def test_export_force_replaces_the_file(capsys, here):
    from vitidle.export import check_onnx

    (here / "model.onnx").write_bytes(b"an old export")
    code, _, err = run(capsys, "export", "--onnx", "--legacy")
    assert code == 2
    assert_one_error_line(err)
    assert (here / "model.onnx").read_bytes() == b"an old export"
    code, stdout, err = run(capsys, "export", "--onnx", "--legacy", "--force")
    assert code == 0, err
    assert table(stdout)["parity"] == "passed: written"
    assert check_onnx(vitidle.load(here), here / "model.onnx").max_diff <= 1e-4
    assert sorted(p.name for p in here.iterdir()) == ["model.onnx", "model.safetensors", "vitidle.json"]


def test_export_dense_writes_dense_onnx(capsys, here, tmp_path, monkeypatch):
    from vitidle.errors import ParityError
    from vitidle.export import check_onnx

    elsewhere = tmp_path / "elsewhere"  # MODEL given: no lookup in the (model-less) cwd
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, stdout, err = run(capsys, "export", here, "--onnx", "--legacy", "--dense")
    assert code == 0, err
    assert table(stdout)["model"] == f"{here}/ (dense)"
    assert sorted(p.name for p in here.iterdir()) == ["dense.onnx", "model.safetensors", "vitidle.json"]
    assert list(elsewhere.iterdir()) == []
    assert check_onnx(vitidle.load(here, dense=True), here / "dense.onnx").max_diff <= 1e-4
    with pytest.raises(ParityError):  # it is the dense model, not the idle one
        check_onnx(vitidle.load(here), here / "dense.onnx")


def test_export_json(capsys, here):
    code, stdout, err = run(capsys, "export", "--onnx", "--legacy", "--json", "--opset", "17", "--atol", "1e-3")
    assert code == 0, err
    report = json.loads(stdout)
    assert set(report) == REPORT_KEYS
    assert report["file"] == os.path.join(FOLDER, "model.onnx")
    assert report["exporter"] == "torchscript"
    assert report["opset"] == 17
    assert report["atol"] == 1e-3
    assert report["outputs"] == ["logits"]
    assert report["batch_sizes"] == [1, 4]
    assert 0 <= report["max_diff"] <= report["atol"]
    assert report["images"] == 7  # scikit-image's sample photos
    assert report["top1_agreement"] == 1.0
    assert (here / "model.onnx").is_file()


def test_check_only_passes_on_a_good_file(capsys, here_exported):
    before = (here_exported / "model.onnx").read_bytes()
    code, stdout, err = run(capsys, "export", "--onnx", "--check-only")
    assert code == 0, err
    assert table(stdout)["parity"] == "passed"  # nothing written
    code, stdout, err = run(capsys, "export", "--onnx", "--check-only", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert set(report) == REPORT_KEYS and report["exporter"] is None and report["max_diff"] <= 1e-4
    assert (here_exported / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in here_exported.iterdir()) == ["model.onnx", "model.safetensors", "vitidle.json"]


def test_check_only_fails_after_the_weights_change(capsys, here_exported):
    from safetensors.torch import load_file

    weights = here_exported / "model.safetensors"
    state = load_file(weights)
    state["head.weight"] += torch.randn(state["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, weights)
    before = (here_exported / "model.onnx").read_bytes()
    code, stdout, err = run(capsys, "export", "--onnx", "--check-only")
    assert code == 1
    assert_one_error_line(err)
    assert "max difference" in err and "atol 0.0001" in err
    assert stdout == ""
    assert (here_exported / "model.onnx").read_bytes() == before  # a check deletes nothing


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_check_only_on_a_bad_file(capsys, here_exported, damage):
    onnx_file = here_exported / "model.onnx"
    if damage == "truncated":
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    elif damage == "garbage":
        onnx_file.write_bytes(random.Random(0).randbytes(2048))
    else:
        onnx_file.unlink()
    code, stdout, err = run(capsys, "export", "--onnx", "--check-only")
    assert code == 1
    assert_one_error_line(err)
    assert "model.onnx" in err
    assert ("not found" if damage == "missing" else "not a valid ONNX model") in err
    assert stdout == ""


def test_export_to_another_file(capsys, here, tmp_path):
    from vitidle.export import check_onnx

    code, stdout, err = run(capsys, "export", "--onnx", "--legacy", "-o", "out/other.onnx")
    assert code == 0, err
    assert table(stdout)["onnx"].startswith("out/other.onnx (")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.onnx"]  # relative to the cwd
    assert not (here / "model.onnx").exists()
    assert check_onnx(vitidle.load(here), tmp_path / "out" / "other.onnx").max_diff <= 1e-4


def test_export_with_a_folder_of_images(capsys, here, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = random.Random(0)
    for i, size in enumerate([(40, 50), (64, 32), (33, 33)]):
        Image.frombytes("RGB", size, rng.randbytes(3 * size[0] * size[1])).save(photos / f"{i}.png")
    (photos / "readme.txt").write_text("not a photo")
    code, stdout, err = run(capsys, "export", "--onnx", "--legacy", "--json", "--images", photos)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["images"] == 3 and report["top1_agreement"] == 1.0


def test_export_picks_the_newest_of_two_model_folders(capsys, here, tmp_path):
    older = tmp_path / "older-idle"
    shutil.copytree(here, older)
    os.utime(older / "vitidle.json", (1_000_000, 1_000_000))
    code, _, err = run(capsys, "export", "--onnx", "--legacy")
    assert code == 0, err
    assert (here / "model.onnx").is_file() and not (older / "model.onnx").exists()
    assert len(err.splitlines()) == 1 and FOLDER in err and "newest of 2" in err  # a note, not an error


EXPORT_BAD = {
    # id: (arguments after "export", exit code, text in the message)
    "no-format": ([], 2, "--onnx"),
    "opset-16": (["--onnx", "--opset", "16"], 2, "--opset"),
    "not-onnx": (["--onnx", "--legacy", "-o", "model.pt"], 2, ".onnx"),
    "negative-atol": (["--onnx", "--atol", "-1"], 2, "--atol"),
    "missing-images": (["--onnx", "--images", "nope"], 2, "--images"),
    "empty-images": (["--onnx", "--legacy", "--images", "{empty}"], 2, "no images"),
    "missing-model": (["nope", "--onnx"], 2, "does not exist"),
    "check-only-with-export-options": (["--onnx", "--check-only", "--legacy", "--opset", "17"], 2,
                                       "--legacy, --opset only apply to an export"),
    "not-a-model-folder": (["{empty}", "--onnx"], 1, "not a vitidle model folder"),
    "tampered-config": (["{tampered}", "--onnx"], 1, "do not fit"),
    "output-under-a-file": (["--onnx", "--legacy", "-o", f"{FOLDER}/model.safetensors/x.onnx"], 2, "cannot write"),
}


@pytest.mark.parametrize("case", list(EXPORT_BAD))
def test_export_bad_input_gives_one_line_and_writes_nothing(capsys, here, tmp_path, case):
    args, want_code, text = EXPORT_BAD[case]
    (tmp_path / "empty").mkdir()
    tampered = tmp_path / "elsewhere" / "tampered"  # not a folder of cwd: the model export finds stays `here`
    shutil.copytree(here, tampered)
    config = json.loads((here / "vitidle.json").read_text())
    config["model_kwargs"]["img_size"] = 8  # a sample forward would fail: the weights' header says so first
    (tampered / "vitidle.json").write_text(json.dumps(config))
    before = tree(tmp_path)
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, stdout, err = run(capsys, "export", *[a.format(empty=tmp_path / "empty", tampered=tampered)
                                                for a in args])
    assert code == want_code, err
    assert_one_error_line(err)
    assert text in err
    assert stdout == ""
    assert tree(tmp_path) == before
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing  # no temp folder


def test_export_without_a_model_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-model").mkdir()
    code, stdout, err = run(capsys, "export", "--onnx")
    assert code == 2
    assert_one_error_line(err)
    assert "no model folder" in err and "vitidle convert" in err
    assert stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-model"]
    assert list((tmp_path / "not-a-model").iterdir()) == []


def test_export_help_explains_how_model_is_found(capsys):
    code, stdout, _ = run(capsys, "export", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    assert "MODEL is a model folder" in text
    assert "current directory" in text and "newest model folder" in text and "vitidle.json" in text
    for option in ("--onnx", "--output", "--dense", "--legacy", "--opset", "--atol", "--images", "--check-only",
                   "--force", "--json"):
        assert option in stdout
    code, stdout, _ = run(capsys, "--help")
    assert "export" in stdout
