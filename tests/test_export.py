"""ONNX export: both exporters pass the parity gate, dynamic batch, external data, and a failed gate writes nothing."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import TINY

import vitidle
import vitidle.export
from vitidle.errors import OnnxError, ParityError, UsageError
from vitidle.export import ParityReport, check_onnx, export_onnx

SMALL = {"depth": 2, "img_size": 32}  # 4 image tokens; both blocks idle at keep 0.5 (2, then 1 token)
REPORT_KEYS = {"file", "exporter", "opset", "outputs", "batch_sizes", "max_diff", "atol", "images", "top1_agreement",
               "precision", "rel_diff_median", "rel_diff_max", "max_rel_diff", "min_top1"}


def converted(name="deit_tiny", keep=0.5, **kwargs):
    return vitidle.convert(name, keep=keep, pretrained=False, model_kwargs=kwargs or dict(SMALL)).eval()


def dense_twin(model):
    """The dense timm model with the converted model's weights: what the idle blocks must differ from."""
    config = model.vitidle_config
    dense = timm.create_model(config["base_model"], pretrained=False, **config["model_kwargs"]).eval()
    dense.load_state_dict(model.state_dict())
    return dense


def run_onnx(path, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})[0]


def torch_out(model, x):
    with torch.no_grad():
        return model(x).numpy()


