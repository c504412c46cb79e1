"""Do idling and int8 stack? Dense and idle, float32 and int8 (and float16), in onnxruntime on this machine's CPU.

Speed (random-init weights; each file parity-checked as `vitidle export --onnx [--int8]` checks it):

    python benchmarks/int8.py                          # deit_small, keep 0.7 and 0.5, batch 1 and 16
    python benchmarks/int8.py --repeats 30 --fp16      # float16 files too
    python benchmarks/int8.py --model deit_tiny --model-arg depth=2 --model-arg img_size=32 --repeats 2  # a smoke test

Per keep ratio and batch size, one Markdown row: ms of each file, timed in turns (`vitidle.bench.time_interleaved`),
and speedups over dense float32 (medians of the ratios within a round): idling alone, int8 alone, both, and
`stack` = both / (idling alone x int8 alone), 1.0 where the two savings multiply.

Accuracy (`--accuracy`): the shipped vit_fashion_mnist on the 10k Fashion-MNIST test images (Debian's
dataset-fashion-mnist), dense and idle at keep 0.7 and 0.5 without finetuning: top-1 of PyTorch float32, of the
onnxruntime files in float32, int8 and float16, and of the PyTorch model in float16 and bfloat16, each with its
top-1 agreement with PyTorch float32, and for PyTorch half precision the share of images whose kept set is the
float32 one, per idle layer.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import yaml

import vitidle
from vitidle.bench import iters_for, markdown_table, time_interleaved
from vitidle.engine.discover import input_size
from vitidle.export import INPUT_NAME, check_onnx, export_onnx, ort_session, reduce_precision
from vitidle.idle import idle_selectors
from vitidle.models import create

SUFFIX = {"float32": "", "int8": ".int8", "float16": ".fp16"}


def export_all(model: torch.nn.Module, folder: Path, name: str, precisions: list[str], legacy: bool,
               images: torch.Tensor | None = None, min_top1: float | None = None) -> dict[str, Path]:
    """`name.onnx` (float32) and its reduced copies, each through its parity gate; the float32 export is done once.
    `images`: the gate's photos (default: scikit-image's); `min_top1`: the reduced copies' top-1 bound (default:
    the gate's)."""
    paths = {"float32": folder / f"{name}.onnx"}
    export_onnx(model, paths["float32"], legacy=legacy, images=images)
    for precision in precisions:
        if precision != "float32":
            paths[precision] = folder / f"{name}{SUFFIX[precision]}.onnx"
            reduce_precision(paths["float32"], paths[precision], precision)
            check_onnx(model, paths[precision], precision=precision, images=images, min_top1=min_top1)
    return paths


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    kwargs = {k: yaml.safe_load(v) for k, _, v in (a.partition("=") for a in args.model_arg)}
    dense = create(args.model, pretrained=False, **kwargs).eval()
    size = input_size(dense)
    photos = torch.randn(4, *size)  # random weights: the gate's top-1 on photos means nothing, its values do
    top1 = 0.0  # near-tied random logits: int8 may flip a top-1 without being wrong; the value bound still holds
    precisions = ["float32", "int8"] + ["float16"] * args.fp16
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {f"dense {p}": path for p, path in export_all(dense, folder, "dense", precisions, args.legacy,
                                                               photos, top1).items()}
        sizes = {key: path.stat().st_size for key, path in files.items()}
        for keep in args.keep:
            idle = vitidle.freeze(vitidle.convert(copy.deepcopy(dense), keep, model_kwargs=kwargs).eval())
            files.update({f"idle {p}": path for p, path in
                          export_all(idle, folder, f"idle{keep}", precisions, args.legacy, photos, top1).items()})
            sizes.update({f"idle {keep} {p}": files[f"idle {p}"].stat().st_size for p in precisions})
            sessions = {key: ort_session(path, threads=threads) for key, path in files.items()}
            for batch in args.batch:
                x = torch.randn(batch, *size).numpy()
                fns = {key: (lambda s=s, x=x: s.run(None, {INPUT_NAME: x})) for key, s in sessions.items()}
                samples = time_interleaved(fns, repeats=args.repeats, iters=iters_for(batch), warmup=args.warmup)
                rows.append(row(samples, keep, batch, precisions))
    print(f"{args.model}, random init, onnxruntime {onnxruntime.__version__} CPU, {threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; median of {args.repeats} "
          f"interleaved rounds\n")
    columns = {"keep": "{keep}", "batch": "{batch}", **{f"{k} ms": f"{{{k.replace(' ', '_')}:.2f}}" for k in
                                                         (f"{m} {p}" for m in ("dense", "idle") for p in precisions)},
               "idling": "{idling:.2f}x", "int8": "{int8:.2f}x", "both": "{both:.2f}x", "stack": "{stack:.2f}"}
    print(markdown_table(rows, columns))
    print("\nfile sizes (MiB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items()))


def row(samples: dict[str, list[float]], keep: float, batch: int, precisions: list[str]) -> dict:
    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    idling, int8, both = ratio("dense float32", "idle float32"), ratio("dense float32", "dense int8"), \
        ratio("dense float32", "idle int8")
    return {"keep": keep, "batch": batch, **{k.replace(" ", "_"): statistics.median(v) for k, v in samples.items()},
            "idling": idling, "int8": int8, "both": both, "stack": both / (idling * int8)}


def accuracy(args: argparse.Namespace) -> None:
    from vitidle.train.data import FashionMNIST

    data = FashionMNIST(split="test")
    limit = args.limit or len(data)
    config = vitidle.convert("vit_fashion_mnist", keep=0.7).vitidle_config["input"]
    mean, std = config["mean"][0], config["std"][0]
    x = ((torch.from_numpy(data.images[:limit].copy()).float() / 255 - mean) / std).unsqueeze(1)  # the eval transform
    labels = data.labels[:limit]

    def predict(fn) -> np.ndarray:
        return np.concatenate([np.asarray(fn(x[i:i + 500])).argmax(-1) for i in range(0, len(x), 500)])

    print(f"vit_fashion_mnist (shipped weights, no finetune), the first {limit} Fashion-MNIST test images; onnxruntime "
          f"{onnxruntime.__version__}, torch {torch.__version__}\n")
    print("| model | runtime | top-1 | top-1 agreement with PyTorch float32 | kept set as in float32, per idle layer |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for keep in (None, 0.7, 0.5):
            model = create("vit_fashion_mnist", pretrained=True).eval() if keep is None else \
                vitidle.convert("vit_fashion_mnist", keep=keep).eval()
            name = "dense" if keep is None else f"idle {keep}"
            with torch.no_grad():
                reference = predict(model)
                kept = kept_sets(model, x)
            results = [("PyTorch float32", reference, "")]
            paths = export_all(model, Path(tmp), name.replace(" ", ""), ["float32", "int8", "float16"], args.legacy)
            for precision, path in paths.items():
                session = ort_session(path)
                run = (lambda b, s=session: s.run(None, {INPUT_NAME: b.numpy()})[0])
                results.append((f"onnxruntime {precision}", predict(run), ""))
            for dtype in (torch.float16, torch.bfloat16):
                half = copy.deepcopy(model).to(dtype)
                with torch.no_grad():
                    got = predict(lambda b, half=half, dtype=dtype: half(b.to(dtype)).float())
                    same = [f"{100 * (a == b).all(1).float().mean():.1f}%"
                            for a, b in zip(kept, kept_sets(half, x.to(dtype)), strict=True)]
                results.append((f"PyTorch {str(dtype).split('.')[1]}", got, ", ".join(same) or "-"))
            for runtime, predictions, same in results:
                print(f"| {name} | {runtime} | {100 * (predictions == labels).mean():.2f} | "
                      f"{100 * (predictions == reference).mean():.2f} | {same} |")


def kept_sets(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per idle layer, the sorted kept positions (images, P + K) of every image."""
    selectors = idle_selectors(model)
    out: list[list[torch.Tensor]] = [[] for _ in selectors]
    for i in range(0, len(x), 500):
        model(x[i:i + 500])
        for j, s in enumerate(selectors):
            out[j].append(s.kept_index.sort(1).values)
    return [torch.cat(o) for o in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="timm.create_model")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="time float16 files too")
    parser.add_argument("--legacy", action="store_true", help="TorchScript exporter")
    parser.add_argument("--accuracy", action="store_true", help="top-1 on Fashion-MNIST instead of speed")
    parser.add_argument("--limit", type=int, help="--accuracy: the first N test images")
    args = parser.parse_args()
    accuracy(args) if args.accuracy else speed(args)


if __name__ == "__main__":
    main()
