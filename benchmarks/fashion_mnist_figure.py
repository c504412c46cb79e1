"""The README's figure: which patches each idle block of the shipped Fashion-MNIST ViT keeps.

Converts `vit_fashion_mnist` (weights ship in the package) at keep 0.7, as
`vitidle convert --model vit_fashion_mnist --keep 0.7` does, takes the first test image of each of
a few classes (Debian's dataset-fashion-mnist), saves them as PNGs and draws them with
`vitidle.visualize`, which is what `vitidle visualize MODEL IMAGE... -o FILE` runs:

    python benchmarks/fashion_mnist_figure.py                       # docs/visualize.png
    python benchmarks/fashion_mnist_figure.py --model runs/fashion_mnist/keep0.7 -o finetuned.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import vitidle
from vitidle.train.data import FashionMNIST
from vitidle.zoo import FASHION_MNIST_CLASSES

CLASSES = ("Ankle boot", "Pullover", "Sneaker", "Bag")  # shown in this order, one row each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder  [default: vit_fashion_mnist converted at --keep]")
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--output", "-o", default="docs/visualize.png")
    args = parser.parse_args()

    model = vitidle.load(args.model) if args.model else vitidle.convert("vit_fashion_mnist", keep=args.keep)
    test = FashionMNIST(split="test")
    wanted = [FASHION_MNIST_CLASSES.index(name) for name in CLASSES]
    first = {label: i for i, label in reversed(list(enumerate(test.labels.tolist())))}  # first index per class
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for label in wanted:
            image, _ = test[first[label]]
            path = Path(tmp) / f"test {first[label]}, {FASHION_MNIST_CLASSES[label].lower()}.png"
            image.save(path)
            paths.append(path)
        masks = vitidle.visualize(model, paths, args.output)
    print(f"{args.output}: test images {[first[label] for label in wanted]}, blocks "
          + ", ".join(f"{b} ({int(m[0].sum())} kept)" for b, m in masks.items()))


if __name__ == "__main__":
    main()