def batch(model, n):
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(n))


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, report) of one legacy export, for the read-only tests."""
    model = converted()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    report = export_onnx(model, path, legacy=True)
    return model, path, report


# the exporters


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "dynamo"])
def test_export_passes_the_checker_and_matches_torch_at_any_batch(tmp_path, legacy):
    model = converted()
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, legacy=legacy)
    assert listing(tmp_path) == ["model.onnx"]  # no temp folder, no .data for a small model
    onnx.checker.check_model(str(path), full_check=True)
    assert report.file == str(path)
    assert report.exporter == ("torchscript" if legacy else "dynamo")
    assert report.outputs == ["logits"]
    assert report.max_diff <= report.atol == 1e-4
    assert report.top1_agreement == 1.0

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values"]
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis, not a fixed size
    dense = dense_twin(model)
    for n in (1, 3):  # neither the traced batch (2) nor the gate's (1, 4) only
        x = batch(model, n)
        got = run_onnx(path, x)
        assert got.shape == (n, 1000)
        np.testing.assert_allclose(got, torch_out(model, x), atol=1e-4, rtol=0)
        # the graph idles tokens: it is not the dense model
        assert np.abs(got - torch_out(dense, x)).max() > 1e-3


@pytest.mark.parametrize("legacy,opset", [(True, 17), (True, 20), (False, 20)],
                         ids=["legacy-17", "legacy-20", "dynamo-20"])
def test_opset_is_recorded(tmp_path, legacy, opset):
    model = converted()
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, legacy=legacy, opset=opset)
    versions = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    assert versions.get("", versions.get("ai.onnx")) == opset
    assert report.opset == opset
    assert check_onnx(model, path).opset == opset


def test_an_opset_the_dynamo_exporter_cannot_write_is_an_error_not_a_silent_other_opset(tmp_path):
    # the dynamo exporter builds opset 18 and converts down; the selector's Pad has no opset-17 conversion
    with pytest.raises(OnnxError, match="wrote opset 18, not 17; pass --opset 18 or --legacy"):
        export_onnx(converted(), tmp_path / "model.onnx", opset=17)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "dynamo"])
def test_external_data_and_a_later_export_removes_the_stale_data_file(tmp_path, legacy):
    model = converted()
    path = tmp_path / "model.onnx"
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = export_onnx(model, path, legacy=legacy, external_data=True)
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert path.stat().st_size < weights / 2 < (tmp_path / "model.onnx.data").stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # relative: the pair can be moved together
    assert report.max_diff <= report.atol
    assert check_onnx(model, path).max_diff <= 1e-4
    x = batch(model, 3)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(model, x), atol=1e-4, rtol=0)

    export_onnx(model, path, legacy=True, external_data=False, force=True)
    assert listing(tmp_path) == ["model.onnx"]
    assert path.stat().st_size > weights
    assert check_onnx(model, path).max_diff <= 1e-4


@pytest.mark.parametrize("name,num_prefix,kwargs,legacy", [
    ("deit_tiny_patch16_224", 1, TINY["deit_tiny_patch16_224"], True),
    ("deit_small_distilled_patch16_224", 2, TINY["deit_small_distilled_patch16_224"], True),
    # layer scale at 1: timm's random init of 1e-5 makes the blocks, so the idling, invisible to the gate
    ("vit_small_patch14_reg4_dinov2", 5, {**TINY["vit_small_patch14_reg4_dinov2"], "init_values": 1.0}, True),
    ("vit_medium_patch16_gap_256", 0, {**TINY["vit_medium_patch16_gap_256"], "init_values": 1.0}, True),
    # the default exporter on the mean-query score (no class token)
    ("vit_medium_patch16_gap_256", 0, {**TINY["vit_medium_patch16_gap_256"], "init_values": 1.0}, False),
], ids=["deit", "distilled", "registers", "gap", "gap-dynamo"])
def test_converted_families_export_and_pass(tmp_path, name, num_prefix, kwargs, legacy):
    model = converted(name, **kwargs)
    assert model.vitidle_config["layout"]["num_prefix"] == num_prefix
    assert model.vitidle_config["plan"]["num_keep"] == [None, 8, 4, 2]
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, legacy=legacy)
    assert report.max_diff <= report.atol
    features = not model.num_classes
    assert report.outputs == ["features" if features else "logits"]
    assert report.top1_agreement == (None if features else 1.0)
    x = batch(model, 3)
    got = run_onnx(path, x)
    np.testing.assert_allclose(got, torch_out(model, x), atol=1e-4, rtol=0)
    assert np.abs(got - torch_out(dense_twin(model), x)).max() > 1e-3


def test_dense_model_export(tmp_path):
    model = converted()
    vitidle.save(model, tmp_path / "m")
    dense = vitidle.load(tmp_path / "m", dense=True)
    path = tmp_path / "dense.onnx"
    report = export_onnx(dense, path, legacy=True)
    assert report.max_diff <= report.atol and report.top1_agreement == 1.0
    x = batch(dense, 3)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(dense_twin(model), x), atol=1e-4, rtol=0)
    with pytest.raises(ParityError):  # the dense file is not the idle model
        check_onnx(model, path)


# the gate


def test_a_perturbed_weight_fails_the_gate(tmp_path):
    model = converted()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, legacy=True)
    with torch.no_grad():
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ParityError) as info:
        check_onnx(model, path)
    error = info.value
    assert error.atol == 1e-4
    assert error.max_diff is not None and error.max_diff > error.atol
    assert "max difference" in str(error) and "atol" in str(error) and "\n" not in str(error)
    # within a looser atol the values pass, but the top-1 class must still agree on every photo
    with pytest.raises(ParityError, match="top-1 class differs on .* photos") as info:
        check_onnx(model, path, atol=1e3)
    assert 1e-4 < info.value.max_diff <= 1e3


def test_the_atol_is_honoured(tmp_path):
    model = converted()
    path = tmp_path / "model.onnx"
    export_onnx(model, path, legacy=True)
    with torch.no_grad():
        model.head.bias.add_(1e-2)  # every logit moves by 0.01: no class changes rank
    with pytest.raises(ParityError, match="max difference 0.01"):
        check_onnx(model, path)
    report = check_onnx(model, path, atol=0.02)
    assert report.max_diff == pytest.approx(1e-2, abs=1e-5)
    assert report.top1_agreement == 1.0


def test_per_token_logits_are_compared_without_a_top1(tmp_path):
    # no pooling: the head gives (B, N, classes); only values and shapes can be compared
    model = converted(global_pool="", num_classes=10, **SMALL)
    report = export_onnx(model, tmp_path / "model.onnx", legacy=True)
    assert report.top1_agreement is None and report.max_diff <= report.atol


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing-data"])
def test_a_corrupt_file_is_an_onnx_error(exported, tmp_path, damage):
    model, good, _ = exported
    path = tmp_path / "model.onnx"
    data = good.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        export_onnx(model, path, legacy=True, external_data=True)
        (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(OnnxError) as info:
        check_onnx(model, path)
    assert not isinstance(info.value, ParityError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_is_an_onnx_error(exported, tmp_path):
    model, _, _ = exported
    with pytest.raises(OnnxError, match="not found"):
        check_onnx(model, tmp_path / "nope.onnx")


def perturbing_export(monkeypatch):
    """Make export_onnx's model differ from the file it just exported: a real parity failure."""
    real = vitidle.export._export
    calls = []

    def export(model, out, *args):
        real(model, out, *args)
        calls.append(out)
        with torch.no_grad():
            model.head.weight.mul_(-1.0)

    monkeypatch.setattr(vitidle.export, "_export", export)
    return calls


