"""The model folder: `model.safetensors` (dense timm keys) and `vitidle.json`, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .engine.plan import IdlePlan
from .engine.rewrite import config_of
from .errors import CheckpointError, UsageError

WEIGHTS = "model.safetensors"
CONFIG = "vitidle.json"


def save(model: nn.Module, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a converted model to `folder`; an existing folder is replaced only with `force=True`.

    Everything is written to a temporary folder beside it first, then renamed into place, so a
    crash never leaves a half-written model or loses the old one.
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise UsageError(f"{folder} already exists; pass --force (force=True) to replace it")
    config = config_of(model)
    check_rebuild(model, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_rebuild(model: nn.Module, config: dict) -> None:
    """Refuse to save what `load` could not rebuild: the base model and kwargs must give the same tensors."""
    import timm

    base, kwargs = config["base_model"], config.get("model_kwargs") or {}
    hint = "pass model_kwargs to vitidle.convert with the arguments the model was created with"
    if not base:
        raise UsageError(f"cannot save: the model names no timm architecture (pretrained_cfg); {hint}")
    try:
        with torch.device("meta"):
            fresh = timm.create_model(base, pretrained=False, **kwargs)
    except Exception as e:
        raise UsageError(f"cannot save: {base}(**{kwargs}) does not build ({type(e).__name__}: {e}); {hint}") from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != got:
        raise UsageError(f"cannot save: {base}(**{kwargs}) builds a different architecture; {hint}")


def read_config(folder: str | os.PathLike) -> dict:
    """The `vitidle.json` of a model folder, checked for the fields `load` needs."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vitidle model folder: {CONFIG} not found")
    try:
        config = json.loads(path.read_text())
        base = config["base_model"]
        config["plan"]["keep"] = IdlePlan(config["plan"]["keep"]).keep
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
    except UsageError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not base:
        raise CheckpointError(f"{path} names no base_model; it cannot be rebuilt")
    return config


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a converted model from its folder: base model (no download), same plan, saved weights.

    >>> import vitidle, tempfile, os
    >>> m = vitidle.convert("deit_tiny", pretrained=False, model_kwargs={"depth": 4, "img_size": 64})
    >>> d = os.path.join(tempfile.mkdtemp(), "m")
    >>> _ = vitidle.save(m, d)
    >>> vitidle.load(d).vitidle_config["plan"] == m.vitidle_config["plan"]
    True
    """
    from .convert import convert
    from .models import load_weights

    config = read_config(folder)
    model = convert(
        config["base_model"],
        plan=IdlePlan(tuple(config["plan"]["keep"])),
        pretrained=False,
        model_kwargs=config.get("model_kwargs") or {},
    )
    load_weights(model, Path(folder) / WEIGHTS)
    return model.eval()
