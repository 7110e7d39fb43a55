"""What each rank sends when fxq runs on several processes (torch.distributed: gloo on CPUs,
NCCL on GPUs, started by torchrun).

fxq uses the process group the user initialized; it starts none. With no group, or a group of one,
every function here is an identity and a single process pays nothing. Every rank must make the
same fxq calls in the same order: each call below is a collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return world_size() > 1


def _device() -> torch.device:
    if dist.get_backend() == "nccl":  # NCCL moves only CUDA tensors
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if not active():
        return tensor
    moved = tensor.detach().to(_device(), copy=True)
    dist.all_reduce(moved, op=getattr(dist.ReduceOp, op))
    return moved.to(tensor.device)


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks (a new tensor, on ``tensor``'s device)."""
    return _reduce(tensor, "SUM")


def reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, "MIN")


def reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, "MAX")


def gather(obj) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def concat(tensor: torch.Tensor | None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (sizes may differ; a rank
    with nothing passes None)."""
    if not active():
        return tensor
    parts = [t for t in gather(None if tensor is None else tensor.cpu()) if t is not None]
    return torch.cat(parts).to(tensor.device if tensor is not None else "cpu")


def agree(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed (the others would otherwise wait forever in the next
    collective): a failed rank raises its own error, the others say which rank failed and why."""
    messages = gather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")


def mine(items: list) -> list:
    """This rank's share of ``items`` when work is divided: every ``world_size``-th, from ``rank``."""
    return items[rank()::world_size()]


def collected(share: dict) -> dict:
    """The union of every rank's ``share`` (a dict of picklable results), on every rank."""
    merged = {}
    for part in gather(share):
        merged.update(part)
    return merged
