"""Brute-force IdleViT, written from the paper's definition, to check the fx rewrite against."""

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def class_attention_scores(block, x: torch.Tensor, query: str = "cls") -> torch.Tensor:
    """Full multi-head attention of the block's own attention, pre-softmax, head mean; the query row(s)."""
    attn = block.attn
    B, N, C = x.shape
    xn = block.norm1(x)
    q, k, _ = attn.qkv(xn).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = ((q @ k.transpose(-2, -1)) * attn.scale).mean(1)  # B, N, N
    return logits[:, 0] if query == "cls" else logits.mean(1)


def kept_positions(block, x, num_keep: int, num_prefix: int, query: str = "cls") -> torch.Tensor:
    """(B, P + K) sorted positions: every prefix token and the top-K image tokens by score."""
    scores = class_attention_scores(block, x, query)
    top = scores[:, num_prefix:].topk(num_keep, dim=1).indices + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1)
    return torch.cat([prefix, top], 1).sort(1).values


def idle_forward(block, x, num_keep: int, num_prefix: int, query: str = "cls") -> torch.Tensor:
    """Eager IdleViT layer: run the dense block on the kept tokens, copy idle tokens unchanged."""
    index = kept_positions(block, x, num_keep, num_prefix, query)
    index = index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    out = x.clone()
    out.scatter_(1, index, block(x.gather(1, index)))
    return out


class _SoftmaxInputs(TorchDispatchMode):
    """Records the input of every softmax: an attention's pre-softmax logits, as it computes them; with
    `add`, adds it to them first."""

    def __init__(self, add: torch.Tensor | None = None):
        super().__init__()
        self.inputs = []
        self.add = add

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int):
            if self.add is not None:
                args = (args[0] + self.add, *args[1:])
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


@contextmanager
def _unfused(attn):
    """The attention's own unfused code, whose softmax `_SoftmaxInputs` sees."""
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        yield
    finally:
        attn.fused_attn = fused


def layer_logits(block, x, **block_kwargs) -> torch.Tensor:
    """(B, H, N, N) pre-softmax logits of the block's attention on x, captured at its softmax: rotary
    embeddings applied and position bias added by the layer's own (unfused) code, nothing recomputed here."""
    with torch.no_grad(), _unfused(block.attn), _SoftmaxInputs() as mode:
        block(x, **block_kwargs)
    return mode.inputs[0]


def positional_kept(block, x, num_keep: int, num_prefix: int, query: str = "cls", **block_kwargs) -> torch.Tensor:
    """(B, P + K) sorted positions: every prefix token and the top-K image tokens by the layer's own logits."""
    logits = layer_logits(block, x, **block_kwargs).mean(1)  # head mean, B, N, N
    scores = logits[:, 0] if query == "cls" else logits.mean(1)
    top = scores[:, num_prefix:].topk(num_keep, dim=1).indices + num_prefix
    prefix = torch.arange(num_prefix).expand(x.shape[0], -1)
    return torch.cat([prefix, top], 1).sort(1).values


def masked_idle_forward(block, x, kept: torch.Tensor, mask_into: str | None = "attn_mask", **block_kwargs
                        ) -> torch.Tensor:
    """The idle layer without any gathering: the dense block on all tokens with the idle tokens' keys
    masked out of attention (-inf added through the block's argument `mask_into`: its attention mask, or
    a bias it adds to the logits; None: to the logits at its softmax), then the idle tokens' outputs
    replaced by their inputs."""
    B, N, _ = x.shape
    keep = torch.zeros(B, N, dtype=torch.bool).scatter_(1, kept, True)
    mask = torch.zeros(B, 1, N, N).masked_fill(~keep[:, None, None, :], float("-inf"))
    with torch.no_grad():
        if mask_into is None:
            with _unfused(block.attn), _SoftmaxInputs(add=mask):
                y = block(x, **block_kwargs)
        else:
            given = block_kwargs.get(mask_into)
            y = block(x, **{**block_kwargs, mask_into: mask if given is None else given + mask})
    return torch.where(keep.unsqueeze(-1), y, x)
