"""The idle op: score tokens, keep the top-K, run the block on them, copy the rest unchanged.

`TokenSelector` is the only module the rewrite adds to a block. It has no parameters, so the
block's state-dict keys stay those of the dense model; its one knob is `num_keep`.
`IdleSequential` runs the chain of blocks and lets an idle block skip the merge's copy where that
is safe.
"""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from typing import Callable, NamedTuple, TypeVar

import timm.layers
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .errors import UsageError

T = TypeVar("T")
SELECTOR = "selector"  # a rewritten block's TokenSelector, by name
# norms that act on each token alone (timm's RMS norms are not nn.RMSNorm; SimpleNorm is newer than timm 1.0.9)
PER_TOKEN_NORMS = tuple(n for n in (nn.LayerNorm, nn.RMSNorm, *(getattr(timm.layers, name, None) for name in (
    "RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32"))) if n is not None)


class TokenSelector(nn.Module):
    """Choose the tokens an idle layer runs on: every prefix token and the top-`num_keep` image tokens.

    A token's score is the head-mean pre-softmax attention logit of the class token's query (the
    mean query, for models without a class token) against that token's key, in the layer's own
    attention, after the layer's norm. `forward` takes the normed tokens and the attention's query
    and key projection modules (one fused qkv Linear, or two) and returns the kept tokens as rows of
    the flattened (B * N, C) tokens, (B * (P + K),), for `gather_tokens` and `merge_tokens`. Their
    order within an image is arbitrary: a block without positional terms is permutation-equivariant,
    and the merge restores it.

    Plain `nn.Linear` projections are scored in O(N·C) from their weights (docs/method.md). A wrapped
    projection (a LoRA adapter, a quantized or hooked Linear) is scored by calling it on every token,
    so the score is what the adapted layer computes.

    With `frozen = True` (`freeze`), eval forwards read one cached C×C product of the weights
    (W_qᵀ W_k, not in the state dict) instead of W_q and W_k. It is formed again when a weight's
    storage or version changes, and dropped by `.train()`, `.eval()` and `.to()`. Writes that bump
    no version are not seen while frozen: `.data` edits, fused optimizer steps within one mode, and
    other processes' writes to shared memory.

    After each forward `kept_index` (B, P + K) holds the kept positions. With
    `record_attention = True` (for the token cut loss) it also keeps, differentiably,
    `attention_logits` (B, N, N: head-mean pre-softmax logits of all tokens), at the cost of
    projecting queries and keys of every token.

    >>> sel = TokenSelector(num_keep=2, num_prefix=1, num_patches=4, num_heads=1, scale=1.0)
    >>> proj = nn.Linear(8, 8)
    >>> sel(torch.randn(1, 5, 8), proj, proj).shape
    torch.Size([3])
    """

    def __init__(
        self,
        num_keep: int,
        num_prefix: int,
        num_patches: int,
        num_heads: int,
        scale: float,
        query: str = "cls",
        q_rows: slice | None = None,
        k_rows: slice | None = None,
    ):
        super().__init__()
        if query not in ("cls", "mean"):
            raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")
        self.num_prefix = num_prefix
        self.num_patches = num_patches
        self.num_keep = num_keep
        self.num_heads = num_heads
        self.scale = scale
        self.query = query
        # output features of the projection modules that hold the query / key (a fused qkv Linear's thirds)
        self.q_rows = q_rows or slice(None)
        self.k_rows = k_rows or slice(None)
        self.record_attention = False
        self.attention_logits: Tensor | None = None
        self.kept_index: Tensor | None = None
        self.frozen = False
        self._product_cache: tuple | None = None
        self._prefix_cache: Tensor | None = None

    @property
    def num_keep(self) -> int:
        """Image tokens kept: a whole number in 1..num_patches (checked here, so eager and traced models agree)."""
        return self._num_keep

    @num_keep.setter
    def num_keep(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.num_patches:
            raise UsageError(f"num_keep must be a whole number of image tokens in 1..{self.num_patches}, got {value!r}")
        self.__dict__["_num_keep"] = value

    def extra_repr(self) -> str:
        return f"num_keep={self.num_keep}, num_prefix={self.num_prefix}, query={self.query!r}"

    def forward(self, x_norm: Tensor, q_proj: nn.Module, k_proj: nn.Module) -> Tensor:
        B, N, C = x_norm.shape
        traced = isinstance(x_norm, fx.Proxy)  # fx.symbolic_trace of a converted model: no branch on shapes
        tracing = traced or torch.jit.is_tracing()
        one = not tracing and B == 1  # the batch-1 path; a tracer must not take it (it would bake in batch 1)
        cached = self._caching(tracing)
        plain = _is_plain_linear(q_proj) and (k_proj is q_proj or _is_plain_linear(k_proj))
        if self.record_attention:
            if self.training and not torch.is_grad_enabled():
                raise RuntimeError(
                    "TokenSelector.record_attention in training mode needs gradients, and this forward runs without "
                    "them (reentrant checkpointing, e.g. timm.layers.set_reentrant_ckpt(True), or torch.no_grad): "
                    "the token cut loss would get no gradient. Use non-reentrant checkpointing (timm's default), "
                    "or eval mode, or set record_attention = False")
            logits = self._record(x_norm, q_proj, k_proj, plain)
            scores = logits.detach() + self._prefix_bias(x_norm, cached)
        elif torch.is_grad_enabled():
            with torch.no_grad():
                scores = self._scores(x_norm, q_proj, k_proj, plain, cached, one)
        else:  # entering no_grad costs ~1 µs, a share of a batch-1 layer's dispatch
            scores = self._scores(x_norm, q_proj, k_proj, plain, cached, one)
        num_kept = self.num_prefix + self.num_keep
        if self.training and not traced:  # token dropout (patch_drop) may leave fewer tokens than P + K
            num_kept = min(num_kept, N)
        index = scores.topk(num_kept, dim=1, sorted=False).indices  # B, P + K
        if not (traced or torch.compiler.is_exporting()):  # an exported program keeps no module state
            self.__dict__["kept_index"] = index  # what nn.Module.__setattr__ does for a plain tensor, ~1 µs faster
        # rows of the (B * N, C) token matrix: index_select / index_copy on rows are several times
        # faster on CPU than gather / scatter with an index expanded over channels. At batch 1 the
        # rows are the positions: skipping the offsets saves ~0.25 ms of 28 ms (DeiT-S, keep 0.5).
        if one:
            return index.flatten()
        return (index + torch.arange(0, B * N, N, device=index.device).unsqueeze(1)).flatten()

    def _caching(self, tracing: bool) -> bool:
        """Whether this forward may keep and reuse what does not change from image to image: in eval mode;
        training and tracers recompute it."""
        return not self.training and _untraced(tracing)

    def _scores(self, x_norm: Tensor, q_proj: nn.Module, k_proj: nn.Module, plain: bool, cached: bool,
                one: bool) -> Tensor:
        """(B, N) scores, +inf at the prefix tokens.

        Each op here costs microseconds of dispatch, which at batch 1 is a share of the layer's own time:
        hence few ops, and a batch-1 path. (scale / H) and q · b_k are the same for every key of an image,
        so they do not change the ranking.
        """
        prefix = self._prefix_bias(x_norm, cached)  # N: +inf at prefix tokens, which are always kept
        if not plain:  # a wrapped projection: score with what it computes, from every token's key
            q, k = self._project(x_norm, q_proj, k_proj)
            query = q[:, 0] if self.query == "cls" else q.mean(1)  # B, A
            return torch.baddbmm(prefix, query.unsqueeze(1), k.transpose(1, 2)).squeeze(1)  # B, N
        query = x_norm[:, 0] if self.query == "cls" else x_norm.mean(1)  # B, C
        u = self._query_to_key(query, q_proj, k_proj, cached and self.frozen)  # B, C: W_kᵀ (W_q x + b_q)
        if one:
            return torch.addmm(prefix, u, x_norm[0].t())  # 1, N
        # (1, C) @ (C, N) per image: on CPU ~10x faster than (N, C) @ (C, 1) at batch 16
        return torch.baddbmm(prefix, u.unsqueeze(1), x_norm.transpose(1, 2)).squeeze(1)  # B, N

    def _prefix_bias(self, x_norm: Tensor, cached: bool) -> Tensor:
        """(N,) scores to add: +inf at the prefix tokens, 0 at image tokens."""
        N, bias = x_norm.shape[1], self._prefix_cache
        if not cached or bias is None or (bias.shape[0], bias.dtype, bias.device) != (N, x_norm.dtype, x_norm.device):
            # a pad, not `bias[:P] = inf`: that exports as a dozen ONNX nodes (and onnxruntime folds this one)
            bias = F.pad(x_norm.new_zeros(N - self.num_prefix), (self.num_prefix, 0), value=float("inf"))
            self._prefix_cache = bias if cached else None
        return bias

    def _query_to_key(self, query: Tensor, q_proj: nn.Module, k_proj: nn.Module, cached: bool) -> Tensor:
        """W_kᵀ (W_q x + b_q) for each query x (B, C), from the weights of the plain Linear projections.

        Frozen, in eval mode, it reads one cached C×C product W_qᵀ W_k instead of W_q and W_k, which
        halves the scorer's weight traffic. An ONNX export computes the product in the graph, from
        the weights, and onnxruntime folds it into a constant when it loads the model.
        """
        q_weight, q_bias, k_weight = q_proj.weight, q_proj.bias, k_proj.weight
        product = self._cached_product(q_weight, q_bias, k_weight) if cached else None
        if product is not None:
            return _times(query, *product)
        q_weight, q_bias, k_weight = q_weight[self.q_rows], _rows(q_bias, self.q_rows), k_weight[self.k_rows]
        if torch.onnx.is_in_onnx_export():
            return _times(query, *_product(q_weight, q_bias, k_weight))
        return F.linear(query, q_weight, q_bias) @ k_weight  # training: the weights change at every step

    def _cached_product(self, q_weight: Tensor, q_bias: Tensor | None,
                        k_weight: Tensor) -> tuple[Tensor, Tensor | None] | None:
        return self._cached(
            "product", (q_weight, k_weight, q_bias),
            lambda: _product(q_weight[self.q_rows], _rows(q_bias, self.q_rows), k_weight[self.k_rows]))

    def _cached(self, what: object, weights: tuple[Tensor | None, ...], make: Callable[[], T]) -> T | None:
        """`make()`, kept while the weights it reads keep their storage and version (None where they keep no version).

        In-place updates (optimizer steps, load_state_dict) bump the version; .to() and `param.data = ...` change
        the storage. The cache holds the weights it was made from, so their storage cannot be freed and reused.
        """
        key = [what]
        try:
            for w in weights:  # (a loop: ~1 µs less than a comprehension over the filtered weights)
                if w is not None:
                    key.append((w.data_ptr(), w._version))
        except RuntimeError:  # inference tensors keep no version
            return None
        cache = self._product_cache
        if cache is None or cache[0] != key:
            weights = [w for w in weights if w is not None]
            device = weights[0].device.type
            # in the weights' own dtype, also under autocast: a later forward may run without it
            with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
                made = make()
            cache = self._product_cache = (key, [w.detach() for w in weights], made)
        return cache[2]

    def train(self, mode: bool = True) -> "TokenSelector":
        self._product_cache = None  # fused optimizer steps change weights without bumping their versions
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._product_cache = self._prefix_cache = None  # .to() / .half(): keep no old weights alive
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # caches are rebuilt when needed; the recorded logits hold a graph (deepcopy refuses non-leaf tensors)
        return {**super().__getstate__(), "_product_cache": None, "_prefix_cache": None, "attention_logits": None}

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: fail with the way out, not a parse error
        raise RuntimeError("a vitidle-converted model cannot be compiled with torch.jit.script (TorchScript cannot "
                           "compile fx-rewritten blocks, and is deprecated): use torch.export.export, torch.compile, "
                           "torch.jit.trace, or `vitidle export --onnx`")

    def _project(self, x_norm: Tensor, q_proj: nn.Module, k_proj: nn.Module) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, N, A) of every token, by calling the projection modules."""
        q = q_proj(x_norm)
        k = q if k_proj is q_proj else k_proj(x_norm)
        return q[..., self.q_rows], k[..., self.k_rows]

    def _record(self, x_norm: Tensor, q_proj: nn.Module, k_proj: nn.Module, plain: bool) -> Tensor:
        if plain:
            q = F.linear(x_norm, q_proj.weight[self.q_rows], _rows(q_proj.bias, self.q_rows))  # B, N, A
            k = F.linear(x_norm, k_proj.weight[self.k_rows], _rows(k_proj.bias, self.k_rows))  # B, N, A
        else:
            q, k = self._project(x_norm, q_proj, k_proj)
        # mean over heads of scale * q_h · k_h == (scale / H) * q · k over all heads' dims
        self.attention_logits = (q @ k.transpose(1, 2)) * (self.scale / self.num_heads)  # B, N, N
        return self.attention_logits[:, 0] if self.query == "cls" else self.attention_logits.mean(1)


def _untraced(tracing: bool) -> bool:
    """A plain eager forward: no tracer (`tracing`: fx or torch.jit), no torch.compile or export, no torch.func
    transform (whose tensors must not be kept, nor their values read)."""
    return not (tracing or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def submodule(module: nn.Module, path: str) -> nn.Module:
    """module.get_submodule(path) for a path that exists, without its checks: ~1.5 µs less a call, on paths
    that every idle block takes."""
    for name in path.split("."):
        module = module._modules[name]
    return module


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes x Wᵀ + b from its `weight` and `bias`: an nn.Linear (or a parametrized one)
    that no adapter, quantization wrapper or hook changes, with a plain weight tensor (torchao's `quantize_`
    keeps the nn.Linear and swaps its weight for a quantized tensor subclass, which only F.linear supports)."""
    if type(module).forward not in (nn.Linear.forward, KeyedLinear.forward) or module._forward_hooks \
            or module._forward_pre_hooks:
        return False
    weight = module._parameters.get("weight")
    if weight is None:  # a parametrized weight, or one set as a plain attribute
        weight = module.weight
    # torch.export (non-strict) runs the forward on fake tensors, which are no wrapper subclass
    return type(weight) is nn.Parameter or not is_traceable_wrapper_subclass(weight)


