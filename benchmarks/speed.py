"""Dense vs converted vs the limit of idling, PyTorch eager and onnxruntime, on this machine's CPU.

Prints one Markdown table over keep ratios (`vitidle bench` does one model at a time):

    python benchmarks/speed.py                      # deit_small, keep 0.7 and 0.5, batch 1 and 16
    python benchmarks/speed.py --keep 0.7 --batch 16 --repeats 30 --no-onnx
    python benchmarks/speed.py --device cuda --cuda-graphs --batch 1 16 256
    python benchmarks/speed.py --compile --no-onnx  # dense, idle and limit all under torch.compile (CPU too)
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

import vitidle
from vitidle.bench import COLUMNS, bench, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--legacy", action="store_true", help="TorchScript exporter for onnxruntime")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for PyTorch (onnxruntime runs on CPU)")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile all three models alike, compiled outside the clock (CPU or CUDA)")
    parser.add_argument("--no-freeze", action="store_true", help="time the idle model without vitidle.freeze")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    rows = []
    for keep in args.keep:
        idle = vitidle.freeze(vitidle.convert(copy.deepcopy(dense), keep).eval(), not args.no_freeze)
        r = bench(dense, idle, batch_sizes=tuple(args.batch), repeats=args.repeats, onnx=not args.no_onnx,
                  legacy=args.legacy, device=args.device, cuda_graphs=args.cuda_graphs, compile=args.compile,
                  progress=True)
        rows += [{**row, "keep": keep} for row in r["results"]]
    mode = ", idle frozen" * (not args.no_freeze) + " + CUDA graphs" * args.cuda_graphs + " + torch.compile" * args.compile
    print(f"{args.model}, random init, fp32{mode}, {r['threads']} threads, {r['device_name']}, "
          + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f", timm {timm.__version__}\n")
    columns = {k: v for k, v in COLUMNS.items() if "img/s" not in k}
    print(markdown_table(rows, {"runtime": columns.pop("runtime"), "keep": "{keep}", **columns}))


if __name__ == "__main__":
    main()
