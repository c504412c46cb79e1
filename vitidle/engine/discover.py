"""Trace a model with torch.fx and find, by structure, the chain of transformer blocks it idles.

A block is any module with a direct child attention module (`scoring.is_attention`). The model
is traced with blocks as leaves, shapes are propagated on one sample, and the blocks must form a
chain (each consumes the previous one's output) of (B, N, C) -> (B, N, C) maps. No model names.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConversionError, UnsupportedModelError, first_line
from ..idle import TokenSelector, rotary_pairs
from ..scoring import is_attention, query_key


@dataclass(frozen=True)
class ViTLayout:
    """What the rewrite needs to know about a ViT: its block chain and its token layout."""

    blocks: tuple[str, ...]  # qualified module names of the block chain, in order
    num_tokens: int  # N: tokens entering every block
    num_prefix: int  # class, distillation and register tokens at the front
    dim: int  # C
    query: str  # "cls" scores with the class token's query, "mean" with the mean query
    # tensors the model passes to every block beside the tokens, by argument name: "rope" (a rotary table
    # of the image tokens) or "bias" (a logit bias over all tokens); and the other arguments it passes, fixed
    side: tuple[tuple[str, str], ...] = ()
    pinned: tuple[tuple[str, Any], ...] = ()
    rope_dims: int = 2  # the rank of the rotary table: 2 for one shared by all heads, 3 for one per head
    rope_paired: bool = False  # whether the rotary table turns partner columns by one angle (`idle.rotary_pairs`)
    inner_bias: bool = False  # each attention computes a logit bias of its own (BEiT, relpos ViTs): traced inline

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


def is_block(module: nn.Module) -> bool:
    """True for a module with a direct child attention module (a transformer block)."""
    return not is_attention(module) and any(is_attention(child) for child in module.children())


class LeafTracer(fx.Tracer):
    """fx tracer that stops at blocks, attention modules and parameter-holding leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_block(m) or is_attention(m) or not any(True for _ in m.children()) or super().is_leaf_module(
            m, qualname
        )


def specialized_args(forward) -> dict:
    """Pin every optional forward argument (attn_mask=None, is_causal=False, ...) to its default."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


class InlineTracer(LeafTracer):
    """`LeafTracer` that also traces through the attention child `attention`, down to torch's own modules:
    a position bias the attention computes from its parameters alone becomes nodes of the block's graph."""

    def __init__(self, attention: str | None = None):  # None: as `LeafTracer` (fx re-traces unpickled graphs so)
        super().__init__()
        self.attention = attention

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.attention is not None and (qualname == self.attention or qualname.startswith(f"{self.attention}.")):
            return fx.Tracer.is_leaf_module(self, m, qualname)
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module, concrete_args: dict | None = None, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """Trace `module.forward` with `tracer` (default `LeafTracer`), its optional arguments pinned
    (`concrete_args`, default: all to their defaults); a failure names the pass and the module."""
    if concrete_args is None:
        concrete_args = specialized_args(module.forward)
    try:
        graph = (tracer or LeafTracer()).trace(module, concrete_args=concrete_args)
    except Exception as e:  # fx raises many kinds; all mean the same to the user
        raise ConversionError(f"pass trace: torch.fx cannot trace {type(module).__name__}: {e}") from e
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    drop_pinned_args(gm.graph)
    gm.recompile()
    return gm


def trace_inline(block: nn.Module, concrete_args: dict) -> fx.GraphModule:
    """Trace `block` with its attention inlined (`InlineTracer`); the graph module holds the attention module
    itself, so state-dict keys and the attributes the selector reads stay the block's.

    fx fixes Python branches on `self.training` at trace time: a block whose trace differs between the
    two modes (attention dropout inside its own code) is refused, as neither trace is right for both.
    """
    name = _attention_child(block)
    modes = [(m, m.training) for m in block.modules()]
    codes = []
    try:
        for mode in (False, True):
            block.train(mode)
            try:
                gm = trace(block, concrete_args, InlineTracer(name))
            finally:
                for attr in [a for a in vars(block) if a.startswith("_tensor_constant")]:  # fx's, left on its root
                    delattr(block, attr)
            codes.append(gm.code)
    finally:
        for m, training in modes:
            m.training = training
    if codes[0] != codes[1]:
        raise UnsupportedModelError(
            f"pass trace_inline: the attention of {type(block).__name__} branches on training mode in its own code "
            "(attention dropout?), which a traced graph cannot; convert it with attn_drop_rate=0")
    setattr(gm, name, block.get_submodule(name))
    for attr in [a for a in gm._buffers if a.startswith("_tensor_constant")]:  # fx's constants: out of the state dict
        gm._non_persistent_buffers_set.add(attr)
    return gm