class KeyedLinear(nn.Linear):
    """The nn.Linear that projects an idle block's keys, where its `PositionalSelector` projects them to score
    (a rotary table per head): called on the kept tokens its selector handed over (`vitidle_given`: the same
    tensor at the same version, taken once), it gathers their keys from the selector's and projects only its
    other rows; on anything else it is the nn.Linear. Same parameters and state-dict keys."""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "vitidle_given": None}

    def forward(self, x: Tensor) -> Tensor:
        given = self.__dict__.pop("vitidle_given", None)
        if given is None or given[0] is not x or given[1] != _version(x):  # another tensor, or changed since
            return F.linear(x, self.weight, self.bias)
        _, _, rows, keys, key_rows = given  # every token's keys (B, N, A), the kept tokens' rows, the keys' features
        kept = gather_tokens(keys, rows)  # B, P + K, A
        if key_rows is None:  # a key projection of its own
            return kept
        before, after = slice(0, key_rows.start), slice(key_rows.stop, None)  # a fused one: q | k | v
        return torch.cat([F.linear(x, self.weight[before], _rows(self.bias, before)), kept,
                          F.linear(x, self.weight[after], _rows(self.bias, after))], -1)


def _rows(bias: Tensor | None, rows: slice) -> Tensor | None:
    return None if bias is None else bias[rows]


