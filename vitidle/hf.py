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

import ast
import contextlib
import copy
import dis
import functools
import inspect
import os
import sys
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine.discover import evaluating, input_size, sample_input
from .errors import (CheckpointError, ConversionError, UnsupportedModelError, UsageError, WeightsUnavailableError,
                     first_line)
from .idle import (PER_TOKEN_NORMS, SELECTOR, TokenSelector, _patched, gather_tokens, merge_tokens, submodule,
                   unobserved_eager)

HF_CONFIG = "config.json"  # written beside vitidle.json: from_pretrained(folder) of the dense class reads the folder
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
    reuse_norm: bool = False  # the norm runs once per layer call, on its input: the idle layer reuses its scoring output


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
                                    "pixel_values; vitidle converts vision transformers (of an image-text model, its "
                                    "vision model alone: hf:NAME loads it so)")
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
        layers.append(_layer_paths(block, layer, x, q_inputs, outputs, seen))
    _, num_tokens, dim = prev_out.shape
    num_patches = conv_out[0].shape[-2] * conv_out[0].shape[-1] if conv_out else None
    if num_patches is None or not 0 <= num_tokens - num_patches < num_tokens:
        raise UnsupportedModelError(f"pass discover: cannot tell {name}'s image tokens from its prefix tokens "
                                    f"({num_tokens} tokens, patch grid {num_patches})")
    num_prefix = num_tokens - num_patches
    if num_prefix < 1:
        raise UnsupportedModelError(f"{name} has no class token; vitidle scores HF models with their class token")
    return HFLayout(blocks, tuple(layers), num_tokens, num_prefix, dim, "cls")


def _layer_paths(block: str, layer: nn.Module, x: Tensor, proj_inputs: dict[int, Tensor], outputs: dict,
                 seen: list) -> HFLayer:
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
    # the norm's output on the kept tokens is the kept rows of its output on all of them (a per-token norm), so an
    # idle layer hands the scored ones over instead of norming again, where the norm runs once per layer call
    reuse = norm is not None and sum(m is layer.get_submodule(norm) for _, m, _, _ in seen) == 1
    return HFLayer(norm, f"{attn_path}.q_proj", f"{attn_path}.k_proj", num_heads, scale, reuse)


# ------------------------------------------------------------------------------------------------------ rewrite


class Swapped:
    """Base of the mixins whose generated subclasses replace a module's class in place (ToMe-style)."""

    vitidle_base: type  # the dense class

    def __reduce_ex__(self, protocol):
        # generated classes are not importable: pickle as (mixin, dense class, state) and regenerate on loading;
        # an idle layer's last output (`vitidle_made`, a weak reference) is not state
        state = {k: v for k, v in self.__dict__.items() if k != "vitidle_made"}
        return _restore_layer, (self.vitidle_base, _mixin_of(type(self))), state


class IdleLayer(Swapped):
    """Mixin of the generated idle layer classes: score, keep the top-K tokens, run the layer's own forward
    on them, copy the idle tokens unchanged. Holds a parameter-free `selector`; `vitidle_layer` (an
    `HFLayer`) says where the norm and projections are."""

    prefix = "Idle"

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        _refuse_attention_maps()
        x, paths = hidden_states, self.vitidle_layer  # B, N, C
        norm = None if paths.norm is None else submodule(self, paths.norm)
        x_norm = x if norm is None else norm(x)
        rows = self.selector(x_norm, submodule(self, paths.q_proj), submodule(self, paths.k_proj))  # B*(P+K)
        # torch.export and ONNX pass a filled mask, a user may pass one, CLIP passes a second (causal) one:
        # every (.., N, N) tensor argument is cut to the kept rows and columns; other tensors are refused
        if attention_mask is not None or args or kwargs:  # (eager use passes none: no Python spent at batch 1)
            attention_mask, *args = (_kept_mask(a, rows, x.shape) for a in (attention_mask, *args))
            kwargs = {k: _kept_mask(v, rows, x.shape) for k, v in kwargs.items()}
        kept = gather_tokens(x, rows)
        reuse = isinstance(norm, ReusedNorm)
        if reuse:  # the layer's norm returns these rows of x_norm for `kept` instead of norming them again
            norm.__dict__["vitidle_given"] = (kept, gather_tokens(x_norm, rows))  # (nn.Module.__setattr__ is slower)
        try:
            out = self.vitidle_base.forward(self, kept, attention_mask, *args, **kwargs)
        finally:
            if reuse:
                norm.__dict__["vitidle_given"] = None
        y = out[0] if isinstance(out, tuple) else out  # B, P + K, C
        plain = unobserved_eager(x)
        merged = merge_tokens(x, rows, y, into_x=plain and _owns_input(self, x, norm))
        if plain:  # what `_owns_input` asks of the next layer's input
            self.__dict__["vitidle_made"] = weakref.ref(merged)
        return (merged, *out[1:]) if isinstance(out, tuple) else merged


