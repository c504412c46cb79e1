"""The model folder: `model.safetensors` (dense timm keys) and `vitidle.json`, written atomically."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .engine.discover import evaluating, sample_input
from .engine.plan import IdlePlan
from .engine.rewrite import config_of, num_keep_of
from .errors import CheckpointError, UsageError
from .idle import SELECTOR

WEIGHTS = "model.safetensors"
CONFIG = "vitidle.json"


def save(model: nn.Module, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a converted model to `folder`; an existing model folder is replaced only with `force=True`.

    Everything is written to a temporary folder beside it first, then renamed into place, so a
    crash never leaves a half-written model or loses the old one. `force` replaces a model folder
    or an empty one, never a folder of other files. A link to a folder keeps pointing to the new
    model. The saved plan holds each block's current `selector.num_keep`.
    """
    given, folder = Path(folder), check_destination(folder, force)
    config = copy.deepcopy(config_of(model))
    config["plan"]["num_keep"] = num_keep_of(model)
    check_rebuild(model, config)
    tmp = folder.with_name(f".{folder.name}.new-{uuid.uuid4().hex[:8]}")
    try:
        with parents_removed_on_error(folder):
            tmp.mkdir(parents=True)  # not mkdtemp: the folder gets the umask's mode, not 0700
            try:
                state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
                (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
                swap_in(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # after a swap it is gone already
    except OSError as e:
        raise UsageError(f"cannot write {folder}: {e.strerror or e}") from e
    return given


def swap_in(new: Path, folder: Path) -> None:
    """Rename the folder `new` to `folder`; an existing `folder` is removed only once `new` is in place."""
    if not folder.exists():
        new.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    folder.rename(old)
    try:
        new.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new model is in place: saving did not fail
        warnings.warn(f"the new model is in {folder}, but the old one could not be removed from {old}: "
                      f"{e.strerror or e}", stacklevel=3)


@contextlib.contextmanager
def parents_removed_on_error(path: Path) -> Iterator[None]:
    """Remove the folders above `path` that were missing before the block, if it raises (a failed
    write leaves no new empty folders behind)."""
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise


def check_destination(folder: str | os.PathLike, force: bool = False) -> Path:
    """`folder` resolved (a link's target, a name for "."), if `save` may write a model there; else UsageError."""
    try:
        folder = Path(folder).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop, before Python 3.13
        raise UsageError(f"cannot save to {folder}: {e}") from e
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; give a folder to save the model in")
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise UsageError(f"cannot replace {folder}: it is the current folder or holds it; choose another folder")
    if folder.exists() and not force:
        raise UsageError(f"{folder} already exists; pass --force (force=True) to replace it")
    if folder.exists() and not (folder / CONFIG).is_file() and any(folder.iterdir()):
        raise UsageError(f"{folder} holds files but no {CONFIG}: --force replaces only model folders; "
                         "choose a new folder")
    return folder


def rebuild(config: dict) -> nn.Module:
    """The converted model a config describes, with random weights: base model, kwargs, plan, knobs."""
    from .convert import convert

    model = convert(
        config["base_model"],
        plan=IdlePlan(config["plan"]["keep"]),
        pretrained=False,
        model_kwargs=config.get("model_kwargs") or {},
    )
    num_keep = config["plan"].get("num_keep") or [None] * len(config["plan"]["keep"])
    for name, k in zip(model.vitidle_config["layout"]["blocks"], num_keep, strict=True):
        if k is not None:
            model.get_submodule(name).get_submodule(SELECTOR).num_keep = int(k)
    model.vitidle_config["plan"]["num_keep"] = num_keep_of(model)
    return model


def check_rebuild(model: nn.Module, config: dict) -> None:
    """Refuse to save what `load` would not rebuild: the config must give the same model, outputs included."""
    base, kwargs = config["base_model"], config.get("model_kwargs") or {}
    hint = "pass model_kwargs to vitidle.convert with the arguments the model was created with"
    if not base:
        raise UsageError(f"cannot save: the model names no timm architecture (pretrained_cfg); {hint}")
    try:
        fresh = rebuild(config)
        fresh.load_state_dict(model.state_dict())
    except Exception as e:
        raise UsageError(f"cannot save: {base}(**{kwargs}) builds a different model ({type(e).__name__}); {hint}") from e
    x = sample_input(fresh, batch_size=2)
    param = next(model.parameters())
    with evaluating(model), evaluating(fresh), torch.no_grad():
        try:
            torch.testing.assert_close(model(x.to(param)), fresh(x), rtol=1e-3, atol=1e-3, check_device=False,
                                       check_dtype=False)
        except AssertionError:
            raise UsageError(f"cannot save: {base}(**{kwargs}) computes differently from this model; {hint}") from None


def read_config(folder: str | os.PathLike) -> dict:
    """The `vitidle.json` of a model folder, checked for the fields `load` needs."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vitidle model folder: {CONFIG} not found")
    try:
        config = json.loads(path.read_text())
        base = config["base_model"]
        IdlePlan(config["plan"]["keep"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
    except UsageError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not base:
        raise CheckpointError(f"{path} names no base_model; it cannot be rebuilt")
    keep, num_keep = config["plan"]["keep"], config["plan"].get("num_keep")
    if num_keep is not None and not (
        isinstance(num_keep, list) and len(num_keep) == len(keep)
        and all(k is None if r is None else type(k) is int and k >= 1 for r, k in zip(keep, num_keep))
    ):
        raise CheckpointError(f"{path} is corrupt: plan.num_keep must give each block null (dense) or its count "
                              f"of kept image tokens (a whole number >= 1), got {num_keep}")
    return config


def load(folder: str | os.PathLike, *, dense: bool = False) -> nn.Module:
    """Rebuild a converted model from its folder: base model (no download), same plan, saved weights.

    `dense=True` gives the base timm model with the same weights instead (the baseline).

    >>> import vitidle, tempfile, os
    >>> m = vitidle.convert("deit_tiny", pretrained=False, model_kwargs={"depth": 4, "img_size": 64})
    >>> d = os.path.join(tempfile.mkdtemp(), "m")
    >>> _ = vitidle.save(m, d)
    >>> vitidle.load(d).vitidle_config["plan"] == m.vitidle_config["plan"]
    True
    >>> hasattr(vitidle.load(d, dense=True), "vitidle_config")
    False
    """
    from .models import create, load_weights

    config = read_config(folder)
    try:
        if dense:
            model = create(config["base_model"], pretrained=False, **(config.get("model_kwargs") or {}))
        else:
            model = rebuild(config)
    except Exception as e:  # a config edited by hand can fail in many ways; all mean the folder is bad
        raise CheckpointError(f"cannot rebuild the model of {folder} from {CONFIG}: {type(e).__name__}: {e}") from e
    load_weights(model, Path(folder) / WEIGHTS)
    return model.eval()


def find_model(directory: str | os.PathLike = ".") -> tuple[Path, int]:
    """The model folder a command run in `directory` means: `directory` itself if it holds a
    `vitidle.json`, else the newest of its subfolders that do (by `vitidle.json`'s time, so that a
    later step's output, e.g. a finetuned copy, wins over the converted one). Also returns how many
    model folders there were to choose from.
    """
    directory = Path(directory)
    if (directory / CONFIG).is_file():
        return directory, 1
    found = [p.parent for p in directory.glob(f"*/{CONFIG}") if not p.parent.name.startswith(".")]
    if not found:
        raise UsageError(
            f"no model folder (one with a {CONFIG}) in {directory.resolve()}: run 'vitidle convert' here first "
            "or pass the model folder"
        )
    return max(found, key=lambda p: ((p / CONFIG).stat().st_mtime_ns, p.name)), len(found)
