"""Distributed plumbing: one code path for `python script.py` and `torchrun --nproc_per_node=N script.py`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are a world of one and nothing here talks
to a process group. With them: NCCL on CUDA (one GPU per process), gloo on CPU, and FSDP2's
`fully_shard` on every transformer block and then on the root, so each rank holds 1/N of the weights,
gradients and optimizer state, and parameters are gathered one block at a time during forward/backward.
`torchrun --nproc_per_node=1` takes that same path with one rank (a process group, FSDP2 over a mesh of
one): the same result (to 1e-4 in the fp32 tests), and it is how a machine with one GPU runs NCCL and FSDP2.

Gotchas:
- FSDP averages gradients over ranks. Our losses are already divided by the token count of the whole
  global step, so the trainer multiplies the loss by world_size to undo that average.
- A full state dict (to save an HF checkpoint) must be gathered collectively: every rank calls
  full_state(), only rank 0 receives the tensors (on CPU). Loading goes the other way: rank 0 alone reads
  the checkpoint and broadcasts it into the other ranks' shards (load_full_model_state), so a node holds
  one full copy of a large model in CPU memory, not one per rank.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun: a process group joined, models sharded (any world size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.launched


def launch() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process (it sets all three variables), else None:
    one of them alone (a job scheduler's WORLD_SIZE) does not make a run distributed. Read without joining a
    process group, so that flags can be checked against the world size before any work."""
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(os.environ):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def init_dist(device: str = "cpu") -> Dist:
    """Join the torchrun process group if there is one (one rank too); pick this rank's device."""
    if (launched := launch()) is None:  # not started by torchrun
        return Dist(device=torch.device(device))
    rank, world, local = launched
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    if rank == 0:
        print(f"torchrun: {world} rank{'s' * (world > 1)}, {dist.get_backend()} process group, models sharded by "
              f"FSDP2, rank 0 on {dev}", flush=True)
    return Dist(rank, world, local, dev, launched=True)


def close(d: Dist):
    """Leave the process group, every rank together: a rank tearing its gloo connections down while another still
    uses them can abort the other ("terminate called without an active exception"), so all ranks meet first."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(d: Dist | None, *args, **kwargs):
    """print on rank 0 only; d=None for code that holds no Dist (the data readers): torchrun's RANK decides."""
    if (d.is_main if d is not None else (launch() or (0,))[0] == 0):
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, d: Dist | None = None):
    """Same seed on every rank for initialisation (identical starting weights); add the rank where streams
    must differ (e.g. sampling)."""
    seed = seed + (d.rank if d is not None else 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shard(model: torch.nn.Module, d: Dist):
    """FSDP2: shard each transformer block (wherever it sits: a causal LM, or the trunk of a reward model),
    then the root (embeddings, final norm, heads)."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    from .model import Block

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_object(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without torchrun)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def full_state(model: torch.nn.Module, optimizer=None):
    """(model_state, optimizer_state) as full CPU tensors keyed by parameter name; empty dicts on ranks > 0
    when sharded. Works the same for a plain module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def load_full_model_state(model: torch.nn.Module, state: dict, d: Dist):
    """Inverse of full_state for the weights. Sharded: rank 0 passes the full dict, the other ranks an empty
    one; each tensor is broadcast from rank 0 and cut into shards, so only rank 0 holds a full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled))


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict, d: Dist):
    """The same for the optimizer state (keyed by parameter name, as full_state returns it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled))