class ReusedNorm(Swapped):
    """Mixin of an idle layer's pre-attention norm: called on the kept tokens the idle layer handed over
    (`vitidle_given`, set only during its forward), it returns their rows of the norm it scored with; on
    anything else it norms. Matching by identity keeps it right under threads: a miss just norms."""

    prefix = "Reused"
    vitidle_given: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        given = self.vitidle_given
        if given is not None and given[0] is x:
            return given[1]
        return self.vitidle_base.forward(self, x)


class CountLayer(Swapped):
    """Mixin of the limit's layers (`limit_model`): the dense layer on the first `vitidle_count` tokens (cut, or
    zero-padded where a dense layer follows idle ones), masks cut alike, with no selection: what `bench` times
    as the limit of idling. Its outputs are not the idle model's."""

    prefix = "Count"
    vitidle_count: int

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
        n, N = self.vitidle_count, hidden_states.shape[1]
        x = hidden_states[:, :n].contiguous() if N > n else F.pad(hidden_states, (0, 0, 0, n - N)) if N < n \
            else hidden_states
        attention_mask, *args = (_first_mask(a, n) for a in (attention_mask, *args))
        return self.vitidle_base.forward(self, x, attention_mask, *args, **{k: _first_mask(v, n) for k, v in
                                                                              kwargs.items()})


def _owns_input(layer: nn.Module, x: Tensor, norm: nn.Module | None) -> bool:
    """Whether the idle `layer` may merge its output into its input `x`, saving the copy of all N tokens (as
    `IdleSequential` lets timm blocks do): only where no one else can read x afterwards.

    That holds when x is what the idle layer just before it returned, in the same run of a loop
    `for layer in self.layers: h = layer(h, ...)` (`_rebinding_calls`): x was made there, went to `h`
    alone, and `h` takes this layer's output next. The layer is once in the list; nothing but torch's and
    transformers' call wrappers runs between the loop and its forward; no hook may have seen x (on either
    layer, the norm, or globally); the norm is a plain one (which keeps nothing). Anything else (a user's
    loop, output_hidden_states' hooks, a layer list in another order) copies, as before.
    """
    plain_norm = type(norm) in PER_TOKEN_NORMS or isinstance(norm, ReusedNorm) and norm.vitidle_base in PER_TOKEN_NORMS
    layers = plain_norm and _loop_layers(layer)
    if not layers:
        return False
    modules = list(layers._modules.values())  # in the loop's order
    at = [i for i, m in enumerate(modules) if m is layer]
    if len(at) != 1 or at[0] == 0:
        return False
    before = modules[at[0] - 1]
    last = before.__dict__.get("vitidle_made")
    # before's class is the layer's, whose forward `_loop_layers` checked; no forward patched on an instance
    return (last is not None and last() is x and type(before) is type(layer)
            and not (_patched(before) or _patched(layer) or _patched(norm))
            and not _may_keep(before._forward_hooks, layer._forward_pre_hooks, layer._forward_hooks,
                              norm._forward_pre_hooks, norm._forward_hooks))


def _may_keep(*hooks: dict) -> bool:
    """Whether any of these module hooks may keep the tensor it sees. transformers' output capturing hooks
    (installed by a first `output_hidden_states=True`, then left) keep nothing unless the forward collects
    outputs."""
    collector = _output_collector()
    for hook in (hook for found in hooks for hook in found.values()):
        if collector is None or collector.get() or (getattr(hook, "__module__", None),
                                                    getattr(hook, "__name__", None)) != CAPTURING_HOOK:
            return True
    return False


def _loop_layers(layer: nn.Module) -> nn.ModuleList | None:
    """The ModuleList that a rebinding loop (`_rebinding_calls`) is calling `layer` from, found on the call
    stack; None if the caller is anything else."""
    wrappers = _call_wrappers(type(layer))
    frame = sys._getframe(3)  # (0: this, 1: _owns_input, 2: the idle layer's forward)
    while frame is not None and id(frame.f_code) in wrappers:
        frame = frame.f_back
    name = None if frame is None else _rebinding_calls(frame.f_code).get(frame.f_lasti)
    if name is None:
        return None
    owner = frame.f_locals.get("self")
    # `self.NAME` found among the owner's modules, not as an attribute or a property of its own
    if not isinstance(owner, nn.Module) or name in owner.__dict__ or hasattr(type(owner), name):
        return None
    layers = owner._modules.get(name)
    return layers if type(layers) is nn.ModuleList else None


