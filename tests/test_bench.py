"""`vitidle.bench` and `vitidle bench`: the limit model, the report's schema and its arithmetic (no timing asserts)."""

import copy
import json
import time

import pytest
import torch
from conftest import images, tiny
from test_cli import TINY_ARGS, assert_one_error_line, run

import vitidle
from vitidle.bench import (
    TokenCount, bench, compile_limits, iters_for, limit_model, markdown_table, speed_row, time_interleaved,
)
from vitidle.errors import UsageError

ROW_KEYS = {
    "runtime", "batch_size", "dense_ms", "idle_ms", "limit_ms", "dense_img_s", "idle_img_s", "limit_img_s",
    "idle_speedup", "limit_speedup", "pct_of_limit",
}
REPORT_KEYS = {
    "model", "plan", "device", "device_name", "threads", "versions", "parameters", "frozen", "gmacs", "repeats",
    "warmup", "results",
}


@pytest.fixture
def pair():
    dense = tiny("deit_tiny_patch16_224", depth=4, img_size=64)
    return dense, vitidle.convert(copy.deepcopy(dense), 0.5)


@pytest.mark.parametrize("plan, counts", [
    (None, [17, 9, 5, 3]),  # 16 patches + class token; 0.5, 0.25, 0.125 after the dense first block: 8, 4, 2 kept
    ("1:0.5", [17, 9, 17, 17]),  # dense blocks after an idle one run on all tokens again
    ("1:0.25,2:0.5,3:1.0", [17, 5, 9, 17]),  # keep rising from block to block
])
def test_limit_model_runs_each_block_on_its_kept_count(pair, plan, counts):
    dense, idle = pair
    if plan:
        idle = vitidle.convert(copy.deepcopy(dense), plan=plan)
    limit = limit_model(dense, idle)
    seen = []
    for block in limit.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        limit(images(dense))
    assert seen == counts
    assert not any(isinstance(m, vitidle.TokenSelector) for m in limit.modules())
    macs = bench(dense, idle, batch_sizes=(1,), repeats=1, warmup=0, onnx=False)["gmacs"]
    assert macs["limit"] <= macs["idle"] < macs["dense"]


def test_report_gives_the_plan_as_it_runs(pair):
    dense, idle = pair
    idle.blocks[1].selector.num_keep = 16  # the knob, moved after convert
    report = bench(dense, idle, batch_sizes=(1,), repeats=1, warmup=0, onnx=False)
    assert report["plan"]["num_keep"] == [None, 16, 4, 2]


def test_limit_of_a_keep_1_model_is_the_dense_model(pair):
    dense, _ = pair
    limit = limit_model(dense, vitidle.convert(copy.deepcopy(dense), 1.0))
    x = images(dense)
    with torch.no_grad():
        torch.testing.assert_close(limit(x), dense(x))


def test_time_interleaved_alternates_and_keeps_every_round():
    calls = []
    samples = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, iters=2,
                          warmup=1, sync=lambda: calls.append("sync"), on_round=lambda: calls.append("round"))
    # the device is waited for after the warm-up and before every clock read; one tick per round
    assert calls == ["a", "b", "sync"] + ["a", "a", "sync", "b", "b", "sync", "round"] * 3
    assert set(samples) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in samples.values())


def test_speed_row_arithmetic():
    row = speed_row({"dense": [40.0], "idle": [25.0], "limit": [20.0]}, "pytorch", 4)
    assert set(row) == ROW_KEYS
    assert row["idle_speedup"] == 1.6 and row["limit_speedup"] == 2.0
    assert row["pct_of_limit"] == 80.0  # limit ms / idle ms
    assert row["dense_img_s"] == 100.0 and row["idle_img_s"] == 160.0


def test_speed_row_ratios_are_taken_within_rounds():
    # the machine slows down over three rounds; within each round idle is 1.25x the limit but once
    row = speed_row({"dense": [40.0, 80.0, 120.0], "idle": [25.0, 52.0, 75.0], "limit": [20.0, 40.0, 60.0]},
                    "pytorch", 1)
    assert row["idle_ms"] == 52.0 and row["limit_ms"] == 40.0  # medians over rounds
    assert row["pct_of_limit"] == 80.0  # not 40 / 52 = 76.9%, the ratio of the medians
    assert row["limit_speedup"] == 2.0 and row["idle_speedup"] == 1.6
    assert iters_for(1) == 16 and iters_for(16) == 1 and iters_for(64) == 1


