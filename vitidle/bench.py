"""Wall-clock speed against the dense model and against the limit of idling, in PyTorch and onnxruntime.

The limit runs every block on its kept token count with no selection at all (the image tokens
are simply cut to P + K at each stage), so `limit ms / idle ms` says how much of the possible
speedup the converted model reaches. CPU speed drifts 5-15% within a process, so the models are
timed interleaved (dense, idle, limit, repeat) and medians are compared.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hf
from .engine.discover import discover, position_bias, specialized_args, trace_inline
from .engine.rewrite import accept_pinned, config_of, num_keep_of
from .errors import UsageError
from .export import INPUT_NAME, export_onnx, ort_session
from .idle import idle_selectors


class TokenCount(nn.Module):
    """Set the sequence to `num_tokens` tokens: cut it to its first ones, or pad it with zeros where a block
    runs on more tokens than the one before (a dense block after idle ones). The limit's stand-in for
    selection: it times the blocks at their counts; its outputs are not the idle model's."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        if N >= self.num_tokens:
            return x[:, : self.num_tokens].contiguous()
        return F.pad(x, (0, 0, 0, self.num_tokens - N))


class PositionCount(nn.Module):
    """A block run on `num_tokens` tokens (`TokenCount`) whose position inputs are cut to them as well: a
    rotary table of the image tokens (…, N - P, E) to its first rows, a bias over all tokens (…, N, N) to its
    first rows and columns. The limit of a block that takes positions (timm's Eva, BEiT)."""

    def __init__(self, block: nn.Module, num_tokens: int, all_tokens: int, num_prefix: int):
        super().__init__()
        self.count, self.block = TokenCount(num_tokens), block
        self.all_tokens, self.num_prefix = all_tokens, num_prefix

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.block(self.count(x), *args, **{k: self._cut(v) for k, v in kwargs.items()})

    def _cut(self, value):
        n, N, P = self.count.num_tokens, self.all_tokens, self.num_prefix
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return value
        if tuple(value.shape[-2:]) == (N, N):
            return value[..., :n, :n]
        return value[..., : n - P, :] if value.shape[-2] == N - P else value


def bias_cut_block(block: nn.Module, num_tokens: int, all_tokens: int, pinned: dict) -> nn.Module:
    """A block whose attention computes a position bias of its own (BEiT, relpos ViTs), traced through its
    attention with that bias cut to its first `num_tokens` rows and columns: the block, runnable on fewer tokens."""
    gm = trace_inline(block, {**specialized_args(block.forward), **pinned})
    bias = position_bias(gm, all_tokens)
    with gm.graph.inserting_after(bias):
        cut = gm.graph.call_function(operator.getitem, (bias, (Ellipsis, slice(None, num_tokens), slice(None, num_tokens))))
    bias.replace_all_uses_with(cut, delete_user_cb=lambda user: user is not cut)
    accept_pinned(gm, pinned)
    gm.recompile()
    return gm


