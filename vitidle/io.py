"""The model folder: `model.safetensors` (dense timm keys) and `vitidle.json`, written atomically."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import hf
from .engine.discover import evaluating, sample_input
from .engine.plan import IdlePlan
from .engine.rewrite import config_of, num_keep_of, unwrap
from .errors import CheckpointError, UsageError, first_line
from .idle import SELECTOR
from .models import check_model_kwargs

WEIGHTS = "model.safetensors"
CONFIG = "vitidle.json"
SAVE_ID = "vitidle_save_id"  # in the weights' metadata; the config's "save_id" must match it


def save(model: nn.Module, folder: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a converted model to `folder` as `model.safetensors` and `vitidle.json`.

    A new folder is written beside its destination and renamed into place, so a crash leaves no
    half-written model. An existing folder is written only with `force=True`, and only if it is a
    model folder or empty: each of the two files is written to a temporary file in it, synced, and
    renamed over the old one. Nothing else in the folder is touched (an exported model.onnx, a run's
    checkpoints, notes), but for the HF `config.json` an HF model's save wrote, which a timm model's
    save takes away. The two files carry one save id, so `load` can tell a pair that an
    interrupted save mixed. A link to a folder writes where it points. The saved plan holds each
    block's current `selector.num_keep`. A model wrapped by torch.compile, DDP or DataParallel is saved
    as the model inside.
    """
    given, folder = Path(folder), check_destination(folder, force)
    write_model(model, folder)
    return given


def write_model(model: nn.Module, folder: Path) -> None:
    """`save` without its checks on the destination: a new folder appears whole, an existing one (a run
    folder, say) gets its two model files replaced, each by a rename, and keeps every other file."""
    model = unwrap(model)
    config = copy.deepcopy(config_of(model))
    config["plan"]["num_keep"] = num_keep_of(model)
    (hf.check_rebuild if hf.is_hf_config(config) else check_rebuild)(model, config)
    config["save_id"] = uuid.uuid4().hex
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        with parents_removed_on_error(folder):
            if folder.exists():
                replace_model_files(folder, state, config)
            else:
                tmp = folder.with_name(f".{folder.name}.new-{uuid.uuid4().hex[:8]}")
                tmp.mkdir(parents=True)  # not mkdtemp: the folder gets the umask's mode, not 0700
                try:
                    write_model_files(tmp, state, config)
                    tmp.rename(folder)
                    fsync(folder.parent)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    except OSError as e:
        raise UsageError(f"cannot write {folder}: {e.strerror or e}") from e


def model_files(config: dict) -> tuple[str, ...]:
    """The files `save` writes for a config, in the order they are put in place: a transformers model also gets
    its HF `config.json`, so the dense class's `from_pretrained(folder)` reads the folder."""
    return (WEIGHTS, hf.HF_CONFIG, CONFIG) if hf.is_hf_config(config) else (WEIGHTS, CONFIG)


def write_model_files(folder: Path, state: dict[str, torch.Tensor], config: dict, prefix: str = "") -> list[Path]:
    """Write `prefix +` each of `model_files(config)` into `folder`, each synced to disk."""
    paths = [folder / (prefix + name) for name in model_files(config)]
    weights, config_file = paths[0], paths[-1]
    save_file(state, weights, metadata={"format": "pt", SAVE_ID: config["save_id"]})
    os.chmod(weights, 0o666 & ~umask())  # safetensors writes 0600; a shared model folder must stay readable
    if len(paths) == 3:
        paths[1].write_text(hf.config_json(config))
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    for path in paths:
        fsync(path)
    return paths


