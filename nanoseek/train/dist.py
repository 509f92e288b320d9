"""Data parallelism under torchrun, on PyTorch's own engine: DDP or FSDP2 (`fully_shard`).

`torchrun --nproc-per-node N -m nanoseek pretrain ...` starts N processes; each reads the same
data stream and takes its 1/N share of every global batch (`batch_size` is the global batch,
so batch size, gradient accumulation and learning rate mean the same whatever N is), and every
rank takes the same optimizer step. `parallel=ddp` (the default) keeps a whole model and its
optimizer state on every rank and averages the gradients; `parallel=fsdp` shards parameters,
gradients and optimizer state over the ranks (each transformer block, then the rest),
gathering a block's weights only while it runs: the memory of one model spread
over N devices. The aux-loss-free balancing counts expert load over the global batch
(all-reduced) so every rank moves its routing biases the same way; that is checked after each
step. Checkpoints are gathered into the one checkpoint format and written by rank 0 alone, so
a run saved under N processes (either mode) resumes under M. gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.train.optim import optimizer_state

PARALLEL = ("ddp", "fsdp")


def is_shard(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP shard (a DTensor). Nothing can be one before torch.distributed.tensor
    is imported (fully_shard imports it), so a one-process command never imports it: that import
    was ~1.8 s of every `nanoseek pretrain`'s start."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


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
        # rank 0 alone validates and writes checkpoints while the others wait in their next
        # collective: longer than NCCL's 10-minute default
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return Ranks(dist.get_rank(), dist.get_world_size(), device), device


class LossModule(nn.Module):
    """model.loss as a forward, so that DDP's hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, counts=None) -> dict[str, torch.Tensor]:
        return self.model.loss(x, y, counts)


def loss_fn(model: nn.Module, ranks: Ranks, device: torch.device, mode: str = "ddp"):
    """(x, y, counts=None) -> model.loss(...), through DDP or FSDP2 when there are several ranks.
    Under FSDP the model's parameters become shards (DTensors) in place: build the optimizer
    after this, and gather with `full_state` to save."""
    if not ranks.parallel:
        return model.loss
    if mode == "fsdp":
        return fsdp(model, LossModule(model))
    return ddp(LossModule(model), device)


def fsdp(model: nn.Module, root: nn.Module) -> nn.Module:
    """FSDP2 over `root`, a module holding `model` whose forward computes the loss: each block
    sharded on its own (one all-gather per block, freed after it), then the rest in one group,
    gathered for the whole of root's forward: the embedding, final norm, head and the MTP
    modules (the loss calls their head's norm outside their forward)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(root)
    return root


def copy_whole(model: nn.Module, target: nn.Module) -> None:
    """Load `model`'s weights, gathered whole where they are FSDP shards (every rank calls
    this), into `target`, a plain copy (what the inference engine samples from)."""
    target.load_state_dict({k: full(v) for k, v in model.state_dict().items()})


def gradient_sync(module: nn.Module, on: bool):
    """A context in which backward passes sync gradients over the ranks (on) or only
    accumulate them (off: every micro-batch but the last of an update), for DDP and FSDP."""
    if on:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def ddp(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel over a module whose forward computes the loss."""
    # broadcast_buffers off: DDP would copy rank 0's expert-load counters over every rank's
    # before each forward; the counts are summed in sync_expert_load instead
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False, find_unused_parameters=find_unused,
                                               device_ids=[device.index] if device.type == "cuda" else None)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank calls it); a plain
    tensor as it is."""
    return t.full_tensor() if is_shard(t) else t


def full_state(model: nn.Module, opt: torch.optim.Optimizer,
               ranks: Ranks) -> tuple[nn.Module | None, tuple[dict[str, torch.Tensor], dict]]:
    """What a checkpoint holds, whole: the model and the optimizer state (`optim.optimizer_state`).
    Under FSDP (every rank calls this; each tensor is gathered in turn and only rank 0 keeps
    it) an unsharded copy of the model on the CPU and the gathered optimizer tensors; otherwise
    the model and the state as they are."""
    tensors, info = optimizer_state(opt)
    if not any(is_shard(p) for p in model.parameters()):
        return model, (tensors, info)

    def gather_to_main(items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in items.items():
            t = full(v)  # (a collective: every rank takes part)
            if ranks.main:
                out[k] = t.detach().cpu()
        return out

    state, tensors = gather_to_main(model.state_dict()), gather_to_main(tensors)
    if not ranks.main:
        return None, ({}, info)
    with torch.device("meta"):  # no second initialization (nor its random numbers): the weights are these
        copy = type(model)(model.config)
    copy.load_state_dict(state, assign=True)
    return copy, (tensors, info)


def shard_like_params(tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Saved (whole) optimizer tensors `optim.<i>.<key>` cut into this rank's shards where
    parameter i is an FSDP shard, so that a run saved under any N resumes under FSDP."""
    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            p = params[int(name.split(".")[1])]
            if is_shard(p) and value.shape == p.shape:
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                          src_data_rank=None)  # every rank holds the whole: cut locally
        out[name] = value
    return out


