"""Where onnxruntime spends the idle model's extra time: kernel time per op type, idle - limit.

    python benchmarks/ort_profile.py                  # DeiT-S, keep 0.5, batch 16, 20 rounds
    python benchmarks/ort_profile.py --keep 0.7 --batch 1

The idle model and its limit are exported as `vitidle bench` exports them, and three sessions run
interleaved in one process with onnxruntime's profiler on: idle, limit, and the limit again. The
last column (limit again - limit: the same graph twice) is the noise floor of a row.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

import vitidle
from vitidle.bench import limit_model
from vitidle.export import INPUT_NAME, export_onnx


def kernel_ms(session: ort.InferenceSession, runs: int) -> collections.Counter:
    """ms per run of each op type, from the session's profile."""
    times = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    idle = vitidle.freeze(vitidle.convert(copy.deepcopy(dense), args.keep).eval())
    models = {"idle": idle, "limit": limit_model(dense, idle)}
    size = idle.vitidle_config["input"]["input_size"]
    feed = {INPUT_NAME: np.random.default_rng(0).standard_normal((args.batch, *size), dtype=np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, file in [("idle", "idle"), ("limit", "limit"), ("limit again", "limit")]:
            path = Path(tmp) / f"{file}.onnx"
            if not path.exists():
                export_onnx(models[file], path, images=torch.randn(4, *size))
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / name.replace(" ", "_"))
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(args.repeats):  # the first rounds warm up, and count like the rest
            for session in sessions.values():
                session.run(None, feed)
        ms = {name: kernel_ms(session, args.repeats) for name, session in sessions.items()}

    print(f"{args.model}, keep {args.keep}, batch {args.batch}, {args.repeats} interleaved runs, "
          f"{torch.get_num_threads()} threads, onnxruntime {ort.__version__}\n")
    print("| op | idle ms | limit ms | idle - limit | limit again - limit |\n|---|---|---|---|---|")
    ops = sorted(ms["idle"] | ms["limit"], key=lambda op: ms["limit"][op] - ms["idle"][op])
    for op in ops + ["(all)"]:
        idle_ms, limit_ms, again_ms = (sum(m.values()) if op == "(all)" else m[op] for m in ms.values())
        print(f"| {op} | {idle_ms:.2f} | {limit_ms:.2f} | {idle_ms - limit_ms:+.2f} | {again_ms - limit_ms:+.2f} |")


if __name__ == "__main__":
    main()
