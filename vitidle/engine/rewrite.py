"""Rewrite each idle block's fx graph: select tokens before it, merge the idle ones back after it.

Each pass is a function on a block's graph with one job:
    find_attention          -> the attention call and the normed input it reads
    insert_token_selection  -> x  becomes  gather_tokens(x, selector(norm(x), W_q, b_q, W_k, b_k))
    reuse_normed_tokens     -> norm(kept)  becomes  gather_tokens(norm(x), index): no second norm
    insert_token_merge      -> y  becomes  merge_tokens(x, index, y, write_into_input): idle tokens
                               copied unchanged, into x itself where `IdleSequential` says it may
The rewritten block is a GraphModule that holds the block's own submodules under their own
names plus one parameter-free `selector`, so state-dict keys do not change. `apply_plan` also
makes the model's nn.Sequential of blocks an `IdleSequential` (same keys).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import ConversionError
from ..idle import (
    PER_TOKEN_NORMS,
    SELECTOR,
    IdleSequential,
    KeyedLinear,
    PositionalSelector,
    TokenSelector,
    check_pinned,
    gather_bias,
    gather_normed_tokens,
    gather_rope,
    gather_tokens,
    merge_tokens,
    token_rows,
)
from ..scoring import QueryKey, is_attention, query_key
from .discover import ViTLayout, position_bias, specialized_args, trace, trace_inline
from .plan import IdlePlan


def find_attention(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, fx.Node]:
    """Return (x, attention call, its input): the input is x itself or a module applied to x (the norm)."""
    modules = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and is_attention(modules[n.target])]
    if len(calls) != 1:
        raise ConversionError(f"pass find_attention: expected one attention call in the block, found {len(calls)}")
    attn = calls[0]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    src = attn.args[0]
    if src is not x and not (src.op == "call_module" and src.args[:1] == (x,) and len(src.args) == 1):
        raise ConversionError(
            f"pass find_attention: the input of {attn.target} is neither the block input nor norm(block input)"
        )
    return x, attn, src


def insert_token_selection(
    gm: fx.GraphModule, x: fx.Node, attn: fx.Node, attn_input: fx.Node, qk: QueryKey
) -> fx.Node:
    """Insert the selector and the gather of kept tokens; every former use of x reads the kept tokens.

    The selector gets the attention's projection modules, not their weights: it scores with
    whatever they are when it runs (an adapter or wrapper put on them after the conversion included).
    Returns the index node (flat rows of the kept tokens) for the passes after it.
    """
    graph = gm.graph
    first_use = next(n for n in graph.nodes if x in n.all_input_nodes)
    with graph.inserting_before(first_use):
        x_norm = x if attn_input is x else graph.call_module(attn_input.target, (x,))
        q_proj = graph.get_attr(f"{attn.target}.{qk.q_proj}")
        k_proj = q_proj if qk.k_proj == qk.q_proj else graph.get_attr(f"{attn.target}.{qk.k_proj}")
        index = graph.call_module(SELECTOR, (x_norm, q_proj, k_proj))
        kept = graph.call_function(gather_tokens, (x, index))
    x.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (x_norm, index, kept))
    return index


def reuse_normed_tokens(gm: fx.GraphModule, attn_input: fx.Node, index: fx.Node, x_norm: fx.Node | None = None) -> None:
    """Where the attention reads a per-token norm of the kept tokens, gather the norm already taken of all.

    LayerNorm and RMSNorm act on each token alone, so gather(norm(x)) == norm(gather(x)).
    """
    if attn_input.op != "call_module" or not isinstance(gm.get_submodule(attn_input.target), PER_TOKEN_NORMS):
        return
    x_norm = x_norm or index.args[0]
    with gm.graph.inserting_before(attn_input):
        kept_norm = gm.graph.call_function(gather_tokens, (x_norm, index))
    attn_input.replace_all_uses_with(kept_norm)
    gm.graph.erase_node(attn_input)


def insert_token_merge(gm: fx.GraphModule, x: fx.Node, index: fx.Node) -> None:
    """Write the block's output for the kept tokens into a copy of x; idle tokens are copied as they came.

    The block gets a second argument, `write_into_input=False`: True writes into x itself.
    """
    graph = gm.graph
    with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
        into_x = graph.placeholder("write_into_input", default_value=False)
    output = graph.output_node()
    (y,) = output.args
    with graph.inserting_before(output):
        merged = graph.call_function(merge_tokens, (x, index, y, into_x))
    output.args = (merged,)


def insert_positions(gm: fx.GraphModule, x: fx.Node, attention: str, attn_input: fx.Node,
                     positions: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node]:
    """`insert_token_selection` for a `PositionalSelector`: it also gets the attention module and the block's
    position tensors (`positions`: a "rope" table, a "bias"), and every other use of those reads the kept
    tokens' rows (a rotary table) or rows and columns (a bias). Returns (kept positions, their rows in the
    flattened tokens)."""
    graph = gm.graph
    first_use = next(n for n in graph.nodes if x in n.all_input_nodes or any(
        p in n.all_input_nodes for p in positions.values()))
    gather = {"rope": lambda p, index: graph.call_function(gather_rope, (p, index, gm.get_submodule(SELECTOR).num_prefix)),
              "bias": lambda p, index: graph.call_function(gather_bias, (p, index))}
    with graph.inserting_before(first_use):
        x_norm = x if attn_input is x else graph.call_module(attn_input.target, (x,))
        module = graph.get_attr(attention)
        index = graph.call_module(SELECTOR, (x_norm, module, positions.get("rope"), positions.get("bias")))
        rows = graph.call_function(token_rows, (x, index))
        kept = graph.call_function(gather_tokens, (x, rows))
        for kind, p in positions.items():
            gathered = gather[kind](p, index)
            p.replace_all_uses_with(gathered, delete_user_cb=lambda user, g=gathered: user not in (index, g))
    x.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (x_norm, index, rows, kept))
    return index, rows


def hand_over_keys(gm: fx.GraphModule, attention: str) -> None:
    """Where the selector projects keys to score (a rotary table per head: no shared-table shortcut), let the
    attention reuse the kept tokens' keys instead of projecting them again: its key projection, a plain
    nn.Linear, becomes a `KeyedLinear` (same parameters), and the gather of the normed tokens it reads hands
    them over (`gather_normed_tokens`)."""
    selector = gm.get_submodule(SELECTOR)
    qk = selector.qk
    proj = gm.get_submodule(f"{attention}.{qk.k_proj}")
    if selector.rope_dims == 2 or type(proj) is not nn.Linear or qk.q_bias or qk.k_bias:
        return  # a shared table projects no key; a wrapped projection or a separate bias is left as it is
    attn = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == attention)
    kept_norm = attn.args[0]
    if kept_norm.op != "call_function" or kept_norm.target is not gather_tokens:
        return
    with gm.graph.inserting_before(kept_norm):
        owner, module = gm.graph.get_attr(SELECTOR), gm.graph.get_attr(attention)
    kept_norm.target, kept_norm.args = gather_normed_tokens, (*kept_norm.args, owner, module)
    proj.__class__ = KeyedLinear


def hoist(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> None:
    """Move `node`, computed without the tokens x, and what it is computed from before x's first use, so the
    selector (inserted there) can read it."""
    first_use = next(n for n in gm.graph.nodes if x in n.all_input_nodes)
    needed, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in needed and n.op != "placeholder":
            needed.add(n)
            todo.extend(n.all_input_nodes)
    for n in [n for n in gm.graph.nodes if n in needed]:  # in graph order, so each still follows its inputs
        first_use.prepend(n)


def accept_pinned(gm: fx.GraphModule, pinned: dict[str, Any]) -> None:
    """Give the traced block back the arguments its trace fixed, which the model still passes
    (attn_mask=None, is_causal=False): each is checked against its fixed value, so a mask is refused, not ignored."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for name, value in pinned.items():
        with graph.inserting_after(last):
            last = graph.placeholder(name, default_value=value)
        if last.name != name:  # fx renamed it: the block would not take the model's keyword argument
            raise ConversionError(f"pass accept_pinned: the block's argument {name} clashes with a name in its graph")
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            graph.call_function(check_pinned, (last, value, name))


