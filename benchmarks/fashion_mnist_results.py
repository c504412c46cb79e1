"""docs/results.md: what idling costs the shipped Fashion-MNIST ViT in accuracy, and what it buys in speed.

    python benchmarks/fashion_mnist_results.py            # ~40 min on 2 CPU cores (three 2-epoch finetunes)
    python benchmarks/fashion_mnist_results.py --reuse    # reuse finished runs in runs/fashion_mnist/

Rows, all on the 10k Fashion-MNIST test images (Debian's dataset-fashion-mnist): the shipped dense
model (`vit_fashion_mnist`); the same weights idled without training at keep 0.9 / 0.7 / 0.5; after
a 2-epoch IdleViT finetune (recipes/fashion_mnist/keep0.7.yaml, keep0.5.yaml); and the control: the
dense model finetuned with the same recipe and no idle layer (any extra epochs help an undertrained
model, so idle rows are compared with the control). GMACs per image; onnxruntime images/s at batch 1
and 16 (dense and idle timed in turns, `vitidle bench`).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
from pathlib import Path

import torch

import vitidle
from vitidle.bench import bench
from vitidle.evaluate import evaluate
from vitidle.flops import count_macs
from vitidle.train.recipe import DataSection, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "fashion_mnist"
TEST = DataSection(dataset="fashion_mnist", val_split="test")


def finetuned(recipe: str, output: Path, overrides: list[str], reuse: bool) -> torch.nn.Module:
    """The model a recipe trains (run here, or reused with --reuse)."""
    if not (reuse and (output / "model.safetensors").is_file()):
        vitidle.finetune(load_recipe(ROOT / recipe, [f"run.output={output}", *overrides]), force=True)
    return vitidle.load(output)


def speed(dense: torch.nn.Module, idle: torch.nn.Module) -> dict[int, tuple[float, float]]:
    """{batch: (dense, idle) onnxruntime images/s}."""
    report = bench(dense.eval(), vitidle.freeze(idle.eval()), batch_sizes=(1, 16), repeats=15, onnx=True)
    return {r["batch_size"]: (r["dense_img_s"], r["idle_img_s"]) for r in report["results"] if r["runtime"] == "onnxruntime"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="reuse finished finetune runs in runs/fashion_mnist/")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/fashion_mnist_results.py" + (" --reuse" if args.reuse else "")

    base = vitidle.models.create("vit_fashion_mnist", pretrained=True).eval()
    rows = []  # (row, model, dense model for speed or None, how)

    def add(label, model, how, reference=None):
        result = evaluate(model, TEST, batch_size=256, num_workers=2)
        img_s = speed(reference, model) if reference is not None else None
        rows.append((label, result, img_s, how))
        print(label, result, img_s, flush=True)

    add("dense (shipped)", base, "`vit_fashion_mnist` as shipped")
    for keep in (0.9, 0.7, 0.5):
        model = vitidle.convert(vitidle.models.create("vit_fashion_mnist", pretrained=True), keep=keep)
        add(f"idle {keep}, no training", model, f"`vitidle.convert('vit_fashion_mnist', keep={keep})`", base)
    control = finetuned("recipes/fashion_mnist/keep0.7.yaml", RUNS / "control", ["model.keep=null", "model.plan=none"],
                        args.reuse)
    add("control: dense, same 2-epoch finetune", control, "keep0.7.yaml with `--set model.plan=none`")
    for keep in (0.7, 0.5):
        model = finetuned(f"recipes/fashion_mnist/keep{keep}.yaml", RUNS / f"keep{keep}", [], args.reuse)
        add(f"idle {keep}, 2-epoch finetune", model, f"recipes/fashion_mnist/keep{keep}.yaml", control)

    dense_macs = count_macs(base)
    lines = [
        "# Results: the shipped Fashion-MNIST ViT, dense and idle",
        "",
        f"Made by `{command}` at commit {commit} on {datetime.date.today()}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Top-1 / top-5 on the 10,000 Fashion-MNIST test "
        "images; GMACs per image; images/s in onnxruntime (CPU), dense and idle timed in turns by `vitidle bench` "
        "(idle frozen), against the shipped dense model (no-training rows) or the control (finetuned rows).",
        "",
        "| model | top-1 | top-5 | GMACs | onnxruntime img/s bs1 (dense → idle) | bs16 (dense → idle) | how |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, img_s, how in rows:
        speeds = ("–", "–") if img_s is None else tuple(f"{d:.0f} → {i:.0f}" for d, i in (img_s[1], img_s[16]))
        lines.append(f"| {label} | {r['top1']:.2f} | {r['top5']:.2f} | {r['gmacs']:.4f} | {speeds[0]} | {speeds[1]} | "
                     f"{how} |")
    control_top1 = rows[4][1]["top1"]
    lines += ["", f"Dense GMACs {dense_macs / 1e9:.4f}. Against the control ({control_top1:.2f}%): "
              + "; ".join(f"{label.split(',')[0]} finetuned {r['top1'] - control_top1:+.2f} pt"
                          for label, r, _, _ in rows[5:]) + "."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