def test_bench_report_schema_pytorch_and_onnxruntime(pair):
    dense, idle = pair
    report = bench(dense, idle, batch_sizes=(1, 3), repeats=1, warmup=0, legacy=True)
    assert set(report) == REPORT_KEYS
    assert [(r["runtime"], r["batch_size"]) for r in report["results"]] == [
        ("pytorch", 1), ("pytorch", 3), ("onnxruntime", 1), ("onnxruntime", 3)]
    for row in report["results"]:
        assert set(row) == ROW_KEYS
    assert report["threads"] == torch.get_num_threads()
    assert {"torch", "onnxruntime"} <= set(report["versions"])
    assert report["parameters"] == sum(p.numel() for p in dense.parameters())
    g = report["gmacs"]
    # the limit skips the selectors' scoring; both are far below dense
    assert g["limit"] <= g["idle"] < 0.7 * g["dense"]
    assert report["plan"]["num_keep"] == [None, 8, 4, 2]
    json.dumps(report)  # serialisable as is


def test_bench_refuses_cuda_options_it_cannot_honour(pair):
    dense, idle = pair
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            bench(dense, idle, device="cuda", repeats=1)
    with pytest.raises(UsageError, match="--device cuda only"):
        bench(dense, idle, cuda_graphs=True, repeats=1)


# --- torch.compile -------------------------------------------------------------------------------------------

def test_compiled_idle_model_equals_eager_on_cpu():
    """Inductor on CPU, one graph (fullgraph), the batch-1 path and the batched one: the same outputs to 1e-6
    and the same kept tokens. The first run here compiles C++ kernels (~20 s on 2 busy cores); later runs
    read torch's kernel cache."""
    torch.manual_seed(0)
    dense = tiny("deit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, embed_dim=64, num_heads=2)
    idle = vitidle.freeze(vitidle.convert(dense, 0.5))  # one idle block: 8 of 16 image tokens
    selector = idle.blocks[0].selector
    compiled = torch.compile(idle, fullgraph=True)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            eager, kept = idle(x), selector.kept_index
            selector.kept_index = None
            out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-6)
        assert torch.equal(selector.kept_index.sort(1).values, kept.sort(1).values)


class FakeCompile:
    """Stands in for torch.compile: records what was compiled and how; a model's first call at each input
    shape sleeps, as compiling does."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.compiled, self.events = seconds, [], []

    def __call__(self, model, **options):
        self.compiled.append((model, options))
        shapes = set()

        def run(x):
            if x.shape not in shapes:
                shapes.add(x.shape)
                self.events.append(("compile", id(model), x.shape[0]))
                time.sleep(self.seconds)
            return model(x)

        return run


def test_bench_compiles_all_three_alike_on_cpu_and_outside_the_clock(pair, monkeypatch):
    dense, idle = pair
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    real = vitidle.bench.time_interleaved
    monkeypatch.setattr(vitidle.bench, "time_interleaved",
                        lambda fns, *a, **k: (fake.events.append(("timing",)), real(fns, *a, **k))[1])
    report = bench(dense, idle, batch_sizes=(1, 2), repeats=1, warmup=0, onnx=False, compile=True)

    # dense, idle and the limit, each compiled once with the same options: the limit is compiled as dense is
    models = [m for m, _ in fake.compiled]
    assert len(models) == 3 and models[0] is dense and models[1] is idle
    assert any(isinstance(m, TokenCount) for m in models[2].modules())
    assert len({repr(sorted(o.items())) for _, o in fake.compiled}) == 1
    # every model compiles at each batch size before that batch size's clock starts
    assert fake.events == [*(("compile", id(m), 1) for m in models), ("timing",),
                           *(("compile", id(m), 2) for m in models), ("timing",)]
    assert report["warmup"] >= 2  # calls after the compiling one, before the clock
    for row in report["results"]:
        assert row["runtime"] == "torch.compile"
        assert set(row) == ROW_KEYS | {"compile_s"}
        assert set(row["compile_s"]) == {"dense", "idle", "limit"}
        assert min(row["compile_s"].values()) >= fake.seconds  # the compiling call is what it reports
    table = markdown_table(report["results"])
    assert table.splitlines()[0].endswith("| compile s dense / idle / limit |")
    json.dumps(report)


def test_compile_limits_keep_every_graph():
    """torch.compile stops compiling after 8 graphs of one function and runs it eager, which would time dense
    and the limit (one timm forward) eager in a long run. Within `compile_limits` each call gets its graph."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def add(x, n):
        return x + n

    torch._dynamo.reset()
    with compile_limits():
        fn = torch.compile(add, backend=backend, dynamic=False)
        for n in range(12):  # each constant is a graph of its own
            assert fn(torch.zeros(1), n).item() == n
    assert len(graphs) == 12
    torch._dynamo.reset()


# --- the command ---------------------------------------------------------------------------------------------

FAST = ["--repeats", "1", "--warmup", "0", "-b", "2"]