@functools.cache
def _call_wrappers(cls: type) -> frozenset[int]:
    """The ids of the code that may run between a loop's `layer(h)` and an idle layer's forward: torch's
    nn.Module call (with the function it defines to run hooks) and transformers' gradient checkpointing
    wrapper of the class's forward, each from its own file. Empty if the class's forward is anything else
    (a patch or a subclass, which may keep the input). Ids, as a code object hashes all its bytecode."""
    chain, forward = [], cls.forward
    while forward is not None and len(chain) < 8:
        chain.append(getattr(forward, "__code__", None))
        forward = getattr(forward, "__wrapped__", None)
    call = [nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__]
    call += [c for c in nn.Module._call_impl.__code__.co_consts if isinstance(c, types.CodeType)]
    wrapper = ("forward_with_checkpointing", "transformers/modeling_layers.py")
    known = (all(_defined_in(code, "torch/nn/modules/module.py") for code in call)
             and chain[-1] is IdleLayer.forward.__code__ and forward is None
             and all(code is not None and code.co_name == wrapper[0] and _defined_in(code, wrapper[1])
                     for code in chain[:-1]))
    return frozenset(map(id, [*call, *chain])) if known else frozenset()


def _defined_in(code: types.CodeType, path: str) -> bool:
    return code.co_filename.replace("\\", "/").endswith(path)


_CALLS: dict[int, tuple[types.CodeType, dict[int, str]]] = {}  # id(code) -> (code, its rebinding calls)


def _rebinding_calls(code: types.CodeType) -> dict[int, str]:
    """`_find_rebinding_calls` of a function's code, found once (kept by id, as the code may be large to hash)."""
    known = _CALLS.get(id(code))
    if known is None or known[0] is not code:
        if len(_CALLS) > 1024:  # (callers made on the fly, by exec)
            _CALLS.clear()
        known = _CALLS[id(code)] = (code, _find_rebinding_calls(code))
    return known[1]


def _find_rebinding_calls(code: types.CodeType) -> dict[int, str]:
    """The calls of the loops `for layer in self.NAME: h = layer(h, ...)` in a function, as {bytecode offset of
    the call: NAME}. The loop body is that one statement and `h` is in no other argument: each layer's input
    is read by that layer alone, and `h` then holds its output. Read from the source, then checked against the
    running bytecode (a file edited since import reads differently): the loop compiles from the source to the
    same instructions, and they are FOR_ITER, `layer =`, the call's own code, `h =`, back to FOR_ITER. Python
    3.11 or later (instruction positions), else none."""
    if "positions" not in dis.Instruction._fields:
        return {}
    try:
        source = inspect.getsource(code)
        indented = source[:1].isspace()  # a method: parsed inside a block (dedenting would stop at a docstring)
        tree = ast.parse("if True:\n" + source if indented else source)
    except (OSError, TypeError, SyntaxError):  # no source (a REPL, a compiled or generated function)
        return {}
    function = tree.body[0].body[0] if indented else tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    lines = code.co_firstlineno - 1 - indented
    loops, todo = {}, list(function.body)
    while todo:  # the function's own statements, not those of functions or classes defined in it
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))
        if not (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and len(node.body) == 1
                and not node.orelse and isinstance(node.iter, ast.Attribute)
                and isinstance(node.iter.value, ast.Name) and node.iter.value.id == "self"):
            continue
        step, layer = node.body[0], node.target.id
        call = step.value if isinstance(step, ast.Assign) else None
        if not (isinstance(call, ast.Call) and len(step.targets) == 1 and isinstance(step.targets[0], ast.Name)
                and isinstance(call.func, ast.Name) and call.func.id == layer and call.args
                and isinstance(call.args[0], ast.Name) and call.args[0].id == step.targets[0].id != layer):
            continue
        h = call.args[0].id
        others = [n for arg in [*call.args[1:], *(k.value for k in call.keywords)] for n in ast.walk(arg)]
        if not any(isinstance(n, ast.NamedExpr) or isinstance(n, ast.Name) and n.id == h for n in others):
            span = (call.lineno + lines, call.end_lineno + lines, call.col_offset, call.end_col_offset)
            loops[span] = (node.iter.attr, layer, h, (node.lineno + lines, node.end_lineno + lines,
                                                      node.col_offset, node.end_col_offset))
    if not loops:
        return {}
    ast.increment_lineno(tree, lines)  # as in the file
    compiled = _code_named(compile(tree, code.co_filename, "exec", dont_inherit=True), code)
    fresh = [] if compiled is None else list(dis.get_instructions(compiled))
    found = {}
    live = list(dis.get_instructions(code))
    at = {ins.offset: k for k, ins in enumerate(live)}
    for k, ins in enumerate(live[:-2]):
        span = tuple(ins.positions) if ins.opname.startswith("CALL") else None
        if span not in loops:
            continue
        name, layer, h, loop = loops[span]
        store, jump = live[k + 1], live[k + 2]
        start = at.get(jump.argval) if jump.opname.startswith("JUMP_BACKWARD") else None
        # the loop runs as its source compiles, and as FOR_ITER, `layer =`, the call's own code, `h =`, back
        if (start is not None and live[start].opname == "FOR_ITER" and _stores(live[start + 1], layer)
                and _stores(store, h) and all(_within(i.positions, span) for i in live[start + 2:k])
                and _shape(live, loop) == _shape(fresh, loop)):
            found[ins.offset] = name
    return found


