"""Brute-force IdleViT, written from the paper's definition, to check the fx rewrite against."""

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
    """Records the input of every softmax: an attention's pre-softmax logits, as it computes them."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int):
            self.inputs.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


def layer_logits(block, x, **block_kwargs) -> torch.Tensor:
    """(B, H, N, N) pre-softmax logits of the block's attention on x, captured at its softmax: rotary
    embeddings applied and position bias added by the layer's own (unfused) code, nothing recomputed here."""
    attn = block.attn
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad(), _SoftmaxInputs() as mode:
            block(x, **block_kwargs)
    finally:
        attn.fused_attn = fused
    return mode.inputs[0]


def positional_kept(block, x, num_keep: int, num_prefix: int, query: str = "cls", **block_kwargs) -> torch.Tensor:
    """(B, P + K) sorted positions: every prefix token and the top-K image tokens by the layer's own logits."""
    logits = layer_logits(block, x, **block_kwargs).mean(1)  # head mean, B, N, N
    scores = logits[:, 0] if query == "cls" else logits.mean(1)
    top = scores[:, num_prefix:].topk(num_keep, dim=1).indices + num_prefix
    prefix = torch.arange(num_prefix).expand(x.shape[0], -1)
    return torch.cat([prefix, top], 1).sort(1).values


def masked_idle_forward(block, x, kept: torch.Tensor, mask_into: str = "attn_mask", **block_kwargs) -> torch.Tensor:
    """The idle layer without any gathering: the dense block on all tokens with the idle tokens' keys
    masked out of attention (-inf added through the block's argument `mask_into`: its attention mask, or
    a bias it adds to the logits), then the idle tokens' outputs replaced by their inputs."""
    B, N, _ = x.shape
    keep = torch.zeros(B, N, dtype=torch.bool).scatter_(1, kept, True)
    mask = torch.zeros(B, 1, N, N).masked_fill(~keep[:, None, None, :], float("-inf"))
    given = block_kwargs.get(mask_into)
    block_kwargs[mask_into] = mask if given is None else given + mask
    with torch.no_grad():
        y = block(x, **block_kwargs)
    return torch.where(keep.unsqueeze(-1), y, x)
