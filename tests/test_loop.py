"""The finetune loop on a tiny DeiT and a tiny image folder made here; the shipped recipes."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import TINY_KWARGS, recipe, summary

import vitidle
from vitidle.errors import UsageError
from vitidle.train import loop
from vitidle.train.data import FashionMNIST, read_idx
from vitidle.train.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


def test_a_few_steps_lower_the_loss(idle_run):
    out, _ = idle_run
    rows = summary(out)
    assert [int(r["step"]) for r in rows] == [6, 12, 18]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.7 * first, rows
    assert float(rows[-1]["cut"]) < float(rows[0]["cut"])  # the cut loss is being optimised
    assert all(float(r["kd"]) >= 0 and r["teacher_top1"] for r in rows)
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decay per step
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"]["drop_path"] == 0.1 and saved["run"]["output"] == str(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_output_is_a_model_folder_with_dense_timm_keys(idle_run):
    out, start = idle_run
    model = vitidle.load(out)
    assert [s.num_keep for s in vitidle.idle_selectors(model)] == [8, 4, 2]  # 16 patches at keep 0.5, 0.25, 0.125
    assert model.vitidle_config["model_kwargs"] == {**TINY_KWARGS, "drop_path_rate": 0.1}  # as it was built
    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY_KWARGS)
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    dense.load_state_dict(state, strict=True)
    # IdleViT trains with a frozen class token and position embedding; everything else moved
    assert torch.equal(state["cls_token"], start["cls_token"]) and torch.equal(state["pos_embed"], start["pos_embed"])
    assert not torch.equal(state["blocks.1.attn.qkv.weight"], start["blocks.1.attn.qkv.weight"])


def test_finetuned_folder_passes_the_onnx_parity_gate(idle_run, tmp_path):
    from vitidle.export import export_onnx

    out, _ = idle_run
    report = export_onnx(vitidle.load(out), tmp_path / "model.onnx", legacy=True)
    assert report.max_diff <= report.atol


def test_drop_path_reaches_the_model(folder, tmp_path):
    built = loop.build_models(recipe(folder, tmp_path / "o", model={"drop_path": 0.2}))
    rates = [m.drop_prob for m in built.student.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32)
    built.student.train()
    assert not torch.equal(built.student(x), built.student(x))  # stochastic in training
    assert built.teacher.training is False and not any(p.requires_grad for p in built.teacher.parameters())


def test_dense_run_saves_plain_timm_weights(folder, tmp_path):
    out = tmp_path / "dense"
    r = recipe(folder, out, model={"keep": None, "plan": "none"}, teacher={"enabled": False},
               optim={"frozen": []}, run={"epochs": None, "steps": 4, "eval_every": 0},
               data={"mean": [0.25, 0.5, 0.75], "std": [0.2, 0.3, 0.4]})
    loop.finetune(r, progress=False, log=lambda s: None)
    assert vitidle.idle_selectors(vitidle.load(out)) == []
    saved = vitidle.io.read_config(out)["input"]  # eval, export and bench preprocess as the run trained
    assert (saved["mean"], saved["std"]) == ([0.25, 0.5, 0.75], [0.2, 0.3, 0.4])
    from safetensors.torch import load_file

    dense = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY_KWARGS)
    dense.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    rows = summary(out)
    assert len(rows) == 1 and rows[0]["step"] == "4" and rows[0]["top1"]  # evaluated at the end
    assert rows[0]["teacher_top1"] == "" and float(rows[0]["cut"]) == 0.0


def test_run_folder_is_never_overwritten_silently(folder, tmp_path, idle_run):
    out, _ = idle_run
    with pytest.raises(UsageError, match="already exists and is not empty"):
        loop.finetune(recipe(folder, out), progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="no run folder"):
        loop.finetune(recipe(folder, mine), force=True, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # --force trains a run folder again and leaves the user's other files
    again = tmp_path / "again"
    r = recipe(folder, again, run={"epochs": None, "steps": 1, "eval_every": 0}, teacher={"enabled": False})
    loop.finetune(r, progress=False, log=lambda s: None)
    (again / "notes.txt").write_text("mine")
    loop.check_output(again, force=True)  # what --force does before training again
    assert sorted(p.name for p in again.iterdir()) == ["checkpoints", "notes.txt", "recipe.yaml"]  # no old model
    assert list((again / "checkpoints").iterdir()) == []  # nor its checkpoints
    loop.finetune(r, force=True, progress=False, log=lambda s: None)
    assert (again / "notes.txt").read_text() == "mine" and (again / "vitidle.json").is_file()


def test_dry_run_refuses_model_kwargs_the_run_refuses(folder, tmp_path):
    r = recipe(folder, tmp_path / "o", model={"model_kwargs": {**TINY_KWARGS, "checkpoint_path": "/etc/passwd"}})
    with pytest.raises(UsageError, match="checkpoint_path cannot be given"):
        loop.build_models(r, meta=True)


def test_non_finite_loss_stops_with_step_and_term(folder, tmp_path, monkeypatch):
    real = loop.finetune_loss

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms["cut"] = terms["cut"] * float("nan")
        terms["total"] = terms["total"] + terms["cut"]
        return terms

    monkeypatch.setattr(loop, "finetune_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteLossError, match="at step 1 .*term cut = nan"):
        loop.finetune(recipe(folder, out, run={"epochs": 1}), progress=False, log=lambda s: None)
    assert not (out / "vitidle.json").exists()


def test_lr_schedule_scales_warms_up_and_decays():
    r = recipe_from_dict({"model": {"name": "deit_tiny"}, "data": {"root": "x"},
                          "optim": {"lr": 1e-5}, "run": {"epochs": 1, "batch_size": 256, "accumulation": 8}})
    assert loop.peak_lr(r) == pytest.approx(4e-5)  # 1e-5 x 2048 / 512, as the paper
    lrs = [loop.lr_at(s, 10, 2, 1.0, 0.1, 0.0) for s in range(10)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] > 0.1 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_shipped_recipes_dry_run_offline(path, offline, tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    assert "plan" in out and "nothing written" in out
    assert list(tmp_path.iterdir()) == [tmp_path / "hf", tmp_path / "torch"] or not any(
        p.name == "runs" for p in tmp_path.iterdir())  # nothing written


def test_imagenet_recipe_runs_one_step_on_a_tiny_folder(folder, tmp_path, offline, capsys):
    from cli.main import main

    out = tmp_path / "run"
    overrides = ["model.pretrained=false", "model.model_kwargs={depth: 2, img_size: 32, num_classes: 2}",
                 f"data.root={folder}", "run.epochs=null", "run.steps=1", "run.batch_size=4", "run.accumulation=2",
                 "run.num_workers=0", f"run.output={out}", "run.device=cpu"]
    argv = ["finetune", str(ROOT / "recipes/imagenet/deit_small_keep0.7.yaml"), "-q"]
    with pytest.raises(SystemExit) as info:
        main(argv + [a for o in overrides for a in ("--set", o)])
    assert info.value.code == 0, capsys.readouterr()
    [row] = summary(out)
    assert row["step"] == "1" and float(row["cut"]) > 0 and float(row["kd"]) >= 0  # bf16, mixup, RandAugment
    assert vitidle.load(out).vitidle_config["model_kwargs"] == {"depth": 2, "img_size": 32, "num_classes": 2,
                                                               "drop_path_rate": 0.1}


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4]))
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    ds = FashionMNIST(tmp_path, "validation", mode="RGB")
    image, label = ds[2]
    assert len(ds) == 3 and label == 4 and image.size == (28, 28) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image)[..., 0], images[2])
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path, "train")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(UsageError, match="truncated"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_files():
    ds = FashionMNIST(split="test")
    assert len(ds) == 10000 and sorted(set(ds.labels.tolist())) == list(range(10))


def run_cli(args, **kwargs):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "finetune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def wait_for_checkpoint(out, proc, after, timeout=120):
    """Block until a checkpoint past step `after` is in place; its step."""
    import time

    from vitidle.train.checkpoint import checkpoints

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [int(p.name.split("-")[1]) for p in checkpoints(out)]
        if found and max(found) > after:
            return max(found)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


def test_resume_after_sigkill_and_sigterm_is_bit_identical(folder, tmp_path):
    """Killed at a random step (SIGKILL), resumed, stopped by SIGTERM, resumed: the same weights as one run."""
    import random
    import signal

    from safetensors.torch import load_file

    from vitidle.train.recipe import load_recipe

    # mixup (numpy), RandAugment and random erasing (python / torch), drop path (torch): every RNG in play
    fields = {"model": {"name": "deit_tiny", "model_kwargs": TINY_KWARGS, "keep": 0.5, "drop_path": 0.1},
              "data": {"root": str(folder), "reprob": 0.25, "scale": [0.5, 1.0], "mixup": 0.8, "cutmix": 1.0},
              "optim": {"lr": 1e-3, "scale_lr": False, "clip_grad": 1.0, "warmup_epochs": 0.5},
              "run": {"steps": 10, "batch_size": 4, "accumulation": 2, "num_workers": 0, "device": "cpu",
                      "checkpoint_every": 1, "eval_every": 0, "output": str(tmp_path / "stopped")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(fields))
    whole = loop.finetune(load_recipe(path, [f"run.output={tmp_path / 'whole'}"]), progress=False,
                          log=lambda s: None)

    out = tmp_path / "stopped"
    proc = run_cli([str(path), "-q"])
    kill_after = random.Random().randint(1, 4)
    wait_for_checkpoint(out, proc, kill_after)
    proc.kill()  # SIGKILL: no handler runs
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "vitidle.json").exists()

    proc = run_cli([str(out / "recipe.yaml"), "--resume", "-q"])
    seen = wait_for_checkpoint(out, proc, kill_after + 1)
    proc.send_signal(signal.SIGTERM)  # checkpoint at the next step, then exit
    assert proc.wait(timeout=120) == 130, proc.stdout.read().decode()[-2000:]
    assert "continue with --resume" in proc.stdout.read().decode()
    assert not (out / "vitidle.json").exists()

    log = []
    loop.finetune(load_recipe(out / "recipe.yaml"), resume=True, progress=False, log=log.append)
    import re

    [resumed] = [int(re.search(r"\(step (\d+) of", line)[1]) for line in log if line.startswith("resume")]
    assert seen <= resumed < 10  # the checkpoint at the step where SIGTERM arrived, or the next
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert summary(whole)[-1]["loss"] == summary(out)[-1]["loss"]


def test_resume_refuses_another_recipe_or_no_checkpoint(folder, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(UsageError, match="holds no run"):
        loop.finetune(recipe(folder, out), resume=True, progress=False)
    r = recipe(folder, out, run={"epochs": None, "steps": 1}, teacher={"enabled": False})
    loop.finetune(r, progress=False, log=lambda s: None)
    other = recipe(folder, out, run={"epochs": None, "steps": 1}, teacher={"enabled": False}, optim={"lr": 1e-2})
    with pytest.raises(UsageError, match=r"differs from the run's recipe.yaml in optim.lr"):
        loop.finetune(other, resume=True, progress=False)


def test_a_converted_folder_keeps_its_plan_and_weights(folder, tmp_path):
    model = vitidle.convert("deit_tiny", keep=0.7, schedule="constant", pretrained=False, model_kwargs=TINY_KWARGS)
    model.blocks[2].selector.num_keep = 5  # a knob turned after conversion
    vitidle.save(model, tmp_path / "m")
    built = loop.build_models(recipe(folder, tmp_path / "o", model={"name": None, "keep": None,
                                                                    "model_kwargs": {}, "folder": str(tmp_path / "m")}))
    assert [s.num_keep for s in vitidle.idle_selectors(built.student)] == [11, 5, 11]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in built.student.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in built.teacher.state_dict().items())  # dense, same weights
    assert vitidle.idle_selectors(built.teacher) == []
    replanned = loop.build_models(recipe(folder, tmp_path / "o", model={
        "name": None, "model_kwargs": {}, "folder": str(tmp_path / "m"), "keep": 0.5}))
    assert [s.num_keep for s in vitidle.idle_selectors(replanned.student)] == [8, 4, 2]


def test_the_run_draws_its_curves(idle_run):
    from PIL import Image

    out, _ = idle_run
    with Image.open(out / "curves.png") as image:  # a real PNG, two panels side by side
        assert image.format == "PNG" and image.size == (1000, 380)


def test_plot_curves_draws_the_terms_that_are_on(tmp_path, monkeypatch):
    import matplotlib.axes

    from vitidle.train.plot import plot_curves

    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k.get("label"))
                        or real_plot(ax, *a, **k))
    rows = [{"epoch": e, "loss": 2.0 / e, "ce": 1.0 / e, "cut": 0.0, "kd": 0.5 / e, "feature": 0.0,
             "top1": 50.0 + e, "teacher_top1": 60.0} for e in (1, 2, 3)]
    plot_curves(rows, tmp_path / "c.png")
    assert drawn == ["total", "ce", "kd", "model (idle)"]  # the cut and feature terms are off: not drawn
