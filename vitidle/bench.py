"""Wall-clock speed against the dense model and against the limit of idling.

The limit runs every block on its kept token count with no selection at all (the image tokens
are simply cut to P + K at each stage), so `limit ms / idle ms` says how much of the possible
speedup the converted model reaches. This machine's speed drifts 5-15% within a process, so the
models are timed interleaved (dense, idle, limit, repeat) and medians are compared.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .engine.rewrite import config_of, num_keep_of


class KeepFirst(nn.Module):
    """Cut the sequence to its first `num_tokens` tokens (the limit's stand-in for selection)."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.num_tokens].contiguous()


def limit_model(dense: nn.Module, idle: nn.Module) -> nn.Module:
    """A copy of `dense` whose blocks run on the token counts of `idle`'s plan, with no selection cost."""
    config = config_of(idle)
    limit = copy.deepcopy(dense)
    num_prefix, current = config["layout"]["num_prefix"], config["layout"]["num_tokens"]
    for name, num_keep in zip(config["layout"]["blocks"], num_keep_of(idle)):
        n = current if num_keep is None else num_prefix + num_keep
        if n != current:  # slice only where the count changes: once per stage
            parent_name, _, child = name.rpartition(".")
            parent = limit.get_submodule(parent_name)
            setattr(parent, child, nn.Sequential(KeepFirst(n), getattr(parent, child)))
            current = n
    return limit.eval()


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 15, iters: int = 5, warmup: int = 3
) -> dict[str, float]:
    """Median ms per call of each function, timed in turns so that drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[key].append((time.perf_counter() - start) * 1e3 / iters)
    return {k: statistics.median(v) for k, v in samples.items()}


def speed_vs_limit(
    dense: nn.Module, idle: nn.Module, batch_size: int, repeats: int = 15, iters: int = 5
) -> dict[str, float]:
    """ms per batch of dense, idle and limit; speedups over dense and % of the limit's speedup reached."""
    limit = limit_model(dense, idle)
    x = torch.randn(batch_size, *config_of(idle)["input"]["input_size"])
    models = {"dense": dense.eval(), "idle": idle.eval(), "limit": limit}
    with torch.inference_mode():
        ms = time_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, iters)
    return {
        **{f"{k}_ms": v for k, v in ms.items()},
        "idle_speedup": ms["dense"] / ms["idle"],
        "limit_speedup": ms["dense"] / ms["limit"],
        "pct_of_limit": 100 * ms["limit"] / ms["idle"],
    }