def _product(q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """(W_qᵀ W_k, b_qᵀ W_k), for `_times`."""
    # (W_kᵀ W_q)ᵀ: at batch 1 on CPU, x @ M streams a cold M ~1.4x faster than F.linear(x, Mᵀ) does
    return q_weight.t() @ k_weight, None if q_bias is None else q_bias @ k_weight


def _times(query: Tensor, product: Tensor, bias: Tensor | None) -> Tensor:
    """query (B, C) @ product + bias."""
    return query @ product if bias is None else torch.addmm(bias, query, product)


def gather_tokens(x: Tensor, rows: Tensor) -> Tensor:
    """(B, N, C) tokens -> (B, P + K, C) kept tokens, for the rows `TokenSelector` returns."""
    if _one_image(x):  # rows are positions: one op instead of three
        return x.index_select(1, rows)
    B, N, C = x.shape
    empty = isinstance(B, int) and B == 0  # view(0, -1, C) is ambiguous (B is a Proxy when fx re-traces)
    return x.reshape(B * N, C).index_select(0, rows).view(B, 0 if empty else -1, C)


def merge_tokens(x: Tensor, rows: Tensor, y: Tensor, into_x: bool = False) -> Tensor:
    """x (B, N, C) with the kept rows replaced by the block's output y (B, P + K, C).

    Idle tokens come out bit-identical. The result is a copy: x is not modified (it may be held
    elsewhere, e.g. by forward_intermediates), unless `into_x`, which `IdleSequential` passes only
    where nothing else can hold x.
    """
    if not isinstance(into_x, (bool, fx.Proxy)):  # (a Proxy when fx re-traces a block it unpickles)
        raise TypeError(f"an idle block takes one tensor, not a second positional {type(into_x).__name__}: "
                        "it supports no attention mask")
    in_place = into_x is True
    if _one_image(x):
        return x.index_copy_(1, rows, y) if in_place else x.index_copy(1, rows, y)
    B, N, C = x.shape
    if in_place and x.is_contiguous():
        x.view(B * N, C).index_copy_(0, rows, y.reshape(-1, C))
        return x
    return x.reshape(B * N, C).index_copy(0, rows, y.reshape(-1, C)).view(B, N, C)


def _one_image(x: Tensor) -> bool:
    # no branch on a traced shape: fx re-traces a rewritten block when it is unpickled, and a
    # torch.jit.trace at batch 1 (the legacy ONNX exporter) would bake in batch 1
    return not (isinstance(x, fx.Proxy) or torch.jit.is_tracing()) and x.shape[0] == 1


class IdleSequential(nn.Sequential):
    """A model's chain of blocks, in which an idle block may write its output into its input.

    That saves the merge's copy of all N tokens, about 0.5% of DeiT-S at batch 1 on CPU. It
    happens only where nothing else can hold the input: the idle block before made it, in this
    loop; no gradient is recorded and no tracer or compiler runs; no hook, patched forward or
    unknown module would see it (`_observed`). A caller's tensor is never written, and blocks
    called one by one (forward_intermediates, checkpoint_seq) copy as before.
    """

    def forward(self, x: Tensor) -> Tensor:
        # torch.compile plans its own buffers, and cannot trace `_observed`
        reuse = unobserved_eager(x)
        made_by = None  # the idle block that made x in this loop
        for block in self:
            idle = isinstance(block._modules.get(SELECTOR), TokenSelector)
            x = block(x, True) if reuse and idle and made_by is not None and not _observed(made_by, block) else block(x)
            made_by = block if idle else None
        return x


def _observed(made_by: nn.Module, block: nn.Module) -> bool:
    """Whether anything besides the two blocks' graphs may see the tensor one makes and the other reads."""
    x = next(iter(block.graph.nodes))  # the input's placeholder in the rewritten block
    readers = [submodule(block, n.target) for n in x.users if n.op == "call_module"]
    if not all(isinstance(m, (*PER_TOKEN_NORMS, TokenSelector)) for m in readers):  # another module may keep it
        return True
    if any(map(_patched, [made_by, block, *readers])):  # a patched forward may keep it
        return True
    return bool(made_by._forward_hooks) or any(m._forward_pre_hooks or m._forward_hooks for m in [block, *readers])


def unobserved_eager(x: Tensor) -> bool:
    """Whether a block may write into `x` as far as the run goes: a plain tensor in an eager forward with no
    gradient, tracer, compiler, torch.func transform, global hook, mode or Python tracer (`_observers`). The
    caller still proves that nothing else holds x (`IdleSequential`, `hf._owns_input`)."""
    return (type(x) is Tensor and not torch.is_grad_enabled() and _untraced(torch.jit.is_tracing())
            and not (_global_hooks() or _observers()))


def _patched(module: nn.Module) -> bool:
    """Whether the module's forward is replaced on the instance (accelerate's hooks, a probe); a bound forward
    of its own class, as accelerate leaves after removing its hooks, is not."""
    forward = module.__dict__.get("forward")
    return forward is not None and not (getattr(forward, "__self__", None) is module
                                        and getattr(forward, "__func__", None) is type(module).forward)


def _observers() -> bool:
    """Whether anything may see and keep every op's output, so that no block may write into one: a torch
    function or dispatch mode (an activation recorder; `torch.device(...)`'s mode keeps nothing) or a Python
    trace or profile function (it sees each function's return value)."""
    if torch._C._len_torch_dispatch_stack() or sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # (Python 3.12: coverage's and debuggers' events)
    if monitoring is not None and any(monitoring.get_tool(i) is not None for i in range(6)):
        return True
    return not all(isinstance(torch._C._get_function_stack_at(i), DeviceContext)
                   for i in range(torch._C._len_torch_function_stack()))


def _global_hooks() -> bool:
    # torch keeps global module hooks in private dicts: if they move, assume hooks are set
    return bool(getattr(torch_module, "_global_forward_hooks", True)
                or getattr(torch_module, "_global_forward_pre_hooks", True))


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Let the model's selectors reuse a product of the weights in eval mode; returns `model`.

    For inference with fixed weights, as `torch.jit.freeze` treats them: on CPU at batch 1 it saves
    about 1 point of the 95-96% of the limit's speedup. Changes through `load_state_dict`, `.to()`,
    in-place ops, `param.data = ...` and mode switches are seen; writes that bump no version
    counter (`.data` edits, fused optimizer steps, other processes) are not: `freeze(model, False)`
    before making them.

    >>> import timm, vitidle
    >>> model = vitidle.freeze(vitidle.convert(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=32), 0.5))
    >>> [s.frozen for s in idle_selectors(model)]
    [True, True]
    """
    for selector in idle_selectors(model):
        selector.frozen, selector._product_cache = frozen, None
    return model


def idle_selectors(model: nn.Module) -> list[TokenSelector]:
    """The token selectors of a converted model, in block order."""
    return [m for m in model.modules() if isinstance(m, TokenSelector)]


def keep_mask(selector: TokenSelector, num_tokens: int) -> Tensor:
    """(B, N) float mask of the tokens the selector kept in its last forward (1 = kept)."""
    if selector.kept_index is None:
        raise RuntimeError("the selector has not run yet: run a forward first")
    index = selector.kept_index
    mask = index.new_zeros(index.shape[0], num_tokens, dtype=torch.float32)
    return mask.scatter_(1, index, 1.0)


# ---- blocks whose attention carries token positions (rotary embeddings, relative-position bias) ----

class PositionalSelector(TokenSelector):
    """`TokenSelector` for attention that reads token positions, or whose projections `TokenSelector`'s
    fast path does not describe (a separate query bias, grouped key heads).

    `forward(x_norm, attn, rope, bias)` takes the normed tokens, the attention module, and the position
    inputs the block receives (`rope`: a rotary table of the image tokens, `bias`: a (…, H, N, N) logit
    bias; either may be None). It returns the kept positions (B, P + K), the prefix tokens first (rotary
    attention leaves the first P tokens unrotated), then the top-K image tokens. The score
    is the head-mean pre-softmax logit as the layer computes it: rope applied to queries and keys, the
    bias added (docs/method.md).

    Keys are never projected where the table is shared by all heads (timm's Eva): with rotations R_j,
    q · R_j k_j = Σ_c cos_jc (Σ_h q_hc k_jhc) + Σ_c s̃_jc (Σ_h q̃_hc k_jhc), two sums over heads that are
    linear in the normed token, so all scores cost 2·N·C·d instead of N·C² (d = head dim), and N·C·d where the
    table turns partner columns by one angle (`rotary_pairs`).
    """

    def __init__(self, num_keep: int, num_prefix: int, num_patches: int, qk, query: str = "cls", rope_dims: int = 2,
                 paired: bool = False):
        super().__init__(num_keep, num_prefix, num_patches, qk.num_heads, qk.scale, query, qk.q_rows, qk.k_rows)
        self.qk = qk  # scoring.QueryKey: where the attention keeps its projections
        # what the conversion saw of the rotary table, for tracers (no branch on a Proxy or on a traced table's
        # values): its rank, and whether it turns partner columns by one angle (`rotary_pairs`)
        self.rope_dims = rope_dims
        self.paired = paired
        self._rotary_cache: tuple | None = None
        self._bounds_cache: tuple[Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", positions=True"

    def _apply(self, fn, recurse: bool = True):
        self._rotary_cache = self._bounds_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_rotary_cache": None, "_bounds_cache": None, "_keys": None}

    def _prefix_bounds(self, x_norm: Tensor, cached: bool) -> tuple[Tensor, Tensor]:
        """(N,) each: the bound a score must stay under to count (−inf at the prefix, +inf elsewhere), and what
        takes its place (+inf at the prefix, −inf elsewhere)."""
        N, bounds = x_norm.shape[1], self._bounds_cache
        if not cached or bounds is None or (bounds[0].shape[0], bounds[0].dtype, bounds[0].device) != (
                N, x_norm.dtype, x_norm.device):
            P, inf = self.num_prefix, float("inf")
            image = x_norm.new_full((N - P,), inf)
            bounds = F.pad(image, (P, 0), value=-inf), F.pad(-image, (P, 0), value=inf)
            self._bounds_cache = bounds if cached else None
        return bounds

    def forward(self, x_norm: Tensor, attn: nn.Module, rope: Tensor | None = None,  # type: ignore[override]
                bias: Tensor | None = None) -> Tensor:
        N = x_norm.shape[1]
        traced = isinstance(x_norm, fx.Proxy)
        cached = self._caching(traced or torch.jit.is_tracing())
        P = self.num_prefix
        if self.record_attention:
            logits = self._logits(x_norm, attn, rope, bias)  # B, N, N
            self.attention_logits = logits
            scores = (logits[:, 0] if self.query == "cls" else logits.mean(1)).detach()
        elif torch.is_grad_enabled():
            with torch.no_grad():
                scores = self._token_scores(x_norm, attn, rope, bias, cached)  # B, N
        else:  # entering no_grad costs ~1 µs
            scores = self._token_scores(x_norm, attn, rope, bias, cached)
        # +inf at the prefix, below +inf elsewhere: top-k ranks NaN above +inf, so an image token's NaN or +inf
        # is made -inf (its image's prefix keeps its place). Sorted, the prefix comes first, where rotary
        # attention leaves it unrotated (its own order is free: attention and the gathered positions do not
        # depend on the kept tokens' order). Two ops, and two ONNX nodes (nan_to_num exports as nine).
        below, fill = self._prefix_bounds(x_norm, cached)
        scores = torch.where(scores < below, scores, fill)
        num_kept = P + self.num_keep
        if self.training and not traced:  # token dropout (patch_drop) may leave fewer than K image tokens
            num_kept = min(num_kept, N)
        index = scores.topk(num_kept, dim=1, sorted=P > 0).indices  # B, P + K
        if not (traced or torch.compiler.is_exporting()):
            self.__dict__["kept_index"] = index
        return index

    def hand_keys(self, x_norm: Tensor, kept_norm: Tensor, rows: Tensor, attn: nn.Module) -> None:
        """Hand the attention's `KeyedLinear` the keys this selector projected to score the normed tokens x_norm,
        for their kept rows `kept_norm` (at `rows`): (P + K)·C² MACs a block less. Only keys made from this very
        x_norm, unchanged since (so not another thread's, nor those of a direct call), in eval mode with no
        gradient recorded (the scores' keys carry none); `KeyedLinear` takes them for `kept_norm` unchanged."""
        made = self.__dict__.pop("_keys", None)
        if made is None or made[0] is not x_norm or made[1] != _version(x_norm) or torch.is_grad_enabled():
            return
        proj, version = made[2], _version(kept_norm)
        if version is None and (_global_hooks() or any(m._forward_pre_hooks or m._forward_hooks
                                                        for m in (self, attn, proj))):
            return  # inference tensors keep no version: a hook could change them unseen
        proj.__dict__["vitidle_given"] = (kept_norm, version, rows, made[3], self.qk.k_rows)

    # the projections, as the layer computes them: plain Linears read by weight, anything else called
    def _weights(self, attn: nn.Module, which: str) -> tuple[Tensor, Tensor | None] | None:
        qk = self.qk
        proj = submodule(attn, qk.q_proj if which == "q" else qk.k_proj)
        rows = (qk.q_rows if which == "q" else qk.k_rows) or slice(None)
        if not _is_plain_linear(proj):
            return None
        separate = qk.q_bias if which == "q" else qk.k_bias
        bias = getattr(attn, separate) if separate else _rows(proj.bias, rows)
        return proj.weight[rows], bias

    def _project(self, x: Tensor, attn: nn.Module, which: str) -> Tensor:  # type: ignore[override]
        """Queries or keys (…, A) of the tokens x, by the layer's own projection."""
        weights = self._weights(attn, which)
        if weights is not None:
            return F.linear(x, *weights)
        qk = self.qk
        rows = (qk.q_rows if which == "q" else qk.k_rows) or slice(None)
        out = attn.get_submodule(qk.q_proj if which == "q" else qk.k_proj)(x)[..., rows]
        separate = qk.q_bias if which == "q" else qk.k_bias
        return out if not separate or getattr(attn, separate) is None else out + getattr(attn, separate)

    def _rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        """The layer's rotation of image-token queries or keys t (B, H, n, d)."""
        from timm.layers import apply_rot_embed_cat

        return apply_rot_embed_cat(t, rope, half=self.qk.rotate_half).type_as(t)

    def _heads(self, t: Tensor, heads: int) -> Tensor:  # (B, n, A) -> (B, heads, n, d)
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def _queries(self, x_norm: Tensor, attn: nn.Module, rope: Tensor | None) -> Tensor:
        """(B, H, d): the class token's query, or the mean of all queries (rotated as the layer rotates them)."""
        P, H = self.num_prefix, self.num_heads
        if self.query == "cls":  # a prefix token: never rotated
            return self._project(x_norm[:, 0], attn, "q").view(x_norm.shape[0], H, -1)
        if rope is None:  # queries are linear in the token: the query of the mean token
            return self._project(x_norm.mean(1), attn, "q").view(x_norm.shape[0], H, -1)
        q = self._heads(self._project(x_norm, attn, "q"), H)  # B, H, N, d
        return torch.cat([q[:, :, :P], self._rotate(q[:, :, P:], rope)], 2).mean(2)

    def _token_scores(self, x_norm: Tensor, attn: nn.Module, rope: Tensor | None, bias: Tensor | None,
                      cached: bool = False) -> Tensor:
        """(B, N) head-mean logits of the query against each token's key (any value at the P prefix tokens)."""
        B, N, C = x_norm.shape
        P, Hk = self.num_prefix, self.qk.num_kv_heads
        scale = self.scale / self.num_heads
        shared = rope is None or (self.rope_dims if isinstance(rope, fx.Proxy) else rope.dim()) == 2
        u = scores = None
        if cached and self.frozen:
            if rope is None:
                u = self._frozen_query_to_key(x_norm, attn)
            elif shared:
                scores = self._frozen_rotary_scores(x_norm, attn, rope, scale)
        if u is None and scores is None:
            q = self._queries(x_norm, attn, rope)  # B, H, d
            if Hk != self.num_heads:
                q = q.view(B, Hk, -1, q.shape[-1]).sum(2)  # B, Hk, d: heads that share a key head, summed
            weights = self._weights(attn, "k")
            if weights is not None and rope is None:  # q · k = x · (W_kᵀ q) + q · b_k, the same q · b_k for all keys
                u = torch.einsum("bhc,hci->bi", q, weights[0].view(Hk, -1, C))  # B, C
            elif weights is not None and shared:  # a rotary table shared by all heads and images
                scores = self._rotary_scores(x_norm, q, *weights, rope, scale, cached)
            else:  # keys projected: a wrapped projection, or a rotary table per head or per image
                k = self._project(x_norm, attn, "k")  # B, N, A: every token's (P more rows), which the
                proj = submodule(attn, self.qk.k_proj)  # attention then reuses for the kept ones (`hand_keys`)
                reuse = cached and isinstance(proj, KeyedLinear) and _is_plain_linear(proj)
                self.__dict__["_keys"] = (x_norm, _version(x_norm), proj, k) if reuse else None
                k = self._heads(k[:, P:], Hk)  # B, Hk, N - P, d
                if rope is not None:
                    k = self._rotate(k, rope)
                scores = F.pad(torch.einsum("bhc,bhnc->bn", q, k) * scale, (P, 0))  # B, N
        if u is not None:
            scores = torch.bmm((u * scale).unsqueeze(1), x_norm.transpose(1, 2)).squeeze(1)
        if bias is not None:
            rows = bias[..., :1, :] if self.query == "cls" else bias.mean(-2, keepdim=True)
            scores = scores + rows.mean(-3).reshape(-1, N)  # head mean; broadcasts over the batch
        return scores

    def _frozen_query_to_key(self, x_norm: Tensor, attn: nn.Module) -> Tensor | None:
        """W_kᵀ (W_q x + b_q) (B, C) for the query token x, from the frozen W_qᵀ W_k product as `TokenSelector` scores
        (one C × C read instead of W_q and W_k); None for grouped key heads or a wrapped projection."""
        qk = self.qk
        q_proj, k_proj = submodule(attn, qk.q_proj), submodule(attn, qk.k_proj)
        if qk.num_kv_heads != self.num_heads or not (_is_plain_linear(q_proj) and _is_plain_linear(k_proj)):
            return None
        q_bias = getattr(attn, qk.q_bias) if qk.q_bias else q_proj.bias
        product = self._cached_product(q_proj.weight, q_bias, k_proj.weight)
        if product is None:
            return None
        return _times(x_norm[:, 0] if self.query == "cls" else x_norm.mean(1), *product)

    def _rotary_scores(self, x: Tensor, q: Tensor, k_weight: Tensor, k_bias: Tensor | None, rope: Tensor,
                       scale: float, cached: bool) -> Tensor:
        """scale · Σ_h q_h · R_j k_jh for each image token j, from a rotary table shared by all heads, no key projected.

        x holds all tokens, prefix included (onnxruntime would copy x[:, P:], ~25 µs a block at batch 1): the
        table's rows at the prefix are zeros, and so are the prefix tokens' scores (B, N).
        """
        turns, table, paired, mix = self._rotary_tables(rope, x, q.shape[-1], scale, cached)
        if paired and _exporting():
            m, bias = self._traced_pair_rows(q, k_weight, k_bias)
        else:
            m, bias = self._pair_rows(q, k_weight, k_bias, turns, paired)
        return _table_sum(x, *_mixed(m, bias, mix), table)

    def _traced_pair_rows(self, q: Tensor, k_weight: Tensor, k_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """`_pair_rows` of a paired table, for exported and traced graphs: the key rows (and bias) of each pair's
        members gathered from the weights, which onnxruntime folds into a constant, so per image it is one
        gather of q, one product over the pairs and no partner sum (~15 nodes fewer a block)."""
        B, Hk, d = q.shape
        order, twice, signs = (torch.tensor(t, device=q.device) for t in rotary_pair_layout(d, Hk, self.qk.rotate_half))
        q2 = q.reshape(B, Hk * d).index_select(1, twice) * signs.to(q.dtype)
        return _pair_sums(q2, _pair_keys(k_weight, k_bias, order, Hk), k_weight.shape[-1])

    def _pair_rows(self, q: Tensor, k_weight: Tensor, k_bias: Tensor | None, turns: Tensor,
                   paired: bool) -> tuple[Tensor, Tensor | None]:
        """For queries q (B, Hk, d): the rows m (B, 2d, C) and biases (B, 2d) with x_j · m_ct + bias_ct the terms of
        q · R_j k_j, in the order of `_rotary_tables`' columns (d / 2 rows of each where `paired`).

        R_j k = k ⊙ cos_j + P(k) ⊙ sin_j, P a fixed signed permutation with Pᵀ = −P, so
        q · R_j k = (q ⊙ cos_j) · k − (P(q) ⊙ |P|(sin_j)) · k, and each sum over heads is linear in x_j:
        x_j · m_ct for the 2d rows m_ct = Σ_h q2_hct W_hc (q2 = [q, −P(q)], W_hc the C-vector of key row c).
        A rotation turns each pair of partners (c, |P|(c)) by one angle: where the table says so (`paired`),
        the terms of partners share their factors, their rows are summed and the product x_j · m costs half.
        """
        B, Hk, d = q.shape
        C = k_weight.shape[-1]
        q2 = (turns @ q.transpose(1, 2)).view(B, d, 2, Hk)  # B, (c, t), Hk
        # the rows m_ct as d products (2B, Hk) @ (Hk, C), one per c: a few µs, where torch lowers the
        # einsum "bhct,hci->bcti" to a loop of selects and copies (~180 µs at batch 1, ~550 µs at 16)
        m = torch.bmm(q2.transpose(0, 1).reshape(d, 2 * B, Hk), k_weight.view(Hk, d, C).transpose(0, 1))
        bias = None
        if k_bias is not None:  # q2 · b_k for each (c, t), the same for every token
            bias = (q2 * k_bias.view(Hk, d).t().unsqueeze(1)).sum(-1)  # B, d, 2
        if paired:
            m = self._partners_summed(m, 0)
            bias = None if bias is None else self._partners_summed(bias, 1)
            d //= 2
        m = m.view(d, B, 2, C).transpose(0, 1).reshape(B, 2 * d, C)  # a view at batch 1
        return m, None if bias is None else bias.reshape(B, 2 * d)

    def _frozen_rotary_scores(self, x_norm: Tensor, attn: nn.Module, rope: Tensor, scale: float) -> Tensor | None:
        """`_rotary_scores`, frozen: what does not depend on the image made once (`_pair_weights`), so the class
        query comes out in pair order from W_q's rows in that order and the rows m are one bmm over the pairs:
        ~20 ops fewer a block, a third of the selector's time at batch 1. None where it does not apply: a wrapped
        projection, grouped key heads, or a table that does not pair its columns."""
        qk = self.qk
        q_proj, k_proj = submodule(attn, qk.q_proj), submodule(attn, qk.k_proj)
        if qk.num_kv_heads != self.num_heads or not (_is_plain_linear(q_proj) and _is_plain_linear(k_proj)):
            return None
        tables = self._rotary_tables(rope, x_norm, rope.shape[-1] // 2, scale, True)  # the table holds [sin, cos]
        if not tables.paired:
            return None
        # keyed on the tensors the layer reads (slicing the rows out of a fused qkv costs ~10 µs a block)
        sources = (k_proj.weight, k_proj.bias, *((q_proj.weight, q_proj.bias) if q_proj is not k_proj else ()),
                   *[getattr(attn, name) for name in (qk.q_bias, qk.k_bias) if name])
        made = self._cached(("rotary", self.query), sources, lambda: self._pair_weights(attn))
        if made is None:
            return None
        if made.q_weight is None:  # the mean of the rotated queries
            query = self._queries(x_norm, attn, rope).flatten(1).index_select(1, made.order)
        else:
            query = torch.addmm(made.q_bias, x_norm[:, 0], made.q_weight)  # B, A: (pair, member, head)
        m, bias = _pair_sums(query.index_select(1, made.twice) * made.signs, made.keys, x_norm.shape[-1])
        return _table_sum(x_norm, *_mixed(m, bias, tables.mix), tables.table)

    def _pair_weights(self, attn: nn.Module) -> "PairWeights":
        """What `_frozen_rotary_scores` reads of the weights (`PairWeights`)."""
        k_weight, k_bias = self._weights(attn, "k")
        A, H = k_weight.shape[0], self.num_heads
        d = A // H
        order, twice, signs = rotary_pair_layout(d, H, self.qk.rotate_half)
        position = {feature: i for i, feature in enumerate(order)}  # the query comes out in pair order
        device = k_weight.device
        order, twice = torch.tensor(order, device=device), torch.tensor([position[f] for f in twice], device=device)
        q_weight = q_bias = None
        if self.query == "cls":
            q_weight, q_bias = self._weights(attn, "q")
            q_bias = q_weight.new_zeros(A) if q_bias is None else q_bias
            q_weight, q_bias = q_weight[order].t().contiguous(), q_bias[order]
        k_bias = None if k_bias is None or not k_bias.any() else k_bias  # timm's Eva keeps a zero key bias
        return PairWeights(order, twice, torch.tensor(signs).to(k_weight), q_weight, q_bias,
                           _pair_keys(k_weight, k_bias, order, H))

    def _partners_summed(self, t: Tensor, dim: int) -> Tensor:
        """t with each pair of partners c, |P|(c) along `dim` (of size d) summed: size d / 2, in the order of `_rotary_tables`."""
        d = t.shape[dim]
        if self.qk.rotate_half:  # partners c and c + d/2
            return t.narrow(dim, 0, d // 2) + t.narrow(dim, d // 2, d // 2)
        pairs = t.unflatten(dim, (d // 2, 2))  # partners 2i and 2i + 1
        return pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)

    def _rotary_tables(self, rope: Tensor, x: Tensor, d: int, scale: float, cached: bool) -> "RotaryTables":
        """(2d, d) `turns` with turns @ q = [q, −P(q)] per row c, the (N, 2d) table scale · [cos, |P|(sin)] in the
        same order (zeros at the P prefix tokens), and whether cos and |P|(sin) are equal at partners c, |P|(c)
        (then the table has one column of each pair, (N, d)). Eager forwards check the table; tracers, which must
        not branch on its values, take what the conversion saw (`self.paired`).

        They depend on `rope` alone: rebuilding them costs ~15 µs a block at batch 1, and factoring the table where
        tokens share angles (`shared_angles`, `mix`) far more, so eval forwards keep them while `rope` is the same
        tensor at the same version or holds the same values (DINOv3 makes its table anew at every forward: one
        comparison, ~20 µs for a 256 × 128 table). The cache holds `rope`, so its storage cannot be freed and
        reused by another table.
        """
        if cached:
            key, cache = (rope.shape, rope.dtype, rope.device, x.dtype, scale), self._rotary_cache
            # (key, rope, its version, a copy of its values, the tables)
            if cache is not None and cache[0] == key and (cache[1] is rope and cache[2] is not None
                                                          and cache[2] == _version(rope) or torch.equal(cache[3], rope)):
                return cache[4]
        from timm.layers.pos_embed_sincos import rope_rotate_half, rot

        turn = rope_rotate_half if self.qk.rotate_half else rot
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        turns = torch.stack([eye, -turn(eye).t()], 1).view(2 * d, d)  # row i of turn(eye) is P(e_i): P is turn(eye)ᵀ
        sin, cos = rope.to(x.dtype).chunk(2, -1)  # N - P, d
        sin = turn(sin) * turn(torch.ones_like(sin))  # |P|(sin): sin with P's permutation, without its signs
        table = torch.stack([cos, sin], -1)  # N - P, d, 2
        eager = _untraced(isinstance(rope, fx.Proxy) or torch.jit.is_tracing())
        paired = rotary_pairs(rope, self.qk.rotate_half) if eager else self.paired
        if paired:  # one column of each pair: the sum of both, halved (exact)
            table = self._partners_summed(table, 1) * 0.5
        table = F.pad(table.flatten(1) * scale, (0, 0, self.num_prefix, 0))
        mix, table = shared_angles(table, self.num_prefix) if cached else (None, table)
        tables = RotaryTables(turns, table, paired, None if mix is None else mix.unsqueeze(0))
        self._rotary_cache = (key, rope, _version(rope), rope.detach().clone(), tables) if cached else None
        return tables

    def _logits(self, x_norm: Tensor, attn: nn.Module, rope: Tensor | None, bias: Tensor | None) -> Tensor:
        """(B, N, N) head-mean pre-softmax logits of all tokens, as the layer computes them (differentiable)."""
        P, H, Hk = self.num_prefix, self.num_heads, self.qk.num_kv_heads
        q = self._heads(self._project(x_norm, attn, "q"), H)  # B, H, N, d
        k = self._heads(self._project(x_norm, attn, "k"), Hk)
        if rope is not None:
            q = torch.cat([q[:, :, :P], self._rotate(q[:, :, P:], rope)], 2)
            k = torch.cat([k[:, :, :P], self._rotate(k[:, :, P:], rope)], 2)
        k = k.repeat_interleave(H // Hk, dim=1)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # B, H, N, N
        if bias is not None:
            logits = logits + bias
        return logits.mean(1)


class RotaryTables(NamedTuple):
    """`PositionalSelector._rotary_tables`."""

    turns: Tensor  # (2d, d): turns @ q = [q, −P(q)]
    table: Tensor  # (N, 2d), or (N, d) where `paired`; E (N, R) where `mix` is set: the table is E @ mix
    paired: bool
    mix: Tensor | None  # (1, R, d), `shared_angles`: eval forwards only


class PairWeights(NamedTuple):
    """What a frozen `PositionalSelector` keeps of the weights for a paired rotary table, for the d / 2 pairs of
    partner columns c, |P|(c) (`_frozen_rotary_scores`)."""

    order: Tensor  # (A,) the query features in pair order (pair, member, head)
    twice: Tensor  # (2A,) with `signs`: [q, −P(q)] of each pair = q[twice] * signs, in the order (pair, t, member, head)
    signs: Tensor
    q_weight: Tensor | None  # (C, A) W_q's rows in pair order, transposed, and b_q's (A,); None for the mean query
    q_bias: Tensor | None
    keys: Tensor  # (d / 2, 2H, C [+ 1]) the key rows W_hc of each pair's members, the key bias b_hc as a last
    # column, left out where it is zero (timm's Eva keeps a zero key bias)


def shared_angles(table: Tensor, num_prefix: int) -> tuple[Tensor | None, Tensor]:
    """A rotary table T (N, D), its columns in twos (the cosine and sine of one angle, `_rotary_tables`' order), as
    E @ F with E (N, R) of zeros and ones and F (R, D), where tokens share angles: an axial table turns a pair by
    the token's column or its row alone, so on a 14 × 14 grid each pair has 14 angles and R = 28 for D = 64
    (timm's Eva, DINOv3). Scores Σ_k T_jk (x_j · m_k) then take the product x · (F m)ᵀ (N, R) instead of
    x · mᵀ (N, D). Exact: each entry of E @ F is one product by 1. Returns (F, E), or (None, T) where R > D / 2.

    >>> angles = torch.arange(3.0).repeat(2)  # six tokens, two of each angle
    >>> table = torch.stack([angles.cos(), angles.sin()] * 4, 1)  # four pairs that split the tokens alike
    >>> mix, E = shared_angles(table, num_prefix=0)
    >>> mix.shape, E.shape, torch.equal(E @ mix, table)  # three angles for all four pairs
    (torch.Size([3, 8]), torch.Size([6, 3]), True)
    """
    image = table[num_prefix:]  # the prefix rows are zeros
    groups: dict[tuple[int, ...], list[int]] = {}  # the tokens' angle classes -> the pairs that split them so
    for pair in range(image.shape[1] // 2):
        _, inverse = image[:, 2 * pair: 2 * pair + 2].unique(dim=0, return_inverse=True)
        first: dict[int, int] = {}  # classes numbered by first appearance: pairs that split the tokens alike agree
        groups.setdefault(tuple(first.setdefault(c, len(first)) for c in inverse.tolist()), []).append(pair)
    R = sum(max(classes) + 1 for classes in groups)
    if 2 * R > image.shape[1]:  # the product F m costs an op: worth it where the large one halves
        return None, table
    E, mix = table.new_zeros(table.shape[0], R), table.new_zeros(R, table.shape[1])
    tokens, start = torch.arange(image.shape[0]), 0
    for classes, pairs in groups.items():
        classes = torch.tensor(classes)
        n = int(classes.max()) + 1
        E[num_prefix + tokens, start + classes] = 1
        columns = torch.tensor([2 * pair + t for pair in pairs for t in (0, 1)])
        first_token = torch.full((n,), len(tokens)).scatter_reduce(0, classes, tokens, "amin")
        mix[start: start + n, columns] = image[first_token][:, columns]
        start += n
    return (mix, E) if torch.equal(E @ mix, table) else (None, table)


def _pair_sums(q2: Tensor, keys: Tensor, C: int) -> tuple[Tensor, Tensor | None]:
    """`_pair_rows`' rows m (B, d, C) and biases (B, d) from its q2 = [q, −P(q)] (B, 2A) in the order (pair, t,
    member, head) and each pair's key rows `keys` (d / 2, 2Hk, C, or C + 1 with the key bias last): one product
    over the pairs sums both members and all heads, so no partner sum follows."""
    pairs, B = keys.shape[0], q2.shape[0]
    if _one_image(q2):  # views
        m = torch.bmm(q2.view(pairs, 2, -1), keys).view(1, 2 * pairs, -1)
    else:
        m = torch.bmm(q2.view(B, pairs, 2, -1).transpose(0, 1).reshape(pairs, 2 * B, -1), keys)
        m = m.view(pairs, B, 2, -1).transpose(0, 1).reshape(B, 2 * pairs, -1)
    return (m, None) if m.shape[-1] == C else (m[..., :C], m[..., C])


def _pair_keys(k_weight: Tensor, k_bias: Tensor | None, order: Tensor, heads: int) -> Tensor:
    """The key rows of each pair's members (d / 2, 2·heads, C), in `rotary_pair_layout`'s `order`, with the key
    bias as a last column where one is given: `_pair_sums`' `keys`."""
    keys = k_weight if k_bias is None else torch.cat([k_weight, k_bias.unsqueeze(1)], 1)
    return keys.index_select(0, order).view(-1, 2 * heads, keys.shape[-1])


def _mixed(m: Tensor, bias: Tensor | None, mix: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`_table_sum`'s rows m (B, d, C) and biases (B, d) for a table factored as E @ mix (`shared_angles`, mix (1, R, d)):
    mix @ m."""
    if mix is None:
        return m, bias
    return torch.bmm(mix if _one_image(m) else mix.expand(m.shape[0], -1, -1), m), None if bias is None else \
        bias @ mix[0].t()


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version
        return None


def _table_sum(x: Tensor, m: Tensor, bias: Tensor | None, table: Tensor) -> Tensor:
    """Σ_k table_jk (x_j · m_k + bias_k) for each token j (B, N): the rotary score from `_pair_rows`' terms."""
    y = torch.bmm(x, m.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, m.transpose(1, 2))
    return (y * table).sum(-1)


@functools.lru_cache(maxsize=None)
def rotary_pair_layout(d: int, heads: int,
                       rotate_half: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    """The query features of timm's rotation of d columns by pairs of partners (`rotate_half`: c, c + d/2;
    else 2c, 2c + 1), for `heads` heads of features h·d + c. Plain Python, so tracers take it as constants:
    - `order` (A): the features in the order (pair, member, head);
    - `twice`, `signs` (2A): [q, −P(q)] of each pair is q[twice] * signs, in the order (pair, t, member, head):
      −P(q) takes each member's partner, + for the first member and − for the second (timm's P turns
      (a, b) to (−b, a)).
    """
    members = [(c, c + d // 2) if rotate_half else (2 * c, 2 * c + 1) for c in range(d // 2)]
    order, twice, signs = [], [], []
    for pair in members:
        order += [c + d * h for c in pair for h in range(heads)]
        for t in (0, 1):
            for member in (0, 1):
                c = pair[member if t == 0 else 1 - member]
                twice += [c + d * h for h in range(heads)]
                signs += [1.0 if t == 0 or member == 0 else -1.0] * heads
    return tuple(order), tuple(twice), tuple(signs)


def _exporting() -> bool:
    """A torch.jit trace or torch.export (both ONNX exporters): a graph whose weight-only nodes onnxruntime folds.
    (Not an fx trace: its shapes are Proxies, and a re-traced model runs eagerly.)"""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def rotary_pairs(rope: Tensor, rotate_half: bool) -> bool:
    """Whether a rotary table [sin, cos] (…, 2d) turns each pair of partner columns by one angle, as a rotation
    does (timm's `rot` layout: columns 2i and 2i + 1; `rotate_half`: i and i + d/2)."""
    from timm.layers.pos_embed_sincos import rope_rotate_half, rot

    turn = rope_rotate_half if rotate_half else rot
    sin, cos = rope.chunk(2, -1)
    signs = turn(torch.ones_like(sin))  # turn is a signed permutation: its signs, to compare values only
    return torch.equal(sin, turn(sin) * signs) and torch.equal(cos, turn(cos) * signs)


def token_rows(x: Tensor, index: Tensor) -> Tensor:
    """Kept positions (B, M) of the tokens x (B, N, C) -> the rows of the flattened (B * N, C) tokens that
    `gather_tokens` and `merge_tokens` take (at batch 1, the positions themselves)."""
    if _one_image(x):
        return index.flatten()
    B, N = x.shape[0], x.shape[1]
    return (index + torch.arange(0, B * N, N, device=index.device).unsqueeze(1)).flatten()


def _one_node(fn):
    """`fn` as one node of an fx graph when fx traces it (it branches on shapes; fx re-traces blocks it unpickles)."""
    @functools.wraps(fn)
    def traced(*args):
        for a in args:  # (a loop: a generator costs ~1 µs more, several times a block)
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", traced, args, {})
        return fn(*args)
    return traced


@_one_node
def gather_rope(rope: Tensor, index: Tensor, num_prefix: int) -> Tensor:
    """A rotary table of the image tokens -> the rows of the kept image tokens, (B, 1 or H, K, E).

    `rope` is (N - P, E), (H, N - P, E) (a table per head) or (B, 1 or H, N - P, E) (per image, as timm
    makes it under patch dropout); `index` (B, P + K) the kept positions, prefix first.
    """
    image = index[:, num_prefix:] - num_prefix  # B, K
    B, K = image.shape
    dims = rope.dim()
    if dims == 2:  # index_select on rows: ~2x faster than rope[image] on CPU
        return rope.index_select(0, image.reshape(-1)).view(B, 1, K, rope.shape[-1])
    if dims == 3:
        return rope[:, image].transpose(0, 1)
    rope = rope.expand(B, *rope.shape[1:])
    return rope.gather(2, image.view(B, 1, K, 1).expand(B, rope.shape[1], K, rope.shape[3]))


@_one_node
def gather_normed_tokens(x_norm: Tensor, rows: Tensor, selector: "PositionalSelector", attn: nn.Module) -> Tensor:
    """`gather_tokens` of the normed tokens the attention `attn` reads, which also hands it the keys its selector
    projected from them (`PositionalSelector.hand_keys`; not in traced or exported graphs)."""
    kept = gather_tokens(x_norm, rows)
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        selector.hand_keys(x_norm, kept, rows, attn)
    return kept


@_one_node
def gather_bias(bias: Tensor, index: Tensor) -> Tensor:
    """A logit bias over all tokens (…, H, N, N) -> its rows and columns at the kept positions, (B, H, M, M)."""
    N = bias.shape[-1]
    B, M = index.shape
    pairs = (index.unsqueeze(2) * N + index.unsqueeze(1)).view(B, 1, M * M)  # B, 1, M²
    flat = bias.flatten(-2)
    flat = flat.reshape(-1, *flat.shape[-2:])  # b, H, N²
    H = flat.shape[1]
    return flat.expand(B, H, N * N).gather(2, pairs.expand(B, H, M * M)).view(B, H, M, M)


@_one_node
def check_pinned(value, expected, name: str) -> None:
    """Refuse an argument of an idle block that differs from what the conversion fixed (attn_mask=None, ...)."""
    if isinstance(value, Tensor) and value.dim() == 0 and expected is not None:  # torch.jit.trace passes flags as tensors
        value = type(expected)(value.item())
    if value is not expected and not (isinstance(expected, (bool, int, float)) and type(value) is type(expected)
                                      and value == expected):
        raise TypeError(f"an idle block was converted for {name}={expected!r}; it cannot take {name}={value!r}")
