"""docs/results.md: what idling costs the shipped Fashion-MNIST ViT in accuracy, and what it buys in speed.

    python benchmarks/fashion_mnist_results.py            # ~70 min on 2 CPU cores (five 2-epoch finetunes)
    python benchmarks/fashion_mnist_results.py --reuse    # reuse finished runs in runs/fashion_mnist/

Rows, all on the 10k Fashion-MNIST test images (Debian's dataset-fashion-mnist): the shipped dense
model (`vit_fashion_mnist`); the same weights idled without training at keep 0.9 / 0.7 / 0.5; after
a 2-epoch IdleViT finetune (recipes/fashion_mnist/keep0.7.yaml, keep0.5.yaml, and keep 0.7 with the token
cut loss at λ_cut 2 and 20, the loss-weight choice); and the control: the
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
CUT_WEIGHTS = (2.0, 20.0)  # 20 is the paper's weight


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
    for cut in CUT_WEIGHTS:  # the recipe's loss-weight choice, measured: the token cut loss on top of CE + KD
        model = finetuned("recipes/fashion_mnist/keep0.7.yaml", RUNS / f"keep0.7-cut{cut:g}", [f"loss.lambda_cut={cut}"],
                          args.reuse)
        add(f"idle 0.7, 2-epoch finetune, λ_cut {cut:g}", model,
            f"keep0.7.yaml with `--set loss.lambda_cut={cut:g}`", control)

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
    top1 = {label: r["top1"] for label, r, _, _ in rows}
    control_top1 = top1["control: dense, same 2-epoch finetune"]
    finetunes = [label for label in top1 if label.startswith("idle") and "finetune" in label]
    lines += ["", f"Dense GMACs {dense_macs / 1e9:.4f}. Against the control ({control_top1:.2f}%): "
              + "; ".join(f"{label} {top1[label] - control_top1:+.2f} pt" for label in finetunes) + "."]
    by_cut = {0.0: top1["idle 0.7, 2-epoch finetune"]} | {c: top1[f"idle 0.7, 2-epoch finetune, λ_cut {c:g}"]
                                                          for c in CUT_WEIGHTS}
    shipped = load_recipe(ROOT / "recipes/fashion_mnist/keep0.7.yaml").loss.lambda_cut
    best = max(by_cut, key=by_cut.get)
    lines += ["", "**The token cut loss weight, measured** (keep 0.7, the same 2-epoch finetune, CE + distillation "
              "plus λ_cut × the cut loss): " + ", ".join(f"λ_cut {c:g}: {v:.2f}" for c, v in by_cut.items())
              + f". The Fashion-MNIST recipes ship λ_cut {shipped:g}"
              + (", the best of these." if best == shipped else f"; the best here is λ_cut {best:g}: change the recipes.")
              + " The paper's 20 stays an option (`--set loss.lambda_cut=20`; the ImageNet recipes use it)."]
    lines += ["", NOTES]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = """Read the speed columns within a row: for a 0.05-GMAC model a call is tens of microseconds, and
the dense rows at batch 1 vary by tens of percent from row to row on the same model. The numbers are made
with the shipped weights of the commit named above (`vitidle/weights/vit_fashion_mnist.safetensors`,
sha256 in `vitidle/zoo.py`)."""


if __name__ == "__main__":
    main()
