"""The CPU cost of the idle op's data movement and scoring, each way it could be written.

    python benchmarks/token_moves.py

DeiT-S shapes (N = 197 tokens, C = 384, K = 138 kept), batch 1 and 16, median µs per call.
"""

import statistics

import torch

from vitidle.bench import time_interleaved


def main() -> None:
    N, C, K = 197, 384, 138
    for B in (1, 16):
        x, y = torch.randn(B, N, C), torch.randn(B, K, C)
        index = torch.rand(B, N).topk(K, dim=1, sorted=False).indices  # B, K
        expanded = index.unsqueeze(-1).expand(-1, -1, C)
        rows = (index + torch.arange(0, B * N, N).unsqueeze(1)).flatten()
        u = torch.randn(B, C)
        with torch.inference_mode():
            us = time_interleaved({
                "gather (expanded index)": lambda: x.gather(1, expanded),
                "index_select (rows)": lambda: x.reshape(B * N, C).index_select(0, rows),
                "scatter (expanded index)": lambda: x.scatter(1, expanded, y),
                "index_copy (rows)": lambda: x.reshape(B * N, C).index_copy(0, rows, y.reshape(-1, C)),
                "scores (N,C)@(C,1)": lambda: torch.bmm(x, u.unsqueeze(-1)),
                "scores (1,C)@(C,N)": lambda: torch.bmm(u.unsqueeze(1), x.transpose(1, 2)),
            }, repeats=20, iters=50)
        print(f"batch {B}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f} µs" for k, v in us.items()))


if __name__ == "__main__":
    main()
