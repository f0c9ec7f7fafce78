"""torch.distributed helpers: setup from torchrun's environment, gathers for the global batch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes files and prints progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info


def cleanup() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order; only this process's rows carry gradient.

    Row counts may differ between processes (images have different numbers of regions).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    rows = [int(s) for s in sizes]
    padded = torch.zeros((max(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, rows, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (small, picklable), in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is True on any (e.g. a stop request)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_ints(values: list[int], device: torch.device) -> list[int]:
    """Element-wise sum of small integer lists over processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def barrier() -> None:
    """Wait for every process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
