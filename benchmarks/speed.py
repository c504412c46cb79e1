"""Dense vs converted vs the limit of idling, on this machine's CPU. Prints a Markdown table.

    python benchmarks/speed.py                      # deit_small, keep 0.7 and 0.5, batch 1 and 16
    python benchmarks/speed.py --keep 0.7 --batch 16 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import platform

import timm
import torch

import vitidle
from vitidle.bench import speed_vs_limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    print(f"{args.model}, random init, fp32, torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print("| keep | batch | dense ms | idle ms | limit ms | idle speedup | limit speedup | % of limit |")
    print("|---|---|---|---|---|---|---|---|")
    for keep in args.keep:
        idle = vitidle.convert(copy.deepcopy(dense), keep).eval()
        for batch in args.batch:
            iters = max(1, args.iters * 4 // batch)
            r = speed_vs_limit(dense, idle, batch, repeats=args.repeats, iters=iters)
            print(f"| {keep} | {batch} | {r['dense_ms']:.2f} | {r['idle_ms']:.2f} | {r['limit_ms']:.2f} | "
                  f"{r['idle_speedup']:.2f}x | {r['limit_speedup']:.2f}x | {r['pct_of_limit']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
