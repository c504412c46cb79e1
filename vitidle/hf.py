"""Hugging Face transformers ViTs: find the layers by structure and make the idle ones idle by a class swap.

transformers 5.x layers cannot be traced by torch.fx (docs/hf.md), so an idle layer is not a rewritten
graph as for timm: its class is swapped, ToMe-style, for a generated subclass (`IdleViTLayer` for
`ViTLayer`) whose forward scores all tokens with a parameter-free `TokenSelector` child, runs the
original forward on the kept tokens only and merges the result back. The model object stays the HF
model: its output classes, `output_hidden_states`, pipelines, `save_pretrained` and state-dict keys
are unchanged. Discovery is structural, with no model names:

- the layers: the one ModuleList whose children each hold one self-attention module, a module with
  `q_proj` and `k_proj` Linears;
- the pre-attention norm, the token count and the patch grid: read off one sample forward with hooks
  (the module whose output feeds `q_proj`, the layers' inputs, the first convolution's output).

>>> import transformers, vitidle
>>> cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
...                              image_size=32, patch_size=8)
>>> model = vitidle.convert(transformers.ViTForImageClassification(cfg), keep=0.7)
>>> [layer.selector.num_keep for layer in model.vit.layers[1:]], type(model.vit.layers[1]).__name__
([11, 7, 5], 'IdleViTLayer')
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .engine.discover import evaluating, input_size, sample_input
from .errors import (CheckpointError, ConversionError, UnsupportedModelError, UsageError, WeightsUnavailableError,
                     first_line)
from .idle import PER_TOKEN_NORMS, SELECTOR, TokenSelector, gather_tokens, merge_tokens

PREFIX = "hf:"  # `vitidle convert --model hf:org/name` (the hub) or `hf:./folder` (a save_pretrained folder)
# the only from_pretrained arguments `--model-arg` may set: where code and weights come from is vitidle's choice
MODEL_ARGS = frozenset({"attn_implementation"})
# attention kernels a model may name (a vitidle.json or --model-arg): transformers fetches and loads compiled
# code for others ("kernels-community/..."), which an edited file must not be able to make it do
ATTENTION = ("sdpa", "eager")
# HF image processors default to these for ViTs; the processor is not part of the model
INPUT_DEFAULTS = {"interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                  "crop_mode": "center"}


def is_hf_name(name: Any) -> bool:
    """Whether `name` is an `hf:` model reference."""
    return isinstance(name, str) and name.startswith(PREFIX)


def is_hf_model(model: Any) -> bool:
    """Whether `model` is a transformers model (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def is_hf_config(config: dict) -> bool:
    """Whether a vitidle config (`vitidle.json`) describes a transformers model."""
    return isinstance(config.get("hf"), dict)


# ---------------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class HFLayer:
    """Where one layer keeps what the selector needs, as paths relative to the layer."""

    norm: str | None  # the per-token norm whose output feeds the attention; None: the attention reads the input
    q_proj: str
    k_proj: str
    num_heads: int
    scale: float


@dataclass(frozen=True)
class HFLayout:
    """The layer chain of an HF ViT and its token layout."""

    blocks: tuple[str, ...]  # qualified names of the layers, in order
    layers: tuple[HFLayer, ...]
    num_tokens: int  # N: tokens entering every layer
    num_prefix: int  # class, distillation and register tokens at the front
    dim: int  # C
    query: str  # "cls": the class token at position 0 scores

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


def attention_of(layer: nn.Module) -> str | None:
    """The path of the layer's one self-attention module (with `q_proj` and `k_proj` Linears), else None."""
    found = [name for name, m in layer.named_modules()
             if isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "k_proj", None), nn.Linear)]
    return found[0] if len(found) == 1 else None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's attention layers, found by structure (no forward).

    Refuses a model that does not take images, or holds no or several such lists, with a one-line error.
    """
    name = type(model).__name__
    takes = getattr(model, "main_input_name", "pixel_values")
    if takes != "pixel_values":
        raise UnsupportedModelError(f"no attention blocks found that see image tokens: {name} takes {takes}, not "
                                    "pixel_values; vitidle converts vision transformers")
    stacks = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and all(attention_of(layer) for layer in m)]
    if not stacks:
        raise UnsupportedModelError(f"no attention blocks found in {name} (a list of layers with a q_proj/k_proj "
                                    "self-attention); vitidle converts ViT-style models")
    if len(stacks) > 1:
        raise UnsupportedModelError(f"{name} has {len(stacks)} stacks of attention layers "
                                    f"({', '.join(n for n, _ in stacks)}); convert its vision model alone")
    return stacks[0]


def discover(model: nn.Module) -> HFLayout:
    """Find the layer chain, each layer's norm and projections, and the token layout of an HF ViT.

    >>> import transformers
    >>> cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                               intermediate_size=64, image_size=32, patch_size=8)
    >>> layout = discover(transformers.DeiTForImageClassificationWithTeacher(cfg))
    >>> layout.blocks, layout.num_prefix, layout.layers[0].norm
    (('deit.layers.0', 'deit.layers.1'), 2, 'layernorm_before')
    """
    name = type(model).__name__
    if any(isinstance(m, TokenSelector) for m in model.modules()):
        raise UnsupportedModelError(f"{name} is already converted by vitidle; convert the dense model instead")
    stack_name, stack = find_layers(model)
    blocks = tuple(f"{stack_name}.{i}" for i in range(len(stack)))
    biased = next((n for n, _ in model.named_parameters() if "relative_position" in n), None)
    if biased is not None:  # BEiT-style: a bias per query/key pair that the kept tokens would have to carry along
        raise UnsupportedModelError(f"{name} adds a relative position bias to its attention ({biased}); vitidle "
                                    "cannot idle its layers yet")

    seen: list[tuple[str, nn.Module, Tensor | None, Any]] = []  # (name, module, first input, output) per call
    conv_out: list[Tensor] = []

    def record(name):
        def hook(module, args, output):
            seen.append((name, module, args[0] if args and isinstance(args[0], Tensor) else None, output))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
               if n == stack_name or n.startswith(f"{stack_name}.")]
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        handles.append(first_conv.register_forward_hook(lambda m, a, out: conv_out.append(out)))
    q_inputs: dict[int, Tensor] = {}  # id(q_proj module) -> its input; likewise for k_proj
    for i, layer in enumerate(stack):
        attn = layer.get_submodule(attention_of(layer))
        for proj in (attn.q_proj, attn.k_proj):
            handles.append(proj.register_forward_pre_hook(lambda m, args: q_inputs.__setitem__(id(m), args[0])))
    try:
        with evaluating(model), torch.no_grad():
            model(pixel_values=sample_input(model))
    except UsageError:
        raise
    except Exception as e:
        raise ConversionError(f"pass discover: a sample forward through {name} failed: {type(e).__name__}: "
                              f"{first_line(e)}") from e
    finally:
        for h in handles:
            h.remove()

    outputs = {id(module): (n, module, x, out) for n, module, x, out in seen}  # each module's last call
    layers, prev_out = [], None
    for block, layer in zip(blocks, stack):
        if id(layer) not in outputs:
            raise UnsupportedModelError(f"pass discover: {block} did not run in a forward of {name}")
        _, _, x, out = outputs[id(layer)]
        y = out[0] if isinstance(out, tuple) else out
        if x is None or x.dim() != 3 or not isinstance(y, Tensor) or y.shape != x.shape:
            raise UnsupportedModelError(f"pass discover: {block} does not map (B, N, C) tokens to the same shape; "
                                        "vitidle needs layers that keep the token shape")
        if prev_out is not None and x is not prev_out:
            raise UnsupportedModelError(f"pass discover: {block} does not take the previous layer's output; "
                                        "vitidle needs a plain chain of layers")
        prev_out = y
        layers.append(_layer_paths(block, layer, x, q_inputs, outputs))
    _, num_tokens, dim = prev_out.shape
    num_patches = conv_out[0].shape[-2] * conv_out[0].shape[-1] if conv_out else None
    if num_patches is None or not 0 <= num_tokens - num_patches < num_tokens:
        raise UnsupportedModelError(f"pass discover: cannot tell {name}'s image tokens from its prefix tokens "
                                    f"({num_tokens} tokens, patch grid {num_patches})")
    num_prefix = num_tokens - num_patches
    if num_prefix < 1:
        raise UnsupportedModelError(f"{name} has no class token; vitidle scores HF models with their class token")
    return HFLayout(blocks, tuple(layers), num_tokens, num_prefix, dim, "cls")


def _layer_paths(block: str, layer: nn.Module, x: Tensor, proj_inputs: dict[int, Tensor], outputs: dict) -> HFLayer:
    """The norm and projections of one layer, from what the sample forward saw."""
    attn_path = attention_of(layer)
    attn = layer.get_submodule(attn_path)
    q_in, k_in = proj_inputs.get(id(attn.q_proj)), proj_inputs.get(id(attn.k_proj))
    if q_in is None or q_in is not k_in:
        raise UnsupportedModelError(f"pass discover: {block}.{attn_path} does not project queries and keys from "
                                    "the same tokens; vitidle idles self-attention only")
    norm = None
    if q_in is not x:  # the module of this layer that made the attention's input from the layer's input
        made = [(n, m, inp) for n, m, inp, out in outputs.values() if out is q_in and n.startswith(f"{block}.")]
        if not made or made[0][2] is not x or not isinstance(made[0][1], PER_TOKEN_NORMS):
            raise UnsupportedModelError(f"pass discover: the attention of {block} reads neither the layer's input nor "
                                        "a per-token norm of it (LayerNorm, RMSNorm); vitidle cannot score it")
        norm = made[0][0][len(block) + 1:]
    num_heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    if not isinstance(num_heads, int):
        raise UnsupportedModelError(f"pass discover: cannot tell the head count of {block}.{attn_path}")
    head_dim = attn.q_proj.out_features // num_heads
    scale = float(getattr(attn, "scaling", getattr(attn, "scale", head_dim ** -0.5)))
    return HFLayer(norm, f"{attn_path}.q_proj", f"{attn_path}.k_proj", num_heads, scale)


# ------------------------------------------------------------------------------------------------------ rewrite


class IdleLayer:
    """Mixin of the generated idle layer classes: score, keep the top-K tokens, run the layer's own forward
    on them, copy the idle tokens unchanged. Holds a parameter-free `selector`; `vitidle_layer` (an
    `HFLayer`) says where the norm and projections are."""

    vitidle_base: type  # the dense layer class

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        _refuse_attention_maps()
        x, paths = hidden_states, self.vitidle_layer  # B, N, C
        x_norm = x if paths.norm is None else self.get_submodule(paths.norm)(x)
        rows = self.selector(x_norm, self.get_submodule(paths.q_proj), self.get_submodule(paths.k_proj))  # B*(P+K)
        # torch.export and ONNX pass a filled mask, a user may pass one, CLIP passes a second (causal) one:
        # every (.., N, N) tensor argument is cut to the kept rows and columns; other tensors are refused
        attention_mask, *args = (_kept_mask(a, rows, x.shape) for a in (attention_mask, *args))
        kwargs = {k: _kept_mask(v, rows, x.shape) for k, v in kwargs.items()}
        out = self.vitidle_base.forward(self, gather_tokens(x, rows), attention_mask, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # B, P + K, C
        merged = merge_tokens(x, rows, y)
        return (merged, *out[1:]) if isinstance(out, tuple) else merged

    def __reduce_ex__(self, protocol):
        # generated classes are not importable: pickle as (dense class, state) and regenerate on loading
        return _restore_layer, (self.vitidle_base,), self.__dict__.copy()


_IDLE_CLASSES: dict[type, type] = {}


def idle_class(base: type) -> type:
    """The idle subclass of a dense layer class, made once per class (`IdleViTLayer` for `ViTLayer`)."""
    if base not in _IDLE_CLASSES:
        _IDLE_CLASSES[base] = type(f"Idle{base.__name__}", (IdleLayer, base), {"vitidle_base": base,
                                                                              "__module__": __name__})
    return _IDLE_CLASSES[base]


def _restore_layer(base: type) -> nn.Module:
    layer = base.__new__(base)
    layer.__class__ = idle_class(base)
    return layer


def _refuse_attention_maps() -> None:
    """Refuse `output_attentions=True`: an idle layer's attention covers its kept tokens only, in no fixed order."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: nothing to check
        return
    collected = _active_collector.get()
    if collected is not None and "attentions" in collected:
        raise UsageError("output_attentions=True is not supported by a vitidle-converted model: its idle layers "
                         "attend among their kept tokens only; use the dense model for attention maps")


