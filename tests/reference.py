"""Brute-force IdleViT, written from the paper's definition, to check the fx rewrite against."""

import torch


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