def target_counts(labels: torch.Tensor, depths: int, ignore: int, ranks: Ranks) -> list[torch.Tensor] | None:
    """For the global batch's labels: each head's number of targets (the main head, then MTP
    depth k, whose targets are labels[:, k:]) divided by the number of ranks. Dividing each
    rank's summed loss by these, not by its own counts, makes the average of the ranks'
    gradients the gradient of the global batch's mean loss, also where masks give ranks
    unequal numbers of targets (SFT). None with one process (model.loss counts for itself)."""
    if not ranks.parallel:
        return None
    return [(labels[:, k:] != ignore).sum().float() / ranks.world for k in range(depths + 1)]


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's rows of a global batch."""
    per = batch.shape[0] // ranks.world
    return batch[ranks.rank * per: (ranks.rank + 1) * per]


def share(items: list, ranks: Ranks) -> list:
    """This rank's contiguous share of a global list (e.g. GRPO's prompts of a step)."""
    if len(items) % ranks.world:
        raise ValueError(f"{len(items)} items do not divide among {ranks.world} processes")
    per = len(items) // ranks.world
    return items[ranks.rank * per: (ranks.rank + 1) * per]


def gather(items: list, ranks: Ranks) -> list:
    """Every rank's list, concatenated in rank order (small Python objects: rewards, lengths)."""
    if not ranks.parallel:
        return items
    parts: list = [None] * ranks.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def total(value: float, ranks: Ranks, op: str = "sum") -> float:
    """The sum (or "max") over ranks."""
    if not ranks.parallel:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t)


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
    if ranks.parallel:
        _check_same(torch.cat([m.gate.e_score_correction_bias.detach().flatten() for m in model.moe_layers()]
                              or [torch.zeros(0, device=ranks.device)]), ranks, "routing biases")


def check_same_start(model: nn.Module, ranks: Ranks) -> None:
    """Before wrapping: every rank starts from rank 0's weights (DDP would copy them over;
    FSDP cuts each rank's shard from the rank's own copy)."""
    if ranks.parallel:
        _check_same(torch.stack([t.detach().double().sum() for t in model.state_dict().values()]), ranks,
                    "initial weights")


def _check_same(mine: torch.Tensor, ranks: Ranks, what: str) -> None:
    mine = mine.to(ranks.device)
    first = mine.clone()
    dist.broadcast(first, 0)
    if not torch.equal(mine, first):
        raise RuntimeError(f"rank {ranks.rank}'s {what} differ from rank 0's")


_shared_group = False  # inside one_group(): the training stages keep the process group


def finish(ranks: Ranks) -> None:
    """Wait for rank 0's last checkpoint, then leave the process group (a pipeline's stages keep
    it: one_group)."""
    if ranks.parallel:
        dist.barrier()
        if not _shared_group:
            _leave()


def _leave() -> None:
    # gloo's worker threads free a finished collective's tensors under the GIL; a group
    # destroyed while one still does (the DDP reducer drops the last reference with the
    # GIL held, then joins them) deadlocks, about 1 run in 10: let them finish first
    time.sleep(0.1)
    dist.destroy_process_group()


@contextlib.contextmanager
def one_group():
    """Every training stage of a pipeline in one process group: a group destroyed and created
    again in the same processes hangs in the second rendezvous."""
    global _shared_group
    _shared_group = True
    try:
        yield
    finally:
        _shared_group = False
        if dist.is_initialized():  # (no barrier: rank 0 may still be evaluating)
            _leave()
