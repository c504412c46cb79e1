"""`vitidle finetune` under torchrun: two CPU processes (gloo) follow one process at the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_KWARGS, summary
from safetensors.torch import load_file

from vitidle.train import loop
from vitidle.train.recipe import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_follow_one_at_the_same_global_batch(folder, tmp_path):
    fields = {"model": {"name": "deit_tiny", "model_kwargs": TINY_KWARGS, "keep": 0.5},
              "data": {"root": str(folder), "auto_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0,
                       "color_jitter": 0.0, "scale": [0.9, 1.0]},  # crops seeded per image: the same in any process
              "optim": {"lr": 1e-3, "scale_lr": True, "min_lr": 1e-4, "warmup_epochs": 0.5},
              "run": {"epochs": 2, "batch_size": 4, "accumulation": 2, "num_workers": 0, "device": "cpu",
                      "output": str(tmp_path / "two")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(fields))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "cli.main", "finetune", str(path), "-q"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("teacher     top-1") == 1  # rank 0 alone logs

    # one process, the same global batch (4 x 2 accumulation x 2 processes = 8 x 2), hence the same lr
    one = loop.finetune(load_recipe(path, ["run.batch_size=8", f"run.output={tmp_path / 'one'}"]), progress=False,
                        log=lambda s: None)
    two = tmp_path / "two"
    assert [r["step"] for r in summary(two)] == [r["step"] for r in summary(one)] == ["3", "6"]
    for a, b in zip(summary(two), summary(one)):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))
        assert float(a["top1"]) == pytest.approx(float(b["top1"]))  # the shards' counts summed: all 16 images
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    state = torch.load(two / "checkpoints" / "step-0000006" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each process's random state, for an exact resume