def test_bench_on_the_folder_convert_wrote(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "convert", *TINY_ARGS, "--keep", "0.5")
    assert code == 0, err
    code, out, err = run(capsys, "bench", *FAST, "--no-onnx", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == REPORT_KEYS
    assert [(r["runtime"], r["batch_size"]) for r in report["results"]] == [("pytorch", 2)]
    assert report["model"] == "deit_tiny_patch16_224"
    assert report["plan"]["num_keep"] == [None, 8, 4, 2]
    assert report["frozen"] is True  # the command times the model frozen for inference, unless --no-freeze
    code, out, err = run(capsys, "bench", *FAST, "--no-onnx", "--json", "--no-freeze")
    assert code == 0, err
    assert json.loads(out)["frozen"] is False


def test_bench_converts_on_the_fly_and_prints_a_table(capsys):
    threads = torch.get_num_threads()
    try:
        code, out, err = run(capsys, "bench", *TINY_ARGS, "--keep", "0.5", *FAST, "--legacy", "--threads", "1")
    finally:
        torch.set_num_threads(threads)  # the command sets it for the whole (here: the test) process
    assert code == 0, err
    assert "converted on the fly" in out
    assert "1 threads" in out
    rows = [line for line in out.splitlines() if line.startswith("| pytorch") or line.startswith("| onnxruntime")]
    assert [r.split("|")[1].strip() for r in rows] == ["pytorch", "onnxruntime"]
    assert all(r.rstrip(" |").endswith("%") for r in rows)


def test_bench_compile_on_cpu_prints_the_compile_times(capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", FakeCompile(0.1))
    code, out, err = run(capsys, "bench", *TINY_ARGS, "--keep", "0.5", *FAST, "--no-onnx", "--compile")
    assert code == 0, err
    assert "torch.compile" in next(line for line in out.splitlines() if line.startswith("compile"))
    (line,) = [line for line in out.splitlines() if line.startswith("| torch.compile")]
    seconds = [float(v) for v in line.split("|")[-2].split("/")]  # compile seconds of dense / idle / limit
    assert len(seconds) == 3 and min(seconds) > 0


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "CUDA"),
    (["--device", "cuda:7"], "CUDA"),
    (["--device", "foo"], "use cpu, cuda or cuda:N"),
    (["--device", "mps"], "use cpu, cuda or cuda:N"),
    (["--cuda-graphs"], "--device cuda"),
    (["--keep", "0"], "keep"),
])
def test_bench_bad_input_is_one_line_exit_2(capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(capsys, "bench", *TINY_ARGS, *FAST, "--no-onnx", *args)
    assert code == 2
    assert_one_error_line(err)
    assert message in err


def test_bench_model_and_folder_together_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "bench", str(tmp_path), *TINY_ARGS)
    assert code == 2
    assert_one_error_line(err)
    assert "either MODEL or --model" in err


def test_bench_without_a_model_folder_here(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "bench", *FAST)
    assert code == 2
    assert_one_error_line(err)
    assert "vitidle convert" in err


def test_bench_refuses_conversion_options_for_a_model_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "convert", *TINY_ARGS, "--keep", "0.5")
    assert code == 0, err
    code, _, err = run(capsys, "bench", *FAST, "--keep", "0.1", "--plan", "1:0.5")
    assert code == 2
    assert_one_error_line(err)
    assert "--keep, --plan only apply with --model" in err


def test_markdown_table_formats_every_row():
    row = speed_row({"dense": [40.0], "idle": [25.0], "limit": [20.0]}, "onnxruntime", 4)
    lines = markdown_table([row, {**row, "runtime": "pytorch"}]).splitlines()
    assert lines[0].startswith("| runtime | batch | dense ms") and lines[1].count("---") == 10
    assert lines[2] == "| onnxruntime | 4 | 40.00 | 25.00 | 20.00 | 100.0 | 160.0 | 1.60x | 2.00x | 80.0% |"
    assert lines[3].startswith("| pytorch |")
    compiled = {**row, "runtime": "torch.compile", "compile_s": {"dense": 12.34, "idle": 20.0, "limit": 9.96}}
    lines = markdown_table([compiled, row]).splitlines()
    assert lines[1].count("---") == 11
    assert lines[2].endswith("| 80.0% | 12.3 / 20.0 / 10.0 |") and lines[3].endswith("| 80.0% | - |")


def test_bench_prints_the_plan_the_model_runs(capsys, tmp_path):
    model = vitidle.convert("deit_tiny", keep=0.5, pretrained=False, model_kwargs={"depth": 4, "img_size": 64})
    model.blocks[3].selector.num_keep = 1  # the knob moved after the conversion, then saved
    vitidle.save(model, tmp_path / "m")
    code, out, err = run(capsys, "bench", tmp_path / "m", *FAST, "--no-onnx")
    assert code == 0, err
    plan = next(line for line in out.splitlines() if line.startswith("plan"))
    assert "1: 0.5 (8), 2: 0.25 (4), 3: 0.0625 (1)" in plan
