"""What selection costs in context: the idle model against the same model with its selection fixed.

    python benchmarks/selection_cost.py                 # DeiT-S, keep 0.5, batch 1, 50 rounds
    python benchmarks/selection_cost.py --profile       # and torch.profiler's idle - limit per aten op
    python benchmarks/selection_cost.py --model hf:./vit-s-hf --batch 16   # a transformers save_pretrained folder

`fixed rows` replaces each selector by the rows it chose on this input, so the model still moves
tokens (two gathers, one merge) and norms all N tokens, but scores nothing. `% of limit` as in
`benchmarks/speed.py`: medians of the ratios within each interleaved round.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import copy
import statistics

import timm
import torch

import vitidle
from vitidle import hf
from vitidle.bench import limit_model, time_interleaved
from vitidle.idle import PositionalSelector, idle_selectors


def with_fixed_rows(idle: torch.nn.Module, x: torch.Tensor, N: int) -> torch.nn.Module:
    """A copy of `idle` (N tokens) whose selectors return the rows `idle` chose for `x`, without scoring."""
    fixed = copy.deepcopy(idle)
    idle(x)
    B = x.shape[0]
    for mine, theirs in zip(idle_selectors(fixed), idle_selectors(idle)):
        index = theirs.kept_index  # B, P + K positions; the blocks take rows of (B * N, C), or positions at B == 1
        if isinstance(mine, PositionalSelector):  # its blocks take the positions, and make the rows themselves
            rows = index
        else:
            rows = index.flatten() if B == 1 else (index + torch.arange(0, B * N, N).unsqueeze(1)).flatten()
        mine.forward = lambda *args, rows=rows: rows
    return fixed


def op_times(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, collections.Counter]:
    """Self CPU µs per forward of each aten op, per model, from one profile of interleaved forwards."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            for name, model in models.items():
                with record_function(name):
                    model(x)
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name in models)
    starts = [s[0] for s in spans]
    times = {name: collections.Counter() for name in models}
    for e in events:
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if e.name.startswith("aten::") and i >= 0 and e.time_range.end <= spans[i][1]:
            times[spans[i][2]][e.name] += e.self_cpu_time_total / rounds
    for name in models:
        times[name]["(wall)"] = sum(end - start for start, end, n in spans if n == name) / rounds
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    if hf.is_hf_name(args.model):  # a save_pretrained folder, hf:./folder: its logits, as `vitidle bench` times it
        dense = hf.create(args.model).eval()
    else:
        dense = timm.create_model(args.model, pretrained=False).eval()
    idle = vitidle.freeze(vitidle.convert(copy.deepcopy(dense), args.keep).eval())
    x = torch.randn(args.batch, *idle.vitidle_config["input"]["input_size"])
    N, limit = idle.vitidle_config["layout"]["num_tokens"], limit_model(dense, idle)
    idle = hf.tensor_output(idle)  # (a sample forward at batch 1: before the rows are fixed for x)
    models = {"idle": idle, "fixed rows": with_fixed_rows(idle, x, N), "limit": hf.tensor_output(limit)}
    assert torch.equal(models["fixed rows"](x), models["idle"](x)), "fixed rows must compute what idle computes"
    samples = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.repeats,
                               iters=16 if args.batch == 1 else 1)
    print(f"{args.model}, keep {args.keep}, batch {args.batch}, {args.repeats} rounds, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | ms | % of limit |\n|---|---|---|")
    for name, times in samples.items():
        pct = statistics.median(lim / t * 100 for lim, t in zip(samples["limit"], times))
        print(f"| {name} | {statistics.median(times):.2f} | {pct:.1f}% |")
    if args.profile:
        times = op_times({"idle": models["idle"], "limit": models["limit"]}, x, 40)
        diff = {op: times["idle"][op] - times["limit"][op] for op in times["idle"] | times["limit"]}
        print("\n| aten op (torch.profiler, 40 forwards) | idle - limit, µs per forward |\n|---|---|")
        for op in sorted(diff, key=lambda op: -abs(diff[op]))[:12]:
            print(f"| {op} | {diff[op]:+.0f} |")


if __name__ == "__main__":
    main()
