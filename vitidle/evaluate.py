"""Accuracy of a model on labelled images: top-1 / top-5 (micro average, as timm's validate), images/s, GMACs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from .idle import idle_selectors


def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu",
             autocast: Callable = contextlib.nullcontext) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, images) of `model` in eval mode over `loader`'s (images, labels) batches.

    The model's mode and its selectors' `record_attention` are put back afterwards. Under
    torch.distributed the counts are summed over the processes, each of which reads its own shard.
    """
    selectors = idle_selectors(model)
    recording = [s.record_attention for s in selectors]
    for s in selectors:
        s.record_attention = False  # projecting every token's key is for the cut loss, not for a score
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with autocast():
                    logits = model(x)
                logits = getattr(logits, "logits", logits)  # a transformers model returns an output object
                top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices  # B, 5
                hits = top == y.unsqueeze(1)
                counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=device)])
    finally:
        model.train(was_training)
        for s, r in zip(selectors, recording):
            s.record_attention = r
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    correct1, correct5, seen = counts.tolist()
    return 100 * correct1 / max(seen, 1), 100 * correct5 / max(seen, 1), int(seen)


def evaluate(model: nn.Module, data, *, batch_size: int = 64, num_workers: int = 2, device: str = "cpu",
             progress: bool = False, input_config: dict | None = None) -> dict:
    """Top-1 / top-5, images/s and GMACs of `model` (converted or dense) on the eval split of `data`.

    `data` is a recipe's data section (`vitidle.train.recipe.DataSection`): an image folder,
    Fashion-MNIST or a timm dataset, preprocessed with `input_config` (timm's data config; default:
    the converted model's `vitidle_config["input"]`, else the model's own).

    >>> from vitidle.train.recipe import DataSection   # doctest: +SKIP
    >>> evaluate(vitidle.load("runs/fashion_mnist/keep0.7"), DataSection(dataset="fashion_mnist"))  # doctest: +SKIP
    {'top1': 88.1, 'top5': 99.7, 'images': 10000, 'images_per_s': 2100.0, 'gmacs': 0.03}
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .convert import data_config
    from .flops import count_macs
    from .train.data import eval_dataset

    if input_config is None:
        config = getattr(model, "vitidle_config", None)
        input_config = config["input"] if config else data_config(model)
    dataset = eval_dataset(data, input_config)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model = model.to(device)
    start = time.perf_counter()
    top1, top5, seen = accuracy(model, tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False),
                                device)
    seconds = time.perf_counter() - start
    return {"top1": round(top1, 3), "top5": round(top5, 3), "images": seen,
            "images_per_s": round(seen / seconds, 1), "gmacs": round(count_macs(model) / 1e9, 4)}
