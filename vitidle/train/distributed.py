"""Many processes through torchrun (torch.distributed): one process group, sharded data, rank 0 writes.

`vitidle finetune` needs no launcher of its own: under `torchrun --nproc_per_node N` each process
reads the group from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), trains on
its shard with gradients averaged by DistributedDataParallel, and only rank 0 logs and writes.
gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank, world size, its device, and whether it made the group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Group:
    """The process group torchrun describes (or a group of one), and this process's device.

    `device_name` is the recipe's run.device: auto (cuda if available), cpu, cuda, cuda:N. Under
    torchrun, cuda means this process's LOCAL_RANK device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"run.device {device_name}: CUDA is not available here; use cpu or auto")
    if cuda:
        device = torch.device("cuda", local if world > 1 or ":" not in device_name else int(device_name[5:]))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name if device_name not in ("auto", "cuda") else "cpu")
    if world == 1:
        return Group(device=device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), device, owned)


def reduce_step(values: dict[str, float], stop: bool, group: Group) -> tuple[dict[str, float], bool]:
    """The loss terms averaged over the processes, and whether any of them was asked to stop.

    Every process gets the same answer, so all take the same branch (stop, or raise on a non-finite
    loss) at the same step instead of waiting for each other forever.
    """
    if group.world == 1:
        return values, stop
    flat = torch.tensor([*values.values(), float(stop)], dtype=torch.float64, device=group.device)
    dist.all_reduce(flat)
    *sums, stops = flat.tolist()
    return {k: v / group.world for k, v in zip(values, sums)}, stops > 0


def gather(obj, group: Group) -> list:
    """`obj` of every process, in rank order (for each process's RNG state in a checkpoint)."""
    if group.world == 1:
        return [obj]
    out = [None] * group.world
    dist.all_gather_object(out, obj)
    return out


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def teardown(group: Group) -> None:
    if group.owned and dist.is_initialized():
        dist.destroy_process_group()
