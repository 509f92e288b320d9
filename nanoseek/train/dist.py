"""Data parallelism under torchrun, on PyTorch's own engine (DistributedDataParallel).

`torchrun --nproc-per-node N -m nanoseek pretrain ...` starts N processes; each reads the same
data stream and takes its 1/N share of every global batch (`batch_size` is the global batch,
so batch size, gradient accumulation and learning rate mean the same whatever N is), DDP
averages the gradients, and every rank takes the same optimizer step. The aux-loss-free
balancing counts expert load over the global batch (all-reduced) so every rank moves its
routing biases the same way; that is checked after each step. Rank 0 alone writes metrics
and checkpoints, in the one checkpoint format, so a run saved under N processes resumes
under M. gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """The process group torchrun describes in the environment (none: one process); under
    CUDA each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device), device


class LossModule(nn.Module):
    """model.loss as a forward, so that DDP's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(x, y)


def loss_fn(model: nn.Module, ranks: Ranks, device: torch.device):
    """(x, y) -> model.loss(x, y), through DDP when there are several ranks."""
    if not ranks.parallel:
        return model.loss
    # broadcast_buffers off: DDP would copy rank 0's expert-load counters over every rank's
    # before each forward; the counts are summed in sync_expert_load instead
    return nn.parallel.DistributedDataParallel(LossModule(model), broadcast_buffers=False,
                                               device_ids=[device.index] if device.type == "cuda" else None)


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's rows of a global batch."""
    per = batch.shape[0] // ranks.world
    return batch[ranks.rank * per: (ranks.rank + 1) * per]


def mean(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """The mean over ranks of each value (the loss parts of their shares of the batch)."""
    if not ranks.parallel or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return {k: float(v) / ranks.world for k, v in zip(values, t)}


def all_true(flag: bool, ranks: Ranks) -> bool:
    if not ranks.parallel:
        return flag
    t = torch.tensor([0 if flag else 1], device=ranks.device)
    dist.all_reduce(t)
    return int(t) == 0


def sync_expert_load(model: nn.Module, ranks: Ranks) -> None:
    """Sum each MoE layer's expert counts over the ranks (before the bias update)."""
    if ranks.parallel:
        for m in model.moe_layers():
            load = m.expert_load.to(torch.float64)
            dist.all_reduce(load)
            m.expert_load.copy_(load.to(m.expert_load.dtype))


def check_same_biases(model: nn.Module, ranks: Ranks) -> None:
    """Every rank must route the same way: its balancing biases equal rank 0's."""
    if not ranks.parallel:
        return
    mine = torch.cat([m.gate.e_score_correction_bias.detach().flatten() for m in model.moe_layers()]
                     or [torch.zeros(0, device=ranks.device)])
    first = mine.clone()
    dist.broadcast(first, 0)
    if not torch.equal(mine, first):
        raise RuntimeError(f"rank {ranks.rank}'s routing biases differ from rank 0's")


def finish(ranks: Ranks) -> None:
    """Wait for rank 0's last checkpoint, then leave the process group."""
    if ranks.parallel:
        dist.barrier()
        dist.destroy_process_group()
