"""Process-group setup: one process, or many under torchrun (DDP over nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from imgen_cli.errors import UserError
from imgen_cli.nn.family import FamilyNetwork


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None) -> torch.device:
    """`--device` (cpu, cuda, cuda:1, ...) checked against what this machine has; default cuda if present."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible on this machine; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: imgen runs on cpu or cuda.")
    return device


def setup(requested_device: str | None = None) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (RANK set), else run alone."""
    if "RANK" not in os.environ:
        return DistEnv(0, 0, 1, pick_device(requested_device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, local_rank, world_size, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_agree(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any rank (a stop request, a bad loss)."""
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    if not env.distributed:
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _blocks(model: FamilyNetwork) -> list[nn.Module]:
    types = model.block_types
    return [m for m in model.modules() if types and isinstance(m, types)]


def apply_activation_checkpointing(model: FamilyNetwork) -> None:
    """Recompute each of the family's blocks in backward instead of storing its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap,
    )

    types = model.block_types
    if not types:
        raise UserError(f"{type(model).__name__} declares no block_types, so it cannot use activation checkpointing.")
    wrap(model, check_fn=lambda m: isinstance(m, types))


def shard_fsdp(model: FamilyNetwork, bf16: bool, methods: tuple[str, ...] = ("loss", "preview")) -> None:
    """FSDP2: shard each block, then the root; entry points other than forward unshard too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for name in methods:
        register_fsdp_forward_method(model, name)
