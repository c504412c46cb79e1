"""Names to models: short aliases, timm creation, weights from timm's hub path or a local file."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from . import zoo  # noqa: F401  (registers the models vitidle ships with timm)
from .errors import CheckpointError, UnknownModelError, UsageError, WeightsUnavailableError

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_tiny_distilled": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "deit_base_distilled": "deit_base_distilled_patch16_224",
    "deit3_small": "deit3_small_patch16_224",
    "deit3_medium": "deit3_medium_patch16_224",
    "deit3_base": "deit3_base_patch16_224",
    "deit3_large": "deit3_large_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}


def resolve_name(name: str) -> str:
    """Map an alias to its timm name and check that timm knows it (a `.tag` suffix is allowed).

    >>> resolve_name("deit_small"), resolve_name("deit_small.fb_in1k")
    ('deit_small_patch16_224', 'deit_small_patch16_224.fb_in1k')
    """
    import timm

    arch, dot, tag = name.partition(".")
    arch = ALIASES.get(arch, arch)
    if timm.is_model(arch):
        return arch + dot + tag
    candidates = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; `timm.list_models('*vit*')` lists the ViTs"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check that the Hugging Face hub answers, so an offline machine fails in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create(
    name: str, *, pretrained: bool = True, weights: str | os.PathLike | None = None, **model_kwargs
) -> nn.Module:
    """Create a timm model by name or alias, with weights from `weights`, timm's hub, or random init.

    >>> model = create("deit_tiny", pretrained=False, depth=2)
    >>> type(model).__name__
    'VisionTransformer'
    """
    import timm

    full = resolve_name(name)
    check_model_kwargs(model_kwargs)
    try:  # on the meta device: a bad keyword argument fails here in milliseconds, before any download
        with torch.device("meta"):
            timm.create_model(full, pretrained=False, **model_kwargs)
    except Exception as e:
        raise UsageError(f"cannot build {full} with {model_kwargs}: {type(e).__name__}: {e}") from e
    if weights is not None or not pretrained:
        model = timm.create_model(full, pretrained=False, **model_kwargs)
        if weights is not None:
            load_weights(model, weights)
        return model
    import huggingface_hub.constants as hub

    offline = hub.HF_HUB_OFFLINE
    # timm would retry an unreachable hub for about a minute; offline, only the local cache can answer
    hub.HF_HUB_OFFLINE = offline or not hub_reachable()
    try:
        return timm.create_model(full, pretrained=True, **model_kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise WeightsUnavailableError(
            f"no pretrained weights for {full}: the hub is unreachable and they are not in the local cache "
            f"({type(e).__name__}); pass --weights FILE or --no-pretrained"
        ) from e
    finally:
        hub.HF_HUB_OFFLINE = offline


# timm.create_model's own arguments and the device: where weights come from and where they live are
# chosen by vitidle's own options (a saved vitidle.json must not make timm read a path it names)
RESERVED_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                             "scriptable", "exportable", "no_jit", "device", "dtype"})


def check_model_kwargs(kwargs: dict) -> dict:
    """`kwargs` for timm.create_model if they only shape the architecture; else UsageError naming the ones that do not.

    >>> check_model_kwargs({"depth": 6})
    {'depth': 6}
    """
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UsageError(f"model arguments must map names to values, got {kwargs!r}"[:200])
    reserved = sorted(RESERVED_KWARGS & set(kwargs))
    if reserved:
        raise UsageError(f"model argument(s) {', '.join(reserved)} cannot be given: weights come from --weights / "
                         "--no-pretrained (vitidle.convert's weights / pretrained), the device from .to()")
    return kwargs


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pth/.bin/.pt with `weights_only=True` (never unpickles code).

    DeiT-style wrappers ({'model': ...}, {'state_dict': ...}) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files surface as many error types
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} pickles objects other than tensors; vitidle loads with weights_only=True and will not "
                "run them: save a plain state dict (torch.save(model.state_dict(), ...)) or .safetensors"
            ) from e
        raise CheckpointError(f"cannot read weights from {path}: not a valid checkpoint ({type(e).__name__})") from e
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a dense or converted checkpoint into `model` (their keys are the same), strictly."""
    state = read_state_dict(path)
    problem = state_dict_mismatch({k: v.shape for k, v in model.state_dict().items()},
                                  {k: v.shape for k, v in state.items()})
    if problem:
        raise CheckpointError(f"weights in {path} do not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state)
    return model


def state_dict_mismatch(own: dict[str, tuple], given: dict[str, tuple]) -> str | None:
    """How the shapes of a state dict differ from a model's, in a few words; None where they fit."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if tuple(own[k]) != tuple(given[k]))
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if keys
    ]
    return ", ".join(parts) or None

