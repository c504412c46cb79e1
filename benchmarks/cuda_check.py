"""The engine's correctness properties, checked on a CUDA device (the test suite runs on CPU only).

    python benchmarks/cuda_check.py                 # DeiT-S, random init, cuda:0

Each check prints one line and the script exits 1 if any fails. fp32 matmuls and convolutions run
without TF32, so the tolerances are those of the CPU tests.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import kept_positions  # noqa: E402

import vitidle  # noqa: E402
from vitidle.bench import capture_cuda_graph  # noqa: E402

failed: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failed.append(name)


def block_io(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """The model's output and each block's input and output."""
    inputs, outputs = {}, {}

    def keep(i: int):
        def hook(module, args, out):  # returns None: the output is unchanged
            inputs[i], outputs[i] = args[0], out
        return hook

    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(model.blocks)]
    y = model(x)
    for h in hooks:
        h.remove()
    return y, inputs, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (a dry run)"
    print(f"{name}, torch {torch.__version__}, timm {timm.__version__}", flush=True)

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    x_cpu = torch.randn(8, 3, *dense.patch_embed.img_size)
    x = x_cpu.to(dev)
    dense_gpu = copy.deepcopy(dense).to(dev)

    with torch.inference_mode():
        same = vitidle.convert(copy.deepcopy(dense), 1.0).to(dev)
        diff = (same(x) - dense_gpu(x)).abs().max().item()
    check("keep 1.0 equals dense", diff < 1e-5, f"max diff {diff:.2e}")

    idle_cpu = vitidle.convert(copy.deepcopy(dense), 0.5).eval()
    idle = copy.deepcopy(idle_cpu).to(dev)
    num_prefix = idle.vitidle_config["layout"]["num_prefix"]
    with torch.inference_mode():
        y, inputs, outputs = block_io(idle, x)
        y_cpu = idle_cpu(x_cpu)
        cpu_kept = [b.selector.kept_index.sort(1).values for b in idle_cpu.blocks if hasattr(b, "selector")]
        layers = [(i, b) for i, b in enumerate(idle.blocks) if hasattr(b, "selector")]
        brute, identical, same_as_cpu = 0, 0, 0
        for (i, block), kept_cpu in zip(layers, cpu_kept):
            kept = block.selector.kept_index.sort(1).values
            brute += torch.equal(kept, kept_positions(dense_gpu.blocks[i], inputs[i], block.selector.num_keep, num_prefix))
            same_as_cpu += torch.equal(kept.cpu(), kept_cpu)
            is_idle = torch.ones(kept.shape[0], inputs[i].shape[1], dtype=torch.bool, device=dev).scatter_(1, kept, False)
            identical += torch.equal(outputs[i][is_idle], inputs[i][is_idle])
    n = len(layers)
    check("kept set equals brute-force top-K", brute == n, f"{brute}/{n} idle layers")
    check("idle tokens bit-identical", identical == n, f"{identical}/{n} idle layers")
    check("kept set equals the CPU's", same_as_cpu == n, f"{same_as_cpu}/{n} idle layers")
    diff = (y.cpu() - y_cpu).abs().max().item()
    check("cuda equals cpu", diff < 1e-4, f"max diff {diff:.2e}")

    frozen = vitidle.freeze(copy.deepcopy(idle))
    with torch.inference_mode():
        frozen(x)  # forms the cached weight products
        diff = (frozen(x) - y).abs().max().item()
    same = sum(torch.equal(f.selector.kept_index.sort(1).values, b.selector.kept_index.sort(1).values)
               for f, (_, b) in zip([f for f in frozen.blocks if hasattr(f, "selector")], layers))
    check("frozen (cached product) keeps the same tokens", same == n and diff < 1e-4,
          f"{same}/{n} idle layers, max diff {diff:.2e}")

    plain = copy.deepcopy(idle)
    plain.blocks = torch.nn.Sequential(*plain.blocks)  # every merge copies
    with torch.inference_mode():
        diff = (idle(x) - plain(x)).abs().max().item()
    check("writing into block inputs changes nothing", diff == 0, f"max diff {diff:.2e}")

    if cuda:
        with torch.inference_mode():
            run = capture_cuda_graph(idle, x)
            diff = (run() - y).abs().max().item()
        check("CUDA graph replay equals eager", diff == 0, f"max diff {diff:.2e}")

    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
        y_bf16 = idle(x).float()
    agree = (y_bf16.argmax(1) == y.argmax(1)).float().mean().item()
    check("bf16 autocast runs", bool(torch.isfinite(y_bf16).all()), f"top-1 agreement with fp32 {agree:.0%} "
          f"(random init: logits are close together), max diff {(y_bf16 - y).abs().max().item():.2e}")

    train = copy.deepcopy(idle).train()
    for sel in vitidle.idle_selectors(train):
        sel.record_attention = True
    out = train(x)
    loss = out.logsumexp(1).mean() + sum(s.attention_logits.square().mean() for s in vitidle.idle_selectors(train))
    loss.backward()
    grads = [p.grad for p in train.parameters()]
    ok = all(g is not None and torch.isfinite(g).all() for g in grads)
    check("train step with recorded attention", ok, f"loss {loss.item():.3f}, {len(grads)} parameters with finite grads")

    start = time.perf_counter()
    compiled = torch.compile(copy.deepcopy(idle), fullgraph=True)
    with torch.inference_mode():
        y_compiled = compiled(x)
    diff = (y_compiled - y).abs().max().item()
    check("torch.compile(fullgraph=True) equals eager", diff < 1e-4,
          f"max diff {diff:.2e}, compiled in {time.perf_counter() - start:.0f} s")

    print(f"{len(failed)} failed" + (": " + ", ".join(failed) if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