def position_bias(gm: fx.GraphModule, num_tokens: int) -> fx.Node:
    """The node of an inlined block's graph (`trace_inline`) that is its attention's own position bias:
    the one (…, H, N, N) tensor computed from parameters and buffers alone that the token computation reads."""
    from_tokens = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in from_tokens for a in n.all_input_nodes):
            from_tokens.add(n)
    run = fx.Interpreter(gm)
    terms = []
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in from_tokens or n.op == "output":
                continue
            run.env[n] = value = run.run_node(n)
            if (isinstance(value, torch.Tensor) and value.dim() >= 3 and tuple(value.shape[-2:]) == (num_tokens,) * 2
                    and any(u in from_tokens for u in n.users)):
                terms.append(n)
    if len(terms) != 1:
        raise UnsupportedModelError(
            f"pass position_bias: {type(gm).__name__}'s attention reads {len(terms)} (…, N, N) terms computed from "
            f"its parameters (N = {num_tokens}), not one position bias; vitidle cannot tell which rows to gather")
    return terms[0]


def drop_pinned_args(graph: fx.Graph) -> None:
    """Remove the pinned optional arguments and fx's asserts on them: forward(x) only.

    fx guards a pinned argument with `_assert_is_none`, which does not pickle (and, once a pickled
    copy is loaded, breaks every later trace in the process). Without the argument, a caller who
    passes attn_mask to an idle block gets a TypeError instead of a silently ignored mask.
    """
    asserts = (torch._assert, fx._symbolic_trace._assert_is_none)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in asserts:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if not node.users:
            graph.erase_node(node)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a sample forward; afterwards every submodule gets back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def sample_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """Random images of the model's input size, on its device and in its floating dtype."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    return torch.randn(batch_size, *input_size(model), dtype=dtype, device=device)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects: its patch embedding's image size, else its timm or transformers config."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    # the first convolution sees the image: `proj`, or a hybrid's backbone stem before it
    conv = next((m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)), None) if patch_embed is not None else None
    if img_size is not None and conv is not None:
        return (conv.in_channels, *img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    size = getattr(getattr(model, "config", None), "image_size", None)  # a transformers model's config
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return int(getattr(model.config, "num_channels", 3)), int(h), int(w)
    raise UnsupportedModelError(
        f"cannot tell the input size of {type(model).__name__}: it has no patch_embed.img_size, pretrained_cfg "
        "or config.image_size"
    )


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each tensor's shape in `node.meta["shape"]` (fx's ShapeProp prints a
    traceback of its own on a failure; this one raises the error as it came)."""

    def __init__(self, gm: fx.GraphModule, keep_inputs: tuple[fx.Node, ...] = ()):
        super().__init__(gm)
        self.extra_traceback = False  # no node dump appended to the error's message
        self.keep_inputs = keep_inputs  # nodes whose arguments are kept in node.meta["inputs"]

    def run_node(self, n: fx.Node):
        if n in self.keep_inputs:
            n.meta["inputs"] = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def discover(model: nn.Module) -> ViTLayout:
    """Find the block chain and token layout of `model` by tracing it.

    >>> import timm
    >>> layout = discover(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32))
    >>> layout.blocks, layout.num_tokens, layout.num_prefix
    (('blocks.0', 'blocks.1'), 5, 1)
    """
    name = type(model).__name__
    if any(isinstance(m, TokenSelector) for m in model.modules()):
        raise UnsupportedModelError(f"{name} is already converted by vitidle; convert the dense model instead")
    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_block(modules[n.target])]
    if not nodes:
        raise UnsupportedModelError(
            f"{name} has no attention blocks (modules with a qkv self-attention child); "
            "vitidle converts ViT-style models such as timm's VisionTransformer"
        )
    side_nodes, pinned = block_arguments(name, nodes, modules)
    for node in nodes:
        query_key(modules[node.target].get_submodule(_attention_child(modules[node.target])), node.target)

    try:
        with evaluating(model), torch.no_grad():
            ShapeRecorder(gm, tuple(nodes)).run(sample_input(model))
    except Exception as e:
        raise ConversionError(f"pass discover: a sample forward through {name} failed: {type(e).__name__}: "
                              f"{first_line(e)}") from e
    shape_in = nodes[0].args[0].meta["shape"]
    for node in nodes:
        shape_out = node.meta["shape"]
        if len(shape_out) != 3 or shape_out != shape_in:
            raise UnsupportedModelError(
                f"pass discover: block {node.target} maps {shape_in} to {shape_out}; "
                "vitidle needs blocks that keep the (B, N, C) token shape"
            )
    _, num_tokens, dim = shape_in

    num_prefix = getattr(model, "num_prefix_tokens", None)
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if num_prefix is None:
        if num_patches is None:
            raise UnsupportedModelError(f"cannot tell {name}'s prefix tokens: it has no num_prefix_tokens")
        num_prefix = num_tokens - num_patches
    elif num_patches is not None and num_tokens != num_prefix + num_patches:
        raise UnsupportedModelError(
            f"pass discover: {name}'s blocks see {num_tokens} tokens, not its {num_prefix} prefix + {num_patches} "
            "patch tokens (a class token that joins after the blocks?); vitidle cannot tell which token to score with"
        )
    has_cls = getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False))
    first = modules[nodes[0].target]
    qk = query_key(first.get_submodule(_attention_child(first)))
    attn_dim = qk.q_rows.stop if qk.q_rows else first.get_submodule(f"{_attention_child(first)}.{qk.q_proj}").out_features
    head_dim = attn_dim // qk.num_heads
    side = side_kinds(side_nodes, num_tokens, int(num_prefix), head_dim)
    inner = set()
    for node in nodes:
        block = modules[node.target]
        attn = block.get_submodule(_attention_child(block))
        if "rope" in side.values() and getattr(attn, "num_prefix_tokens", num_prefix) != num_prefix:
            raise UnsupportedModelError(
                f"pass discover: the attention of {node.target} leaves {attn.num_prefix_tokens} tokens unrotated, "
                f"the model has {num_prefix} prefix tokens; vitidle cannot tell which tokens carry positions")
        with evaluating(model), torch.no_grad():
            inner.add(probe_fewer_tokens(node, block, side, pinned, num_tokens))
    if len(inner) > 1:
        raise UnsupportedModelError(f"pass discover: some of {name}'s attentions compute a position bias of their own "
                                    "and some do not; vitidle needs blocks alike")
    return ViTLayout(
        blocks=tuple(n.target for n in nodes),
        num_tokens=num_tokens,
        num_prefix=int(num_prefix),
        dim=dim,
        query="cls" if has_cls else "mean",
        side=tuple(side.items()),
        pinned=tuple(pinned.items()),
        rope_dims=next((len(side_nodes[a][0].meta["shape"]) for a, kind in side.items() if kind == "rope"), 2),
        rope_paired=rope_pairs(nodes[0], first, side, qk.rotate_half),
        inner_bias=inner == {True},
    )