def idle_block(block: nn.Module, num_keep: int, num_prefix: int, num_patches: int, query: str = "cls",
               side: dict[str, str] | None = None, pinned: dict[str, Any] | None = None,
               rope_dims: int = 2, inner_bias: bool = False, rope_paired: bool = False) -> fx.GraphModule:
    """Return `block` rewritten to run on the prefix tokens and its top-`num_keep` image tokens only.

    `side` names the block's position inputs ("rope" or "bias", `ViTLayout.side`) and `pinned` the
    arguments the model passes as constants; a block with either (or whose attention keeps its query
    bias apart) gets a `PositionalSelector`, and its position inputs are gathered for the kept tokens.
    With `inner_bias` the attention computes a bias of its own (`ViTLayout.inner_bias`): the block is traced
    through its attention (`trace_inline`) and that bias is gathered where the attention reads it.

    >>> import timm, torch
    >>> block = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32).blocks[0]
    >>> idle_block(block, num_keep=2, num_prefix=1, num_patches=4)(torch.randn(2, 5, 192)).shape
    torch.Size([2, 5, 192])
    """
    side, pinned = dict(side or {}), dict(pinned or {})
    if side or pinned:  # the position inputs stay arguments; the rest is fixed as the model passes it
        concrete = {k: v for k, v in specialized_args(block.forward).items() if k not in side}
        gm = trace(block, concrete_args={**concrete, **pinned})
    else:
        gm = trace(block)
    x, attn, attn_input = find_attention(gm)
    qk = query_key(gm.get_submodule(attn.target), attn.target)
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    positions = {kind: placeholders[arg] for arg, kind in side.items()}
    if len(positions) != len(side):
        raise ConversionError(f"pass idle_block: the block takes two position inputs of one kind: {side}")
    if inner_bias:  # the attention's own bias: trace through the attention to reach it
        gm = trace_inline(block, {**specialized_args(block.forward), **pinned})
        x, leaf_x = next(n for n in gm.graph.nodes if n.op == "placeholder"), x
        attn_input = x if attn_input is leaf_x else next(
            n for n in x.users if n.op == "call_module" and n.target == attn_input.target)
        positions = {"bias": position_bias(gm, num_prefix + num_patches)}
        hoist(gm, positions["bias"], x)
    if side or pinned or inner_bias or not qk.plain:
        selector = PositionalSelector(num_keep, num_prefix, num_patches, qk, query, rope_dims, rope_paired)
        return _idle_positional(block, gm, x, attn.target, attn_input, selector, positions, pinned)
    selector = TokenSelector(num_keep, num_prefix, num_patches, qk.num_heads, qk.scale, query, qk.q_rows, qk.k_rows)
    gm.add_submodule(SELECTOR, selector.train(block.training))
    index = insert_token_selection(gm, x, attn, attn_input, qk)
    if attn_input is not x:
        reuse_normed_tokens(gm, attn_input, index)
    insert_token_merge(gm, x, index)
    gm.graph.lint()
    gm.recompile()
    gm.__class__.__name__ = f"Idle{type(block).__name__}"
    gm.training = block.training  # not .train(): the submodules keep their own modes
    return gm