def test_a_failed_gate_writes_nothing(tmp_path, monkeypatch):
    calls = perturbing_export(monkeypatch)
    with pytest.raises(ParityError) as info:
        export_onnx(converted(), tmp_path / "model.onnx", legacy=True)
    assert calls  # the file was exported, then refused
    assert info.value.max_diff > info.value.atol
    assert listing(tmp_path) == []  # no .onnx, no .data, no temp folder


def test_a_failed_gate_leaves_no_new_folders(tmp_path, monkeypatch):
    perturbing_export(monkeypatch)
    with pytest.raises(ParityError):
        export_onnx(converted(), tmp_path / "a" / "b" / "model.onnx", legacy=True)
    assert listing(tmp_path) == []


def test_a_failed_gate_keeps_the_older_files(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"older export")
    (tmp_path / "model.onnx.data").write_bytes(b"older weights")
    calls = perturbing_export(monkeypatch)
    with pytest.raises(ParityError):
        export_onnx(converted(), tmp_path / "model.onnx", legacy=True, force=True, external_data=True)
    assert calls
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx").read_bytes() == b"older export"
    assert (tmp_path / "model.onnx.data").read_bytes() == b"older weights"


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "dynamo"])
def test_an_exporter_failure_is_a_one_line_onnx_error(tmp_path, monkeypatch, legacy):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(OnnxError) as info:
        export_onnx(converted(), tmp_path / "model.onnx", legacy=legacy)
    message = str(info.value)
    assert "\n" not in message and "unsupported operator" in message
    assert ("--legacy" in message) is not legacy  # the hint points from dynamo to the TorchScript exporter
    assert listing(tmp_path) == []


# arguments


def test_an_existing_file_needs_force(exported, tmp_path):
    model, _, _ = exported
    path = tmp_path / "model.onnx"
    path.write_bytes(b"mine")
    with pytest.raises(UsageError, match="already exists"):
        export_onnx(model, path, legacy=True)
    assert listing(tmp_path) == ["model.onnx"] and path.read_bytes() == b"mine"
    path.unlink()
    (tmp_path / "model.onnx.data").write_bytes(b"mine too")  # beside no .onnx: still the user's file
    with pytest.raises(UsageError, match=r"model\.onnx\.data already exists"):
        export_onnx(model, path, legacy=True)
    assert listing(tmp_path) == ["model.onnx.data"]
    export_onnx(model, path, legacy=True, force=True)
    assert listing(tmp_path) == ["model.onnx"]
    assert check_onnx(model, path).max_diff <= 1e-4


@pytest.mark.parametrize("name", ["model", "model.onx", "model.onnx.tmp", "sub/model.pt"])
def test_a_path_not_ending_in_onnx_is_refused(exported, tmp_path, name):
    model, _, _ = exported
    with pytest.raises(UsageError, match=r"\.onnx"):
        export_onnx(model, tmp_path / name, legacy=True)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("opset", [16, 11])
def test_an_opset_below_17_is_refused(exported, tmp_path, opset):
    model, _, _ = exported
    with pytest.raises(UsageError, match="opset"):
        export_onnx(model, tmp_path / "model.onnx", legacy=True, opset=opset)
    assert listing(tmp_path) == []


def test_report_schema(exported):
    model, path, report = exported
    assert isinstance(report, ParityReport)
    for data in (report.to_dict(), check_onnx(model, path).to_dict()):
        assert set(data) == REPORT_KEYS
        assert json.loads(json.dumps(data)) == data  # plain JSON types
        assert isinstance(data["file"], str) and data["file"] == str(path)
        assert isinstance(data["opset"], int) and data["opset"] == 18
        assert data["outputs"] == ["logits"]
        assert data["batch_sizes"] == [1, 4] and all(type(b) is int for b in data["batch_sizes"])
        assert isinstance(data["max_diff"], float) and 0 <= data["max_diff"] <= data["atol"]
        assert isinstance(data["atol"], float) and data["atol"] == 1e-4
        assert type(data["images"]) is int and data["images"] == 7  # scikit-image's sample photos
        assert isinstance(data["top1_agreement"], float) and data["top1_agreement"] == 1.0
        assert data["precision"] == "float32" and data["max_rel_diff"] is None and data["min_top1"] == 1.0
        assert 0 <= data["rel_diff_median"] <= data["rel_diff_max"] < 1e-4  # per image, of its logit range
    assert report.to_dict()["exporter"] == "torchscript"
    assert check_onnx(model, path).to_dict()["exporter"] is None  # a check exports nothing