def _kept_mask(arg: Any, rows: Tensor, shape: torch.Size) -> Any:
    return gather_mask(arg, rows, shape) if isinstance(arg, Tensor) else arg


def gather_mask(mask: Tensor, rows: Tensor, shape: torch.Size) -> Tensor:
    """An attention mask (B or 1, 1 or H, N or 1, N) cut to the kept tokens' rows and columns."""
    B, N, _ = shape
    if mask.dim() != 4 or mask.shape[-1] != N:
        raise UsageError(f"an idle layer takes (batch, heads, {N}, {N}) attention masks besides its tokens, got a "
                         f"tensor of shape {list(mask.shape)}")
    pos = rows.view(B, -1) % N  # B, P + K: positions within each image (at batch 1 rows are positions)
    kept = pos.shape[1]
    heads, queries = mask.shape[1], mask.shape[2]
    mask = mask.expand(B, heads, queries, N)
    if queries == N:
        mask = mask.gather(2, pos[:, None, :, None].expand(B, heads, kept, N))
    return mask.gather(3, pos[:, None, None, :].expand(B, heads, mask.shape[2], kept))


def apply_plan(model: nn.Module, layout: HFLayout, plan) -> nn.Module:
    """Make every layer the plan idles an idle layer, in place (same module, same keys); return the model."""
    if len(plan.keep) != len(layout.blocks):
        raise ConversionError(f"pass apply_plan: the plan covers {len(plan.keep)} layers, the model has "
                              f"{len(layout.blocks)}")
    for name, paths, num_keep in zip(layout.blocks, layout.layers, plan.num_keep(layout.num_patches)):
        if num_keep is None:
            continue
        layer = model.get_submodule(name)
        selector = TokenSelector(num_keep, layout.num_prefix, layout.num_patches, paths.num_heads, paths.scale,
                                 layout.query)
        layer.add_module(SELECTOR, selector.train(layer.training))
        layer.vitidle_layer = paths
        layer.__class__ = idle_class(type(layer))
    return model


