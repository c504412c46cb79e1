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


def test_force_replaces(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    code, _, err = convert(capsys, out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "vitidle.json"]
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