def test_photos_passed_in_are_the_ones_compared(exported, monkeypatch):
    import vitidle.data

    model, path, _ = exported
    monkeypatch.setattr(vitidle.data, "sample_images", lambda *a, **k: pytest.fail("the default photos were used"))
    report = check_onnx(model, path, images=batch(model, 5))
    assert report.images == 5 and report.top1_agreement == 1.0
    with pytest.raises(UsageError, match=r"the photos are \[2, 3, 48, 48\]; the model takes \(B, 3, 32, 32\)"):
        check_onnx(model, path, images=torch.randn(2, 3, 48, 48))


# int8 and float16 files


def run_cli(*args):
    """`vitidle ARGS` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from vitidle_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    return info.value.code or 0, out.getvalue(), err.getvalue()


def float32_bytes(model):
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def initializer_bytes(path):
    """{numpy dtype name: bytes} of the file's weights."""
    from onnx import numpy_helper

    sizes = {}
    for t in onnx.load(str(path)).graph.initializer:
        a = numpy_helper.to_array(t)
        sizes[a.dtype.name] = sizes.get(a.dtype.name, 0) + a.nbytes
    return sizes


@pytest.fixture(scope="module")
def fashion_int8(tmp_path_factory):
    """(folder, JSON report) of `vitidle export --onnx --int8` on the shipped vit_fashion_mnist (real weights,
    keep 0.5): random-init scores nearly tie, so only trained weights show what int8 does to a selection."""
    folder = tmp_path_factory.mktemp("int8") / "fashion-idle"
    vitidle.save(vitidle.convert("vit_fashion_mnist", keep=0.5), folder)
    code, stdout, err = run_cli("export", folder, "--onnx", "--int8", "--legacy", "--json")
    assert code == 0, err
    return folder, json.loads(stdout)


def test_int8_export_passes_a_gate_that_fits_quantization(fashion_int8):
    folder, report = fashion_int8
    path = folder / "model.int8.onnx"
    assert listing(folder) == ["model.int8.onnx", "model.safetensors", "vitidle.json"]  # no float32 file left
    assert set(report) == REPORT_KEYS and report["file"] == str(path)
    assert report["precision"] == "int8" and report["atol"] is None
    assert report["max_rel_diff"] == 0.1 and report["min_top1"] == 0.85  # the int8 defaults
    assert 1e-4 < report["rel_diff_median"] <= 0.05  # int8 moves the logits (measured: 0.02)
    assert report["rel_diff_median"] <= report["rel_diff_max"]
    assert 0.85 <= report["top1_agreement"] <= 1 and report["images"] == 7
    model = vitidle.load(folder)
    # int8 weights, and no float32 copy of them: the selector's W_q and W_k are folded into one product
    sizes = initializer_bytes(path)
    assert sizes["int8"] > float32_bytes(model) / 4 * 0.9
    assert sizes.get("float32", 0) < float32_bytes(model) / 20
    assert path.stat().st_size < float32_bytes(model) / 2.5
    graph = onnx.load(str(path)).graph
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in graph.node}
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [onnx.TensorProto.FLOAT] * 2
    # the Python API measures the same
    again = check_onnx(model, path, precision="int8")
    assert (again.rel_diff_median, again.top1_agreement) == (report["rel_diff_median"], report["top1_agreement"])


def test_int8_check_only_prints_both_numbers_and_a_too_strict_bound_fails_in_one_line(fashion_int8):
    folder, report = fashion_int8
    before = (folder / "model.int8.onnx").read_bytes()
    code, stdout, err = run_cli("export", folder, "--onnx", "--int8", "--check-only")
    assert code == 0, err
    rows = {line[:13].rstrip(): line[13:] for line in stdout.splitlines()}
    assert "int8" in rows["onnx"] and "model.int8.onnx" in rows["onnx"]
    assert rows["rel diff"].startswith(f"{100 * report['rel_diff_median']:.3g}% of an image's output range")
    assert "(at most 10%)" in rows["rel diff"]
    assert rows["top-1 agree"] == f"{100 * report['top1_agreement']:.0f}% (at least 85%)"
    code, stdout, err = run_cli("export", folder, "--onnx", "--int8", "--check-only", "--max-rel-diff", "1e-5")
    assert code == 1 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("vitidle: error: ONNX parity failed: the median image's")
    assert "max_rel_diff 1e-05" in err and "Traceback" not in err
    assert (folder / "model.int8.onnx").read_bytes() == before


