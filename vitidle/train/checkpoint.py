"""Checkpoints of a run: weights in safetensors, the rest (optimizer, scaler, step, RNG) for `weights_only` loads.

Each checkpoint is a folder `OUT/checkpoints/step-NNNNNNN/` written under a temporary name and
renamed into place, so a crash or a full disk mid-write leaves the last good one as it was. The two
newest are kept.
"""

from __future__ import annotations

import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..io import fsync

FOLDER = "checkpoints"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
KEEP = 2
NAME = re.compile(r"^step-(\d{7,})$")


def rng_state() -> dict:
    """Python, numpy, torch (CPU and CUDA) random states, as types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model: nn.Module, state: dict) -> Path:
    """Write checkpoint `step` (model weights + `state`) atomically; drop all but the newest `KEEP`."""
    root = out / FOLDER
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.new-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt", "step": str(step)})
        torch.save(state, tmp / STATE)
        for path in (tmp / WEIGHTS, tmp / STATE, tmp):
            fsync(path)
        if final.exists():  # the same step again (a resume that stopped where it started): ours to replace
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = out / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name)[1]))


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(weights, state) of a checkpoint folder; the state is read with `weights_only=True`."""
    try:
        weights = load_file(folder / WEIGHTS)
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files surface as many error types
        raise CheckpointError(f"cannot read checkpoint {folder}: {type(e).__name__}: {str(e)[:200]}") from None
    return weights, state