def _idle_positional(block: nn.Module, gm: fx.GraphModule, x: fx.Node, attention: str, attn_input: fx.Node,
                     selector: PositionalSelector, positions: dict[str, fx.Node], pinned: dict[str, Any]
                     ) -> fx.GraphModule:
    gm.add_submodule(SELECTOR, selector.train(block.training))
    index, rows = insert_positions(gm, x, attention, attn_input, positions)
    if attn_input is not x:
        reuse_normed_tokens(gm, attn_input, rows, index.args[0])
        hand_over_keys(gm, attention)
    accept_pinned(gm, pinned)
    insert_token_merge(gm, x, rows)
    gm.graph.lint()
    gm.recompile()
    gm.__class__.__name__ = f"Idle{type(block).__name__}"
    gm.training = block.training
    return gm


def apply_plan(model: nn.Module, layout: ViTLayout, plan: IdlePlan) -> nn.Module:
    """Replace, in place, every block the plan idles by its rewritten graph; return the model."""
    if len(plan.keep) != len(layout.blocks):
        raise ConversionError(
            f"pass apply_plan: the plan covers {len(plan.keep)} blocks, the model has {len(layout.blocks)}"
        )
    for name, num_keep in zip(layout.blocks, plan.num_keep(layout.num_patches)):
        if num_keep is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, idle_block(getattr(parent, child), num_keep, layout.num_prefix, layout.num_patches,
                                          layout.query, dict(layout.side), dict(layout.pinned), layout.rope_dims,
                                          layout.inner_bias, layout.rope_paired))
    chain_in_sequential(model, layout)
    return model


def chain_in_sequential(model: nn.Module, layout: ViTLayout) -> None:
    """Make the nn.Sequential that holds exactly the block chain an `IdleSequential` (same children)."""
    names = {name.rpartition(".")[0] for name in layout.blocks}
    if len(names) != 1:
        return
    (name,) = names
    container = model.get_submodule(name)
    if type(container) is not nn.Sequential or len(container) != len(layout.blocks):
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, IdleSequential(OrderedDict(container.named_children())))


def num_keep_of(model: nn.Module) -> list[int | None]:
    """Each block's current `selector.num_keep` (None for a dense block): the plan as it runs now."""
    model = unwrap(model)
    blocks = (model.get_submodule(name) for name in config_of(model)["layout"]["blocks"])
    return [block.selector.num_keep if isinstance(getattr(block, SELECTOR, None), TokenSelector) else None
            for block in blocks]


def config_of(model: nn.Module) -> dict[str, Any]:
    """The vitidle config `convert` attached to a converted model."""
    config = getattr(unwrap(model), "vitidle_config", None)
    if config is None:
        raise ConversionError("this model was not converted by vitidle.convert (it has no vitidle_config)")
    return config


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's, DistributedDataParallel's and DataParallel's wrappers (any nesting)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
