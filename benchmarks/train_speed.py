"""The cost of one training step of IdleViT's finetune, dense vs idle, cut loss off and on.

    python benchmarks/train_speed.py                          # deit_small, batch 16, CPU
    python benchmarks/train_speed.py --device cuda --batch 128

A step is what `vitidle finetune` does per batch: the teacher's forward (no grad), the student's
forward and backward with CE + distillation (+ the token cut loss), and an AdamW step. Each setting
runs in a fresh process, so its peak resident memory (CPU) or peak allocated memory (CUDA) is its own.
Reports the median step time over `--steps` steps after 2 warm-up steps. The official code trains at the
dense cost or more (full attention with masks); vitidle's student runs the idle blocks as at inference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = {  # name: (keep, cut loss on)
    "dense": (None, False),
    "idle 0.7": (0.7, False),
    "idle 0.7 + cut loss": (0.7, True),
    "idle 0.5": (0.5, False),
    "idle 0.5 + cut loss": (0.5, True),
}


def one(args) -> dict:
    """Time one setting in this process."""
    import copy

    import timm
    import torch

    import vitidle
    from vitidle.idle import keep_mask
    from vitidle.train.losses import finetune_loss, token_cut_loss

    keep, cut = SETTINGS[args.one]
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).to(device)
    teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    student = dense if keep is None else vitidle.convert(dense, keep=keep)
    student.train()
    selectors = vitidle.idle_selectors(student)
    for s in selectors:
        s.record_attention = cut
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(args.batch, *student.pretrained_cfg["input_size"], device=device)
    y = torch.randint(0, student.num_classes, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.steps + 2):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(x)
        logits = student(x)
        cuts = [token_cut_loss(s.attention_logits, keep_mask(s, s.attention_logits.shape[-1])) for s in selectors] \
            if cut else []
        loss = finetune_loss(logits, y, cut_losses=cuts, num_idle=len(selectors), teacher_logits=t_logits)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"setting": args.one, "ms": statistics.median(times), "peak_mib": peak, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = []
    for name in SETTINGS:
        cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--batch", str(args.batch),
               "--steps", str(args.steps), "--device", args.device]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    memory = "peak MiB (CUDA allocated)" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{args.model}, batch {args.batch}, {args.device}, {rows[0]['threads']} threads, median of {args.steps} steps "
          "(teacher forward + student forward/backward + AdamW step)\n")
    print(f"| setting | step ms | vs dense | {memory} |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['ms']:.0f} | {rows[0]['ms'] / r['ms']:.2f}x | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
