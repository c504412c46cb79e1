"""The model vitidle ships: its weights are the published bytes, load strictly, and score as docs/results.md says."""

import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import vitidle
from vitidle import zoo
from vitidle.errors import CheckpointError
from vitidle.train.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]
FILE = "vit_fashion_mnist.safetensors"


def shipped():
    """The shipped model with its weights, read from the package (vitidle.models.create: never a download here)."""
    return vitidle.models.create("vit_fashion_mnist")


def test_shipped_weights_are_the_published_bytes_and_load_strictly():
    path = zoo.check_weights(FILE)
    assert path.stat().st_size <= 5 * 2**20
    state = load_file(path)
    model = shipped()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert state[key].shape == value.shape and (state[key].float() == value).all(), key  # fp16 stored, exact


def test_altered_weights_are_refused(tmp_path, monkeypatch):
    shutil.copy(zoo.WEIGHTS / FILE, tmp_path / FILE)
    with open(tmp_path / FILE, "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path)
    with pytest.raises(CheckpointError, match="altered"):
        zoo.check_weights(FILE)
    (tmp_path / FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        zoo.check_weights(FILE)


def published_top1(row: str) -> float:
    table = (ROOT / "docs" / "results.md").read_text()
    return float(re.search(rf"^\| {re.escape(row)} \| ([\d.]+) \|", table, re.M)[1])


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_shipped_model_scores_as_published():
    from vitidle.evaluate import evaluate
    from vitidle.train.recipe import DataSection

    sample = DataSection(dataset="fashion_mnist", val_split="test", val_limit=2000)  # the first 2,000 test images
    result = evaluate(shipped(), sample, batch_size=250, num_workers=0)
    assert result["images"] == 2000
    assert abs(result["top1"] - published_top1("dense (shipped)")) <= 1.5
    idle = evaluate(vitidle.convert("vit_fashion_mnist", keep=0.7), sample, batch_size=250, num_workers=0)
    assert abs(idle["top1"] - published_top1("idle 0.7, no training")) <= 1.5


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_convert_runs_offline_on_the_shipped_weights_and_says_what_they_score(tmp_path, capsys, offline):
    import json

    from vitidle_cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["convert", "--model", "vit_fashion_mnist", "--keep", "0.7", "-o", str(tmp_path / "m"), "--json"])
    out, err = capsys.readouterr()
    assert (info.value.code or 0) == 0, err
    summary = json.loads(out)
    assert summary["weights"] == "pretrained" and summary["top1_images"].startswith("the first 2000 fashion_mnist")
    assert abs(summary["top1"]["dense"] - published_top1("dense (shipped)")) <= 1.5
    assert summary["top1"]["idle"] < summary["top1"]["dense"]  # idling without a finetune costs accuracy
    assert vitidle.load(tmp_path / "m").pretrained_cfg["architecture"] == "vit_fashion_mnist"


def test_the_shipped_model_exports_behind_the_parity_gate(tmp_path):
    from vitidle.export import export_onnx

    report = export_onnx(vitidle.convert("vit_fashion_mnist", keep=0.7), tmp_path / "model.onnx")  # grey photos
    assert report.max_diff <= report.atol and report.top1_agreement == 1.0