def convert(model: str | nn.Module, keep: float = 0.7, *, schedule: str = "idlevit", plan=None,
            pretrained: bool = True, weights: str | os.PathLike | None = None,
            model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`vitidle.convert` for a transformers model (or an `hf:` name): the same model object, with idle layers.

    See `vitidle.convert`; `model_kwargs` go to `from_pretrained` for an `hf:` name (`attn_implementation`).
    """
    from . import __version__
    from .convert import idle_plan_of

    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if isinstance(model, str):
        model = create(model, pretrained=pretrained, weights=weights, **(model_kwargs or {}))
    elif weights is not None:
        from .models import load_weights

        load_weights(model, weights)
    layout = discover(model)
    idle_plan = idle_plan_of(plan, keep, schedule, len(layout.blocks))
    apply_plan(model, layout, idle_plan)
    config = model.config
    model.vitidle_config = {
        "vitidle_version": __version__,
        "base_model": source if is_hf_name(source) else f"{PREFIX}{source or type(model).__name__}",
        "model_kwargs": {},
        "hf": {"class": type(model).__name__, "attn_implementation": config._attn_implementation,
               "config": config.to_dict()},
        "plan": {"keep": list(idle_plan.keep), "num_keep": idle_plan.num_keep(layout.num_patches)},
        "layout": {"blocks": list(layout.blocks), "num_tokens": layout.num_tokens, "num_prefix": layout.num_prefix,
                   "query": layout.query},
        "input": {"input_size": list(input_size(model)), **INPUT_DEFAULTS},
    }
    return model


# ---------------------------------------------------------------------------------------------- models and files


def create(name: str, *, pretrained: bool = True, weights: str | os.PathLike | None = None, **model_kwargs) -> nn.Module:
    """The dense transformers model an `hf:` name means: `hf:./folder` (a save_pretrained folder) or
    `hf:org/name` (the hub, or its local cache when the hub is unreachable). Never runs remote code."""
    from .models import hub_reachable

    source = name[len(PREFIX):] if is_hf_name(name) else name
    if not source:
        raise UsageError(f"{name!r} names no model: give hf:ORG/NAME (the hub) or hf:./FOLDER (save_pretrained)")
    unknown = sorted(set(model_kwargs) - MODEL_ARGS)
    check_attention(model_kwargs.get("attn_implementation", "sdpa"))
    if unknown:
        raise UsageError(f"model argument(s) {', '.join(unknown)} cannot be given for an hf: model; "
                         f"allowed: {', '.join(sorted(MODEL_ARGS))}")
    local = Path(source).expanduser()
    if local.is_dir():
        source, offline = str(local), True
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UsageError(f"no such model folder: {source} (hf:./FOLDER is a save_pretrained folder)")
    else:
        offline = not hub_reachable()  # no retries for minutes: the local cache answers, or nothing does
    with quiet_transformers():
        return _create(source, offline, local.is_dir(), pretrained, weights, model_kwargs)


def _create(source: str, offline: bool, local: bool, pretrained: bool, weights, model_kwargs: dict) -> nn.Module:
    import transformers

    from .models import load_weights

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # OSError, ValueError, hub errors: all mean the model cannot be had
        where = "in that folder" if local else (
            "the hub is unreachable and it is not in the local cache" if offline else "on the hub")
        raise WeightsUnavailableError(f"cannot load hf:{source}: no usable config.json {where} "
                                      f"({type(e).__name__})") from e
    cls = model_class((config.architectures or [""])[0]) if config.architectures else transformers.AutoModel
    try:
        if pretrained and weights is None:
            model = cls.from_pretrained(source, config=config, local_files_only=offline, **model_kwargs)
        else:
            model = cls.from_config(config, **model_kwargs) if cls is transformers.AutoModel else \
                cls._from_config(config, **model_kwargs)
    except Exception as e:
        raise WeightsUnavailableError(f"cannot load the weights of hf:{source} ({type(e).__name__}: {first_line(e)}); "
                                      "pass --no-pretrained for random init") from e
    find_layers(model)  # a text model or a CNN fails here, before anything runs on it
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or warnings from transformers while it loads: the CLI prints one line per outcome."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_attention(name: Any) -> str:
    """`name` if it is an attention kernel vitidle lets a model use (`ATTENTION`), else UsageError."""
    if name not in ATTENTION:
        raise UsageError(f"attn_implementation {name!r} is not supported: use one of {', '.join(ATTENTION)}")
    return name


def model_class(name: str) -> type:
    """A transformers model class by name; only PreTrainedModel subclasses (a vitidle.json is user-editable)."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedModelError(f"{name!r} is not a transformers model class (transformers "
                                    f"{transformers.__version__})")
    return cls


def dense_from_config(config: dict) -> nn.Module:
    """The dense transformers model a vitidle config describes, with random weights."""
    hf = config["hf"]
    cls = model_class(hf["class"])
    hf_config = cls.config_class.from_dict(hf["config"])
    hf_config._attn_implementation = check_attention(hf.get("attn_implementation") or "sdpa")
    return cls(hf_config).eval()  # on the meta device inside `with torch.device("meta")` (vitidle.load's check)


def rebuild(config: dict) -> nn.Module:
    """The converted model a config describes, with random weights: class, config, plan and knobs."""
    from .engine import IdlePlan

    model = convert(dense_from_config(config), plan=IdlePlan(config["plan"]["keep"]))
    if model.vitidle_config["layout"]["blocks"] != config["layout"]["blocks"]:
        raise CheckpointError(f"the layers of {config['hf']['class']} are not those the config names")
    model.vitidle_config["base_model"] = config["base_model"]
    num_keep = config["plan"].get("num_keep") or [None] * len(config["plan"]["keep"])
    for name, k in zip(config["layout"]["blocks"], num_keep, strict=True):
        if k is not None:
            model.get_submodule(name).get_submodule(SELECTOR).num_keep = int(k)
    model.vitidle_config["plan"]["num_keep"] = list(num_keep)
    return model


def check_rebuild(model: nn.Module, config: dict) -> None:
    """Refuse to save what `load` would not rebuild: the stored class and config must give the same outputs."""
    try:
        fresh = rebuild(config)
        fresh.load_state_dict(model.state_dict())
    except Exception as e:
        raise UsageError(f"cannot save: {config['hf']['class']} from its own config builds a different model "
                         f"({type(e).__name__}: {first_line(e)})") from e
    x = sample_input(fresh, batch_size=2)
    param = next(model.parameters())
    with evaluating(model), evaluating(fresh), torch.no_grad():
        try:
            torch.testing.assert_close(model(x.to(param))[0], fresh(x)[0], rtol=1e-3, atol=1e-3, check_device=False,
                                       check_dtype=False)
        except AssertionError:
            raise UsageError(f"cannot save: {config['hf']['class']} rebuilt from its config computes differently "
                             "from this model") from None