def _code_named(module: types.CodeType, like: types.CodeType) -> types.CodeType | None:
    """The function code compiled into `module` that has `like`'s name and first line."""
    for const in module.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == like.co_name and const.co_firstlineno == like.co_firstlineno:
                return const
            found = _code_named(const, like)
            if found is not None:
                return found
    return None


def _shape(instructions: list, span: tuple) -> list:
    """The instructions of a source span, by name and argument (jump targets aside)."""
    return [(i.opname, None if i.opcode in dis.hasjrel or i.opcode in dis.hasjabs else i.argval)
            for i in instructions if _within(i.positions, span)]


def _stores(ins: dis.Instruction, name: str) -> bool:
    return ins.opname == "STORE_FAST" and ins.argval == name


def _within(p: dis.Positions, span: tuple) -> bool:
    first, last, col, end_col = span
    return None not in p and (p.lineno, p.col_offset) >= (first, col) and (p.end_lineno, p.end_col_offset) <= (
        last, end_col)


MIXINS = {m.__name__: m for m in (IdleLayer, ReusedNorm, CountLayer)}
_CLASSES: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, base: type) -> type:
    """The subclass of a dense module class with a mixin's forward, made once per pair (`IdleViTLayer`)."""
    if (mixin, base) not in _CLASSES:
        _CLASSES[mixin, base] = type(f"{mixin.prefix}{base.__name__}", (mixin, base),
                                     {"vitidle_base": base, "__module__": __name__})
    return _CLASSES[mixin, base]


def idle_class(base: type) -> type:
    """The idle subclass of a dense layer class, made once per class (`IdleViTLayer` for `ViTLayer`)."""
    return swapped_class(IdleLayer, base)


def _mixin_of(cls: type) -> str:
    return next(name for name, mixin in MIXINS.items() if issubclass(cls, mixin))


def _restore_layer(base: type, mixin: str = "IdleLayer") -> nn.Module:
    module = base.__new__(base)
    module.__class__ = swapped_class(MIXINS[mixin], base)
    return module


def swap(module: nn.Module, mixin: type) -> nn.Module:
    """Give `module` the generated class of its own class and `mixin`, in place (same object, keys and hooks)."""
    module.__class__ = swapped_class(mixin, type(module))
    return module


@functools.cache
def _output_collector() -> Any:
    """transformers' context variable of the outputs a forward collects (None in another transformers layout);
    looked up once, as an idle layer asks on every call."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


CAPTURING_HOOK = ("transformers.utils.output_capturing", "output_capturing_hook")  # (module, name) in 5.x


def _refuse_attention_maps() -> None:
    """Refuse `output_attentions=True`: an idle layer's attention covers its kept tokens only, in no fixed order."""
    collector = _output_collector()
    collected = None if collector is None else collector.get()
    if collected is not None and "attentions" in collected:
        raise UsageError("output_attentions=True is not supported by a vitidle-converted model: its idle layers "
                         "attend among their kept tokens only; use the dense model for attention maps")


def _kept_mask(arg: Any, rows: Tensor, shape: torch.Size) -> Any:
    return gather_mask(arg, rows, shape) if isinstance(arg, Tensor) else arg