def limit_model(dense: nn.Module, idle: nn.Module) -> nn.Module:
    """A copy of `dense` whose blocks run on the token counts of `idle`'s plan, with no selection cost."""
    if hf.is_hf_model(dense):  # transformers layers take masks and return tuples: they get a class of their own
        return hf.limit_model(dense, idle)
    config = config_of(idle)
    limit = copy.deepcopy(dense)
    num_prefix = config["layout"]["num_prefix"]
    current = num_tokens = config["layout"]["num_tokens"]
    layout = None
    for name, num_keep in zip(config["layout"]["blocks"], num_keep_of(idle)):
        n = num_tokens if num_keep is None else min(num_prefix + num_keep, num_tokens)
        block = limit.get_submodule(name)
        if len(inspect.signature(block.forward).parameters) > 1:  # it takes positions: each block cuts its own
            layout = layout or discover(dense)
            if layout.inner_bias and n < num_tokens:
                block = bias_cut_block(block, n, num_tokens, dict(layout.pinned))
            parent_name, _, child = name.rpartition(".")
            setattr(limit.get_submodule(parent_name), child, PositionCount(block, n, num_tokens, num_prefix))
            current = n
        elif n != current:  # only where the count changes: once per stage
            parent_name, _, child = name.rpartition(".")
            parent = limit.get_submodule(parent_name)
            setattr(parent, child, nn.Sequential(TokenCount(n), getattr(parent, child)))
            current = n
    return limit.eval()


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 15,
    iters: int = 5,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
    on_round: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """ms per call of each function in each of `repeats` rounds; one round times each in turn.

    Timed in turns, drift hits all of them alike, and ratios within a round cancel it.
    `sync` waits for queued device work (torch.cuda.synchronize) before the clock is read.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            samples[key].append((time.perf_counter() - start) * 1e3 / iters)
        on_round()
    return samples


def speed_row(samples: dict[str, list[float]], runtime: str, batch_size: int) -> dict:
    """One result row: median ms and images/s of dense, idle and limit, speedups, and % of the limit's speedup.

    Speedups and % of the limit are medians of the ratios within each round (`time_interleaved`),
    which drift between rounds does not move; ms are medians over rounds.
    """
    ms = {k: statistics.median(v) for k, v in samples.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    return {
        "runtime": runtime,
        "batch_size": batch_size,
        **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
        **{f"{k}_img_s": round(1e3 * batch_size / v, 2) for k, v in ms.items()},
        "idle_speedup": round(ratio("dense", "idle"), 4),
        "limit_speedup": round(ratio("dense", "limit"), 4),
        "pct_of_limit": round(100 * ratio("limit", "idle"), 2),
    }


def iters_for(batch_size: int) -> int:
    """Calls per timed sample: about 16 images' worth, so a sample is neither tiny nor long."""
    return max(1, 16 // batch_size)


def bench(
    dense: nn.Module,
    idle: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 15,
    warmup: int = 3,
    onnx: bool = True,
    legacy: bool = False,
    device: str = "cpu",
    cuda_graphs: bool = False,
    compile: bool = False,
    progress: bool = False,
) -> dict:
    """Time `dense`, `idle` and their limit in PyTorch eager (and onnxruntime) and report the speedups.

    `idle` is timed as given; `freeze` it for inference speed (the report's `frozen` says which).
    One row per runtime and batch size (see `speed_row`). onnxruntime runs on CPU with as many
    threads as torch; its three models are exported the same way (`export.export_onnx`, parity
    gate included). On CUDA the clock waits for the device and `cuda_graphs` replays a captured
    graph per model and batch size; onnxruntime is CPU-only here and is skipped.

    `compile` (CPU or CUDA) times all three models under `torch.compile` (inductor, static
    shapes), so the limit is the compiled dense blocks on the kept token counts: like for like.
    Each model is compiled at each batch size by one untimed first call, whose seconds the row's
    `compile_s` gives; its rows' runtime is `torch.compile`.

    >>> import timm, vitidle
    >>> dense = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32)
    >>> r = bench(dense, vitidle.convert(copy.deepcopy(dense), 0.5), batch_sizes=(2,), repeats=1, onnx=False)
    >>> [(row["runtime"], row["batch_size"]) for row in r["results"]], r["gmacs"]["idle"] < r["gmacs"]["dense"]
    ([('pytorch', 2)], True)
    """
    from .flops import count_macs

    device = check_device(device)
    cuda = device.type == "cuda"
    if cuda_graphs and not cuda:
        raise UsageError("CUDA graphs are offered with --device cuda only")
    if compile:
        warmup = max(warmup, 2)  # calls after the compiling one, before the clock
    dense, idle = dense.eval(), idle.eval()
    limit = limit_model(dense, idle)
    models = {"dense": dense, "idle": idle, "limit": limit}
    config = config_of(idle)
    report = {
        "model": config["base_model"],
        "plan": {**config["plan"], "num_keep": num_keep_of(idle)},  # as it runs now (the knob may have moved)
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
        "parameters": sum(p.numel() for p in idle.parameters()),
        "frozen": any(s.frozen for s in idle_selectors(idle)),
        "gmacs": {k: round(count_macs(m) / 1e9, 3) for k, m in models.items()},
        "repeats": repeats,
        "warmup": warmup,
        "results": [],
    }
    if onnx and cuda:
        onnx = False
        report["onnxruntime_skipped"] = "onnxruntime runs on CPU here; pass --device cpu to time it"
    size = tuple(config["input"]["input_size"])
    total = repeats * len(batch_sizes) * (2 if onnx else 1)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="bench", unit="round", disable=not progress, leave=False) as bar, \
            torch.cuda.device(device) if cuda else contextlib.nullcontext(), \
            compile_limits() if compile else contextlib.nullcontext():
        on_round = bar.update
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        runners = torch_runners(models, device, cuda_graphs, compile, sync)
        for b in batch_sizes:
            bar.set_description(f"pytorch{', compiling' * compile}, batch {b}")
            fns, compile_s = runners(torch.randn(b, *size))
            bar.set_description(f"pytorch, batch {b}")
            with torch.inference_mode():
                samples = time_interleaved(fns, repeats, iters_for(b), warmup, sync, on_round)
            row = speed_row(samples, "torch.compile" if compile else "pytorch", b)
            report["results"].append({**row, "compile_s": compile_s} if compile else row)
        if onnx:
            import onnxruntime

            report["versions"]["onnxruntime"] = onnxruntime.__version__
            with tempfile.TemporaryDirectory() as tmp:
                bar.set_description("onnxruntime: exporting")
                sessions = onnx_sessions(models, Path(tmp), legacy)
                for b in batch_sizes:
                    bar.set_description(f"onnxruntime, batch {b}")
                    feed = {INPUT_NAME: torch.randn(b, *size).numpy()}
                    fns = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
                    samples = time_interleaved(fns, repeats, iters_for(b), warmup, on_round=on_round)
                    report["results"].append(speed_row(samples, "onnxruntime", b))
    return report


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, if PyTorch can time on it here: the CPU or an existing CUDA device."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA device here")
        if (parsed.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def torch_runners(models: dict[str, nn.Module], device: torch.device, cuda_graphs: bool, compile: bool,
                  sync: Callable[[], None] = lambda: None):
    """For a batch x: one zero-argument callable per model that runs it on `device`, and with `compile`
    the seconds of each model's first call on x, which compiles it (else None)."""
    on_device = {k: copy.deepcopy(m).to(device) for k, m in models.items()} if device.type == "cuda" else models
    if compile:  # the same options for all three, so the limit is compiled as the dense model is
        on_device = {k: torch.compile(m, dynamic=False) for k, m in on_device.items()}

    def runners(x: torch.Tensor) -> tuple[dict[str, Callable[[], object]], dict[str, float] | None]:
        x = x.to(device)
        compile_s = first_call_seconds(on_device, x, sync) if compile else None
        if not cuda_graphs:
            return {k: (lambda m=m: m(x)) for k, m in on_device.items()}, compile_s
        return {k: capture_cuda_graph(m, x) for k, m in on_device.items()}, compile_s

    return runners


def first_call_seconds(models: dict[str, nn.Module], x: torch.Tensor, sync: Callable[[], None]) -> dict[str, float]:
    """Seconds of each model's first call on x, under inference mode as the timed calls: a compiled
    model compiles there (one graph per input shape), outside the clock."""
    seconds = {}
    with torch.inference_mode():
        for key, model in models.items():
            start = time.perf_counter()
            model(x)
            sync()
            seconds[key] = round(time.perf_counter() - start, 2)
    return seconds


@contextlib.contextmanager
def compile_limits(graphs: int = 64):
    """Let torch.compile keep `graphs` graphs per function while benchmarking. Past its default (8) it
    would silently run the rest eager: dense and limit share timm's forward, and each batch size and
    each call of `bench` in one process adds graphs. Where torch can, a limit hit raises instead."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    settings = {name: max(graphs, getattr(config, name))}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    with config.patch(**settings):
        yield


def capture_cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Record one forward on the static input `x` as a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):  # warm up allocator and kernels on a side stream, as capture requires
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = model(x)
    # the graph reads x's and writes out's memory: the closure keeps both alive
    return lambda: (graph.replay(), x, out)[2]


def onnx_sessions(models: dict[str, nn.Module], folder: Path, legacy: bool) -> dict:
    """Export each model to `folder` (parity-checked) and open an onnxruntime session with torch's thread count."""
    sessions = {}
    size = config_of(models["idle"])["input"]["input_size"]
    for key, model in models.items():
        path = folder / f"{key}.onnx"
        export_onnx(model, path, legacy=legacy, images=torch.randn(4, *size))
        sessions[key] = ort_session(path, threads=torch.get_num_threads())
    return sessions


COLUMNS = {
    "runtime": "{runtime}", "batch": "{batch_size}", "dense ms": "{dense_ms:.2f}", "idle ms": "{idle_ms:.2f}",
    "limit ms": "{limit_ms:.2f}", "dense img/s": "{dense_img_s:.1f}", "idle img/s": "{idle_img_s:.1f}",
    "idle speedup": "{idle_speedup:.2f}x", "limit speedup": "{limit_speedup:.2f}x", "% of limit": "{pct_of_limit:.1f}%",
}


COMPILE_COLUMN = {"compile s dense / idle / limit": "{compile_s[dense]:.1f} / {compile_s[idle]:.1f} / {compile_s[limit]:.1f}"}


def markdown_table(results: list[dict], columns: dict[str, str] = COLUMNS) -> str:
    """The result rows of a `bench` report as a Markdown table: header -> format string of a row.

    Where rows were compiled (`compile_s`), a last column gives each model's compile seconds ("-" in the others).
    """
    if any("compile_s" in row for row in results):
        columns = {**columns, **COMPILE_COLUMN}

    def cell(fmt: str, row: dict) -> str:
        return "-" if "{compile_s" in fmt and "compile_s" not in row else fmt.format(**row)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(f, row) for f in columns.values()) + " |" for row in results]
    return "\n".join(lines)
