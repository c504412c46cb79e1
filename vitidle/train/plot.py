"""curves.png of a run: the loss terms and the top-1 per epoch, from the rows of summary.csv."""

from __future__ import annotations

import io
from pathlib import Path

from ..io import atomic_write

TERMS = ("loss", "ce", "cut", "kd", "feature")


def plot_curves(rows: list[dict], path: Path) -> None:
    """Draw the run's curves (left: each loss term; right: top-1 of the model and the teacher) to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for term in TERMS:
        values = [r.get(term) for r in rows]
        if any(values):  # a term that is off (0 in every epoch) is not drawn
            losses.plot(epochs, values, marker="o", label="total" if term == "loss" else term)
    losses.set(xlabel="epoch", ylabel="training loss (unweighted terms)", yscale="log")
    losses.legend()
    points = [(r["epoch"], r["top1"]) for r in rows if r.get("top1") is not None]
    if points:
        accuracy.plot(*zip(*points), marker="o", label="model (idle)")
    teacher = rows[-1].get("teacher_top1")
    if teacher is not None:
        accuracy.axhline(teacher, color="grey", linestyle="--", label="teacher (dense, before training)")
    accuracy.set(xlabel="epoch", ylabel="validation top-1 %")
    accuracy.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