def block_arguments(name: str, nodes: list[fx.Node], modules: dict[str, nn.Module]
                    ) -> tuple[dict[str, list[fx.Node]], dict[str, Any]]:
    """Check that the blocks form a chain and return what else they are given: per argument name, the
    tensor each block gets (computed before the chain: a rotary table, a shared bias), and the constants.

    Each block must take the previous block's output as its tokens, and only tensors that no block
    computed beside them; every block must get the same arguments.
    """
    inputs = {}
    for node in nodes:
        if node.args[:1] in inputs:
            raise UnsupportedModelError(
                f"pass discover: in {name}, {inputs[node.args[:1]].target} and {node.target} read the same tokens: "
                "parallel attention branches, not a chain of blocks; vitidle scores tokens with one attention per "
                "layer, and a score across parallel branches is not defined yet")
        inputs[node.args[:1]] = node
    after_chain = set()
    todo = [nodes[0]]
    while todo:  # every node that depends on a block's output
        node = todo.pop()
        if node not in after_chain:
            after_chain.add(node)
            todo.extend(node.users)
    side: dict[str, list[fx.Node]] = {}
    pinned: dict[str, Any] = {}
    for i, node in enumerate(nodes):
        prev = nodes[i - 1] if i else None
        chained = f"block {node.target} does not take block {prev.target}'s output alone" if prev else ""
        try:
            bound = inspect.signature(modules[node.target].forward).bind(*node.args, **node.kwargs)
        except TypeError as e:
            raise UnsupportedModelError(f"pass discover: in {name}, block {node.target} is called as its "
                                        f"signature does not allow: {e}") from e
        (_, tokens), *rest = bound.arguments.items()
        if prev is not None and tokens is not prev:
            raise UnsupportedModelError(f"pass discover: in {name}, {chained}; vitidle needs a plain chain of blocks")
        names = set()
        for arg, value in rest:
            if isinstance(value, fx.Node):
                if value in after_chain:
                    raise UnsupportedModelError(
                        f"pass discover: in {name}, {chained or f'block {node.target}'} takes {arg} computed from a "
                        "block's output; vitidle needs a plain chain of blocks")
                side.setdefault(arg, []).append(value)
            elif fx.node.map_arg(value, lambda n: n) != value or isinstance(value, fx.Proxy):
                raise UnsupportedModelError(f"pass discover: in {name}, block {node.target} takes {arg} holding "
                                            "tensors in a container; vitidle needs a plain chain of blocks")
            elif i and pinned.get(arg, value) != value or arg not in pinned and i:
                raise UnsupportedModelError(f"pass discover: in {name}, block {node.target} gets {arg}={value!r}, "
                                            "unlike the first block; vitidle needs blocks called alike")
            else:
                pinned[arg] = value
            names.add(arg)
        if i and names != set(side) | set(pinned):
            raise UnsupportedModelError(f"pass discover: in {name}, block {node.target} takes other arguments than "
                                        "the first block; vitidle needs blocks called alike")
    return side, pinned


