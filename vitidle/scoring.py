"""Where an attention module keeps its query and key projections, per attention kind.

The token score of IdleViT is the head-mean pre-softmax logit of one query against every key.
Summed over heads, q_h · k_h is the plain dot product q · k over all heads' dims, so the head
mean is (scale / H) · q · (W_k x + b_k): linear in the normed token x. That lets `TokenSelector`
score N tokens in O(N·C) without projecting any key, which holds only where keys are a plain
linear map of the normed token. Attention with qk-norm is refused here. Attention with rotary
embeddings or a position bias is scored by `idle.PositionalSelector`, from the same description.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class QueryKey:
    """Where one attention module projects queries and keys, and its logit scale.

    `q_proj` / `k_proj` are child modules (dotted paths; the same fused `qkv` Linear for both, or two
    Linears); `q_rows` / `k_rows` are the output features that hold the query / key.
    """

    q_proj: str
    k_proj: str
    q_rows: slice | None
    k_rows: slice | None
    num_heads: int
    scale: float
    q_bias: str | None = None  # a query / key bias kept apart from the Linear (EVA, BEiT: `q_bias`, `k_bias`)
    k_bias: str | None = None
    num_kv_heads: int = 0  # key heads (grouped-query attention); 0: num_heads
    rotate_half: bool = False  # the rotary layout the attention applies (timm's `rotate_half`), if it takes rope

    def __post_init__(self):
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)

    @property
    def plain(self) -> bool:
        """Whether `TokenSelector`'s fast path describes it: biases inside the Linears, one key head per head."""
        return self.q_bias is None and self.k_bias is None and self.num_kv_heads == self.num_heads


def is_attention(module: nn.Module) -> bool:
    """True for a multi-head self-attention module with a fused `qkv` or separate `q_proj`/`k_proj`."""
    has_qkv = isinstance(getattr(module, "qkv", None), nn.Linear)
    has_qk = isinstance(getattr(module, "q_proj", None), nn.Linear) and isinstance(
        getattr(module, "k_proj", None), nn.Linear
    )
    return (has_qkv or has_qk) and isinstance(getattr(module, "num_heads", None), int)


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def query_key(attn: nn.Module, name: str = "attention") -> QueryKey:
    """Describe the query/key projections of `attn`, or raise `UnsupportedModelError` saying why.

    >>> from timm.layers import Attention
    >>> qk = query_key(Attention(64, num_heads=4, qkv_bias=True))
    >>> qk.k_proj, qk.k_rows
    ('qkv', slice(64, 128, None))
    """
    if not is_attention(attn):
        raise UnsupportedModelError(f"{name} ({type(attn).__name__}) is not a qkv attention module")
    if not (_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None))):
        raise UnsupportedModelError(
            f"{name} uses qk-norm, whose keys are not linear in the token; vitidle cannot score it yet"
        )
    if hasattr(attn, "proj_l"):  # CaiT's talking heads mix the heads' logits before the softmax
        raise UnsupportedModelError(
            f"{name} mixes heads before the softmax (talking heads); vitidle cannot score it yet"
        )
    num_heads = attn.num_heads
    num_kv_heads = getattr(attn, "num_kv_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{name} has {num_heads} query heads and {num_kv_heads} key heads; vitidle "
                                    "needs a whole number of query heads per key head")
    if isinstance(getattr(attn, "qkv", None), nn.Linear):
        dim = attn.qkv.out_features // 3
        qk = QueryKey("qkv", "qkv", slice(0, dim), slice(dim, 2 * dim), num_heads, 0.0)
    else:
        dim = attn.q_proj.out_features
        qk = QueryKey("q_proj", "k_proj", None, None, num_heads, 0.0)
    # EVA and BEiT keep the query and key biases beside a bias-free qkv Linear
    biases = {f"{w}_bias": f"{w}_bias" if isinstance(getattr(attn, f"{w}_bias", None), torch.Tensor) else None
              for w in "qk"}
    scale = float(getattr(attn, "scale", (dim // num_heads) ** -0.5))
    return dataclasses.replace(qk, scale=scale, num_kv_heads=num_kv_heads,
                               rotate_half=bool(getattr(attn, "rotate_half", False)), **biases)