def test_a_too_strict_int8_gate_raises_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ParityError) as info:
        export_onnx(converted(), tmp_path / "model.int8.onnx", legacy=True, precision="int8", max_rel_diff=1e-6)
    message = str(info.value)
    assert "\n" not in message and "max_rel_diff 1e-06" in message
    assert info.value.max_diff > 0
    assert listing(tmp_path) == []  # no int8 file, no float32 file, no temp folder


def test_the_float32_gate_comes_first(tmp_path, monkeypatch):
    # bounds loose enough for any output: only the float32 gate can refuse this export of another model
    calls = perturbing_export(monkeypatch)
    with pytest.raises(ParityError, match=r"^the float32 export, before the int8 conversion: ONNX parity failed"):
        export_onnx(converted(), tmp_path / "model.onnx", legacy=True, precision="int8", max_rel_diff=1e9,
                    min_top1=0.0)
    assert calls and listing(tmp_path) == []


def test_float16_export(tmp_path):
    torch.manual_seed(0)
    model = converted()
    path = tmp_path / "model.fp16.onnx"
    report = export_onnx(model, path, precision="float16")  # the dynamo exporter
    assert listing(tmp_path) == ["model.fp16.onnx"] and report.exporter == "dynamo"
    assert report.precision == "float16" and report.atol is None
    assert (report.max_rel_diff, report.min_top1) == (0.01, 0.85)
    assert 0 < report.rel_diff_median <= 0.01 and report.top1_agreement >= 0.85
    sizes = initializer_bytes(path)
    assert sizes["float16"] > float32_bytes(model) / 2 * 0.9 and "float32" not in sizes
    graph = onnx.load(str(path)).graph
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [onnx.TensorProto.FLOAT] * 2
    x = batch(model, 3)  # float32 in, float32 out, close to PyTorch
    got, want = run_onnx(path, x), torch_out(model, x)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.01 * (want.max() - want.min())


def test_reduce_precision_errors_are_one_line(exported, tmp_path, monkeypatch):
    import onnxruntime.quantization

    _, path, _ = exported

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported node\ndetail")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", fail)
    with pytest.raises(OnnxError) as info:
        vitidle.export.reduce_precision(path, tmp_path / "model.int8.onnx", "int8")
    assert str(info.value) == "the int8 conversion of model.onnx failed: RuntimeError: unsupported node"
    assert listing(tmp_path) == []  # the folded intermediate is gone too


def test_sort_nodes_puts_readers_after_writers():
    from onnx import TensorProto, helper

    from vitidle.export import sort_nodes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Neg", ["b"], ["y"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Abs", ["x"], ["a"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    sort_nodes(graph)
    assert [n.op_type for n in graph.node] == ["Abs", "Relu", "Neg"]
    onnx.checker.check_model(helper.make_model(graph))
    cycle = helper.make_graph([helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])],
                              "c", [x], [y])
    with pytest.raises(OnnxError, match="cycle"):
        sort_nodes(cycle)


@pytest.mark.parametrize("kwargs,text", [
    ({"precision": "int4"}, "precision must be one of float32, int8, float16"),
    ({"precision": "int8", "min_top1": 1.5}, "min_top1"),
    ({"precision": "float16", "max_rel_diff": -1.0}, "max_rel_diff"),
])
def test_bad_gate_arguments_are_usage_errors(exported, tmp_path, kwargs, text):
    model, path, _ = exported
    with pytest.raises(UsageError, match=text):
        export_onnx(model, tmp_path / "model.onnx", legacy=True, **kwargs)
    with pytest.raises(UsageError, match=text):
        check_onnx(model, path, **kwargs)
    assert listing(tmp_path) == []


def test_int8_and_fp16_together_is_a_usage_error(tmp_path):
    code, _, err = run_cli("export", tmp_path, "--onnx", "--int8", "--fp16")
    assert code == 2 and "choose one of --int8 and --fp16" in err and err.count("\n") == 1