def side_kinds(side: dict[str, list[fx.Node]], num_tokens: int, num_prefix: int, head_dim: int) -> dict[str, str]:
    """What each tensor given to the blocks is, by its shape: "bias" (…, N, N) or "rope" (…, N - P, 2 · head dim:
    the sines and cosines of each image token's rotation)."""
    kinds = {}
    for arg, values in side.items():
        shape = values[0].meta.get("shape", ())
        bias = len(shape) >= 2 and tuple(shape[-2:]) == (num_tokens, num_tokens)
        rope = 2 <= len(shape) <= 4 and tuple(shape[-2:]) == (num_tokens - num_prefix, 2 * head_dim)
        if bias == rope:
            what = "could be a rotary table or a bias" if bias else "is neither a rotary table of the image tokens " \
                   "(…, N - P, E) nor a logit bias (…, N, N)"
            raise UnsupportedModelError(
                f"pass discover: the blocks take {arg} of shape {tuple(shape)}, which {what} (N = {num_tokens}, "
                f"P = {num_prefix}); vitidle cannot tell how to give it the kept tokens' positions")
        kinds[arg] = "bias" if bias else "rope"
    return kinds


def rope_pairs(node: fx.Node, block: nn.Module, side: dict[str, str], rotate_half: bool) -> bool:
    """Whether the rotary table the model gave the block in the sample forward pairs its columns (`rotary_pairs`)."""
    rope = next((arg for arg, kind in side.items() if kind == "rope"), None)
    if rope is None:
        return False
    args, kwargs = node.meta["inputs"]
    return rotary_pairs(inspect.signature(block.forward).bind(*args, **kwargs).arguments[rope], rotate_half)


def probe_fewer_tokens(node: fx.Node, block: nn.Module, side: dict[str, str], pinned: dict[str, Any],
                       num_tokens: int) -> bool:
    """Run the dense block on all tokens but the last (and its position rows), as an idle block runs on fewer
    tokens. Returns False if it runs, True if it fails because its attention computes a position bias of its
    own for all N tokens (found in its inlined trace: `position_bias`); anything else is refused."""
    args, kwargs = node.meta["inputs"]
    bound = inspect.signature(block.forward).bind(*args, **kwargs)
    (first, x), *_ = bound.arguments.items()
    bound.arguments[first] = x[:, :-1]
    for arg, kind in side.items():
        value = bound.arguments[arg]
        bound.arguments[arg] = value[..., :-1, :] if kind == "rope" else value[..., :-1, :-1]
    try:
        block(*bound.args, **bound.kwargs)
        return False
    except Exception as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
    if not side:  # a bias of the attention's own (BEiT, relpos ViTs): its rows and columns can be gathered
        try:
            position_bias(trace_inline(block, {**specialized_args(block.forward), **pinned}), num_tokens)
            return True
        except (UnsupportedModelError, ConversionError) as e:
            reason += f"; {first_line(e)}"
    raise UnsupportedModelError(
        f"pass discover: block {node.target} does not run on a subset of its tokens ({reason}); its attention "
        "computes a position term for all its tokens itself, which vitidle cannot idle yet")


def _attention_child(block: nn.Module) -> str:
    """The name of the block's attention child; a block with several is ambiguous."""
    names = [n for n, child in block.named_children() if is_attention(child)]
    if len(names) != 1:
        raise UnsupportedModelError(f"{type(block).__name__} has {len(names)} attention modules; vitidle needs one")
    return names[0]
