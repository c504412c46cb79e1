"""`convert`: a timm ViT in, the same model with idle-token blocks out."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from . import __version__, models
from .engine import IdlePlan, apply_plan, discover, make_plan
from .engine.discover import input_size


def convert(
    model: str | nn.Module,
    keep: float = 0.7,
    *,
    schedule: str = "idlevit",
    plan: str | Sequence[float | None] | IdlePlan | None = None,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Convert a ViT to dynamic token idling (IdleViT) and return it.

    `model` is a timm name or alias (created with `pretrained`/`weights`/`model_kwargs`) or a timm
    model, which is converted in place. `keep` is r of IdleViT's plan (first quarter of the blocks
    dense, then three stages at r, r², r³); `schedule="constant"` keeps r everywhere; `plan` gives
    per-block ratios instead ("3-5:0.7,6-11:0.5", or one ratio or None per block). No parameter is
    added: `state_dict()` keys stay those of the dense model. The knob of a converted block is
    `block.selector.num_keep` (image tokens kept).

    >>> m = convert("deit_tiny", keep=0.5, pretrained=False, model_kwargs={"depth": 4, "img_size": 64})
    >>> [b.selector.num_keep for b in m.blocks[1:]]
    [8, 4, 2]

    A transformers model, or an `hf:` name (`hf:org/name`, `hf:./save_pretrained-folder`), converts the
    same way and stays the HF model (`vitidle/hf.py`).
    """
    from . import hf

    if hf.is_hf_name(model) or hf.is_hf_model(model):  # the one place the two families part
        return hf.convert(model, keep, schedule=schedule, plan=plan, pretrained=pretrained, weights=weights,
                          model_kwargs=model_kwargs)
    if isinstance(model, str):
        base = models.resolve_name(model)
        model_kwargs = dict(model_kwargs or {})
        model = models.create(base, pretrained=pretrained, weights=weights, **model_kwargs)
    else:
        base = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if weights is not None:
            models.load_weights(model, weights)
    layout = discover(model)
    if model_kwargs is None:
        model_kwargs = model_kwargs_of(model, layout)
    idle_plan = idle_plan_of(plan, keep, schedule, len(layout.blocks))
    apply_plan(model, layout, idle_plan)
    model.vitidle_config = {
        "vitidle_version": __version__,
        "base_model": base,
        "model_kwargs": model_kwargs,
        "plan": {"keep": list(idle_plan.keep), "num_keep": idle_plan.num_keep(layout.num_patches)},
        "layout": {
            "blocks": list(layout.blocks),
            "num_tokens": layout.num_tokens,
            "num_prefix": layout.num_prefix,
            "query": layout.query,
        },
        "input": data_config(model),
    }
    return model


def idle_plan_of(plan: str | Sequence[float | None] | IdlePlan | None, keep: float, schedule: str,
                 depth: int) -> IdlePlan:
    """The plan `convert` was asked for: an IdlePlan as given, a plan string, ratios per block, or `schedule` at `keep`."""
    if isinstance(plan, IdlePlan):
        return plan
    if plan is None or isinstance(plan, str):
        return make_plan(depth, keep, schedule, plan)
    return IdlePlan(tuple(plan))


def model_kwargs_of(model: nn.Module, layout) -> dict[str, Any]:
    """The timm kwargs a model object was built with, as far as it tells: timm's record of them
    (`model._model_args`, timm >= 1.0.2x; values JSON can hold), then the sizes read off the model
    (depth, img_size, num_classes). `save` checks that they rebuild the same modules and outputs, and
    otherwise asks for `model_kwargs`.
    """
    kwargs: dict[str, Any] = {}
    for key, value in (getattr(model, "_model_args", None) or {}).items():
        if key in models.RESERVED_KWARGS:
            continue
        try:
            kwargs[key] = json.loads(json.dumps(value))  # tuples become lists, as vitidle.json keeps them
        except (TypeError, ValueError):  # a class or function (act_layer=...): save will ask for model_kwargs
            continue
    kwargs["depth"] = len(layout.blocks)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        kwargs["img_size"] = list(img_size)
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    return kwargs


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing config of the model, with the input size it was built for."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    cfg["input_size"] = list(input_size(model))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
