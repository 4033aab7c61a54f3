"""Data parallelism on torch.distributed (launched by torchrun): DDP or FSDP2.

Every rank holds all the data and builds the same global micro-batches (a pure function of
seed and epoch); rank k takes rows k, k+W, k+2W, ... of each. Each rank weights its loss by its
share of the global step's loss targets, and the gradients are summed across ranks, so the
update equals the single-process one with the same global batch.

    DDP   the model is replicated; only the adapter (trainable) parameters are registered with
          DDP, so only they are broadcast at start and all-reduced each step; the frozen base
          is never synchronised.
    FSDP  (torch's FSDP2 `fully_shard`) every block's parameters, frozen base included, are
          sharded across ranks; per-parameter sharding has no "uniform requires_grad" limit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..lora.architectures import block_stacks
from ..lora.io import whole_tensor

T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistContext:
    """This process's place in the job. `world == 1`: a plain single-process run."""

    rank: int = 0
    world: int = 1
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------
    def shard_indices(self, n: int) -> tuple[list[int], int]:
        """This rank's rows of n: rank, rank+W, ..., padded by repeating the last row so every
        rank runs the same number of batches (FSDP's forward is a collective). Returns the
        indices and how many of them are real (the rest only pad)."""
        mine = list(range(self.rank, n, self.world))
        per_rank = -(-n // self.world)
        return mine + [n - 1] * (per_rank - len(mine)), len(mine)

    def shard(self, items: Sequence[T]) -> list[T]:
        """`items` at this rank's `shard_indices`."""
        indices, _ = self.shard_indices(len(items))
        return [items[i] for i in indices]

    def gather(self, mine: list[T], total: int) -> list[T]:
        """Inverse of `shard`: every rank's results back in the original order."""
        if not self.enabled:
            return mine
        parts: list[list[T]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, mine)
        return [parts[i % self.world][i // self.world] for i in range(total)]

    def sum(self, values: Sequence[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(strategy: str = "ddp", timeout_s: float | None = None) -> DistContext:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR...);
    a plain run when there is none. gloo on CPU, NCCL on GPU. The timeout bounds how long a
    collective waits for a rank that died, so the job stops instead of hanging."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--distributed={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(strategy=strategy)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=timeout_s or float(os.environ.get("LORAKIT_DIST_TIMEOUT", "300")))
        dist.init_process_group(backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), strategy=strategy)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module to call forward on: DDP over the adapter parameters only, or FSDP2-sharded
    blocks (the same object, sharded in place)."""
    if not ctx.enabled:
        return model
    if ctx.strategy == "fsdp":
        return _fully_shard(model)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back to its sharded parameters. The root unit keeps its parameters
    gathered after a forward (backward would gather them again); after an evaluation there is
    no backward, and gathering a root-level adapter parameter (a LoRA on the pooler) whole from
    that state crashes the process group, so saving and checkpointing reshard first."""
    if not torch.distributed.is_available():  # a torch built without it has no FSDP units either
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (every stack of them), the natural shard units."""
    return [block for stack in block_stacks(model) for block in stack]


def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter that may be sharded."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


def sync_bytes_per_step(model: nn.Module) -> dict[str, Any]:
    """Gradient bytes each step all-reduces: trainable parameters only, vs what full
    fine-tuning would send (every parameter)."""
    params = list({id(p): p for p in model.parameters()}.values())
    lora = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    full = sum(p.numel() * p.element_size() for p in params)
    return {"allreduce_bytes_per_step": lora, "full_ft_allreduce_bytes_per_step": full}


def full_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, with whole (gathered) tensors: it loads
    back whatever the number of processes (a collective under FSDP)."""
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                state[names[id(p)]] = {
                    k: whole_tensor(v).detach().cpu() if torch.is_tensor(v) else v
                    for k, v in optimizer.state[p].items()
                }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], saved: dict[str, Any]
) -> None:
    """Inverse of `full_optimizer_state`: whole tensors are re-sharded like their parameter."""
    for group, settings in zip(optimizer.param_groups, saved["groups"]):
        group.update(settings)
    on_device = {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    for name, entries in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {k: _state_like(p, v, id(p) in on_device) for k, v in entries.items()}


def _state_like(param: torch.Tensor, value: Any, scalars_on_device: bool) -> Any:
    """A saved optimizer state entry where the optimizer wants it: moments like the parameter;
    the step count on the CPU, or beside the parameter for fused/capturable AdamW (as torch's
    own load_state_dict places it: the fused kernel reads it on the device)."""
    if not torch.is_tensor(value):
        return value
    if value.dim() > 0:
        return _like(param, value)
    return value.to(device=param.device, dtype=torch.float32) if scalars_on_device else value


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full.to(param.device)