def _first_mask(arg: Any, n: int) -> Any:
    """A (.., N, N) or (.., 1, N) mask cut to the first `n` tokens' rows and columns; other arguments as they are."""
    if not isinstance(arg, Tensor) or arg.dim() != 4:
        return arg
    return arg[..., :n, :n] if arg.shape[-2] != 1 else arg[..., :n]


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
        swap(layer, IdleLayer)
        norm = None if paths.norm is None else layer.get_submodule(paths.norm)
        if paths.reuse_norm and not isinstance(norm, ReusedNorm):
            swap(norm, ReusedNorm)
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


# ------------------------------------------------------------------------------------------ export and bench


class TensorOutput(nn.Module):
    """An HF model as `export` and `bench` take a model: pixel values in, one tensor out.

    The tensor is the model's `logits`, else its `pooler_output`, else its `last_hidden_state` (which field
    is found by one sample forward); `num_classes` (0 without logits) makes the ONNX output `logits` or
    `features`, as for timm models, and `pretrained_cfg` / `vitidle_config` give the input size and
    preprocessing. Holds the model as `model` (its keys gain a `model.` prefix).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        with evaluating(model), torch.no_grad():
            out = model(pixel_values=sample_input(model))
        self.field = next((f for f in ("logits", "pooler_output", "last_hidden_state")
                           if isinstance(getattr(out, f, None), Tensor)), None)
        if self.field is None:
            raise UnsupportedModelError(f"{type(model).__name__} returns no logits, pooler_output or last_hidden_state "
                                        "tensor; vitidle exports one of those")
        self.num_classes = out.logits.shape[-1] if self.field == "logits" else 0
        self.pretrained_cfg = {**INPUT_DEFAULTS, "input_size": list(input_size(model))}
        if hasattr(model, "vitidle_config"):
            self.vitidle_config = model.vitidle_config

    def forward(self, pixel_values: Tensor) -> Tensor:
        with eager_masks():
            return getattr(self.model(pixel_values=pixel_values), self.field)


@contextlib.contextmanager
def eager_masks():
    """Under torch.export (the dynamo ONNX exporter), let transformers skip the attention mask as it does in eager
    use, where the model gets no mask: it builds a filled (B, 1, N, N) one only because it will not look into a
    traced padding mask, and with none given there is nothing to look into. Dense, idle and limit models then
    export without a mask to build, pass and (idle layers) gather. A mask the caller gives is kept."""
    from transformers import masking_utils

    exporting = getattr(masking_utils, "is_torchdynamo_exporting", None)
    if exporting is None or not torch.compiler.is_exporting():  # another transformers layout: masks as they are
        yield
        return
    masking_utils.is_torchdynamo_exporting = lambda: False
    try:
        yield
    finally:
        masking_utils.is_torchdynamo_exporting = exporting


def tensor_output(model: nn.Module) -> nn.Module:
    """`model` wrapped in `TensorOutput` if it is a transformers model, else `model` itself."""
    return TensorOutput(model) if is_hf_model(model) else model


def limit_model(dense: nn.Module, idle: nn.Module) -> nn.Module:
    """A copy of the dense HF model whose layers run on `idle`'s current token counts with no selection cost
    (`CountLayer`): `bench`'s limit for transformers models, as `bench.limit_model` makes it for timm ones."""
    from .engine.rewrite import config_of, num_keep_of

    layout = config_of(idle)["layout"]
    limit = copy.deepcopy(dense)
    current = num_tokens = layout["num_tokens"]
    for name, num_keep in zip(layout["blocks"], num_keep_of(idle), strict=True):
        n = num_tokens if num_keep is None else min(layout["num_prefix"] + num_keep, num_tokens)
        if n < num_tokens or current < num_tokens:  # every layer past the first cut: the masks stay (N, N)
            layer = swap(limit.get_submodule(name), CountLayer)
            layer.vitidle_count = n
        current = n
    return limit.eval()


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
    vision = getattr(config, "vision_config", None)
    if getattr(cls, "main_input_name", "pixel_values") != "pixel_values" and type(vision) in transformers.MODEL_MAPPING:
        # an image-text model (CLIP, SigLIP): its vision tower, as the class transformers maps its config to
        config, cls = vision, transformers.MODEL_MAPPING[type(vision)]
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


def config_json(config: dict) -> str:
    """The HF `config.json` text of the dense model a vitidle config describes (what `save_pretrained` writes)."""
    cls = model_class(config["hf"]["class"])
    hf_config = cls.config_class.from_dict(config["hf"]["config"])
    hf_config.architectures = [cls.__name__]
    return hf_config.to_json_string(use_diff=True)


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
