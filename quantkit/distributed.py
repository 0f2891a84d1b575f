"""torch.distributed glue for passes that train (DB-LLM distillation) under ``torchrun``.

``quantkit compress`` started by ``torchrun --nproc_per_node N`` joins the process group
from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR/PORT): every rank loads
the model and trains on its slice of each batch with gradients averaged by
DistributedDataParallel; rank 0 alone writes the output. Python callers that already
initialised a process group get the same behaviour from ``quantkit.compress``.
"""

from __future__ import annotations

import os

import torch


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1), once:
    NCCL when CUDA is available, else gloo. Returns whether this process is distributed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if data_parallel()[1] > 1:
        dist.barrier()


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of the scalar ``t`` over all ranks (``t`` itself without a process group)."""
    import torch.distributed as dist

    world = data_parallel()[1]
    if world == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world