def replace_model_files(folder: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Replace the model files of an existing folder, each by a rename; the weights first, the config last.
    A file the old model's save wrote that the new one does not (an HF `config.json`, under a timm model) is
    removed last, so the dense HF class cannot read the new weights as the old model's."""
    stale: set[str] = set()
    with contextlib.suppress(CheckpointError, OSError):  # an empty folder, or a config one cannot read
        stale = set(model_files(read_config(folder))) - set(model_files(config))
    written = write_model_files(folder, state, config, prefix=f".{uuid.uuid4().hex[:8]}.")
    try:
        for path, name in zip(written, model_files(config), strict=True):
            os.replace(path, folder / name)
        for name in stale:
            (folder / name).unlink(missing_ok=True)
        fsync(folder)
    finally:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it to read it)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's or a folder's content to disk (a rename is only durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it: synced, renamed, the folder synced."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


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

    if hf.is_hf_config(config):
        return hf.rebuild(config)
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
    """Refuse to save what `load` would not rebuild: the config must give the same modules (training
    settings such as drop path and dropout rates included) and the same outputs."""
    base, kwargs = config["base_model"], config.get("model_kwargs") or {}
    hint = "pass model_kwargs to vitidle.convert with the arguments the model was created with"
    if not base:
        raise UsageError(f"cannot save: the model names no timm architecture (pretrained_cfg); {hint}")
    try:
        fresh = rebuild(config)
        fresh.load_state_dict(model.state_dict())
    except Exception as e:
        raise UsageError(f"cannot save: {base}(**{kwargs}) builds a different model ({type(e).__name__}); {hint}") from e
    for (name, got), (_, want) in zip(module_settings(fresh), module_settings(model)):
        if got != want:
            raise UsageError(f"cannot save: {base}(**{kwargs}) builds {name or 'the model'} as {got}, not {want}; {hint}")
    x = sample_input(fresh, batch_size=2)
    param = next(model.parameters())
    with evaluating(model), evaluating(fresh), torch.no_grad():
        try:
            torch.testing.assert_close(model(x.to(param)), fresh(x), rtol=1e-3, atol=1e-3, check_device=False,
                                       check_dtype=False)
        except AssertionError:
            raise UsageError(f"cannot save: {base}(**{kwargs}) computes differently from this model; {hint}") from None


def module_settings(model: nn.Module) -> list[tuple[str, str]]:
    """Each module's name and its class with its settings (`DropPath(drop_prob=0.300)`): what eval outputs hide."""
    return [(name, f"{type(m).__name__}({m.extra_repr()})") for name, m in model.named_modules()]


def read_config(folder: str | os.PathLike) -> dict:
    """The `vitidle.json` of a model folder, checked for the fields `load` needs."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vitidle model folder: {CONFIG} not found")
    try:
        config = json.loads(path.read_text())
        base = config["base_model"]
        IdlePlan(config["plan"]["keep"])
        check_model_kwargs(config.get("model_kwargs") or {})
        if not (isinstance(config["layout"]["blocks"], list) and all(isinstance(b, str) for b in config["layout"]["blocks"])):
            raise TypeError("layout.blocks must be a list of block names")
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: arrays nested 1000s deep
        raise CheckpointError(f"{path} is corrupt: {type(e).__name__}: {first_line(e)}") from e
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
    import timm

    from .models import load_weights, resolve_name, state_dict_mismatch

    config = read_config(folder)
    weights = Path(folder) / WEIGHTS
    shapes = read_weights_header(weights, config.get("save_id"))
    blocks, kwargs = config["layout"]["blocks"], config.get("model_kwargs") or {}
    if kwargs.get("depth", len(blocks)) != len(blocks) or not all(any(k.startswith(f"{b}.") for k in shapes)
                                                                  for b in blocks):
        raise CheckpointError(f"{Path(folder) / CONFIG} is corrupt: its blocks ({len(blocks)}, depth "
                              f"{kwargs.get('depth')}) are not those of the weights in {weights}")
    if hf.is_hf_config(config):  # a transformers model: its class and config rebuild it (vitidle/hf.py)
        def build_dense():
            return hf.dense_from_config(config)
    else:
        def build_dense():
            return timm.create_model(resolve_name(config["base_model"]), pretrained=False, **kwargs)
    try:  # on the meta device first: a config edited to build a huge model fails here, before any memory is used
        with torch.device("meta"):
            skeleton = build_dense()
    except Exception as e:  # a config edited by hand can fail in many ways; all mean the folder is bad
        raise CheckpointError(f"cannot rebuild the model of {folder} from {CONFIG}: {type(e).__name__}: "
                              f"{first_line(e)}") from e
    problem = state_dict_mismatch({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes)
    if problem:
        raise CheckpointError(f"weights in {weights} do not fit {config['base_model']}: {problem}")
    try:
        model = build_dense() if dense else rebuild(config)
    except Exception as e:
        raise CheckpointError(f"cannot rebuild the model of {folder} from {CONFIG}: {type(e).__name__}: "
                              f"{first_line(e)}") from e
    load_weights(model, weights)
    return model.eval()


def read_weights_header(path: Path, save_id: str | None) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in a safetensors file's header, read without reading the tensors.

    Also checks that the file comes from the same save as the config that names `save_id`.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            file_id = (f.metadata() or {}).get(SAVE_ID)
    except Exception as e:  # corrupt headers surface as several error types
        raise CheckpointError(f"cannot read weights from {path}: not a valid checkpoint ({type(e).__name__})") from e
    if save_id and file_id and save_id != file_id:
        raise CheckpointError(f"{path} and the {CONFIG} beside it come from different saves (an interrupted save?); "
                              "save the model again")
    return shapes


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
