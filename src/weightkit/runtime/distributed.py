"""torch.distributed set-up for runs launched by ``torchrun``, and the agreements every process must reach.

``torchrun --nproc-per-node N`` starts N processes with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set.
Each computes on its own device (``cuda:LOCAL_RANK`` on GPUs, see
:func:`weightkit.runtime.device.resolve_device`) and the process group's backend follows that device: NCCL
for CUDA tensors, gloo for the CPU (NCCL cannot reduce CPU tensors, so a CPU model must never be wrapped in
DDP over NCCL).

A decision that stops a run (a NaN loss) must be taken by every process at once: a process that stops
alone leaves the others waiting forever in their next collective. :func:`gather_scalars` shares each
process's value so all of them decide on the same numbers.
"""

import os

import torch

from weightkit.errors import WeightkitError
from weightkit.runtime.device import local_rank

__all__ = [
    "launched_processes",
    "init_distributed",
    "rank_and_world",
    "is_main_process",
    "barrier",
    "gather_scalars",
]


def launched_processes() -> int:
    """How many processes torchrun started for this run (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group of a ``torchrun`` launch (once) and return ``(rank, world size)``.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is started and the answer is ``(0, 1)``.

    Args:
        device: where this process computes: a CUDA device makes the backend NCCL (and this process's
            current CUDA device), anything else gloo.

    Raises:
        WeightkitError: a CUDA device other than this process's own ``cuda:LOCAL_RANK`` (every process
            would share one GPU, which NCCL refuses).
    """
    world = launched_processes()
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        own = local_rank() or 0
        if device.index != own:
            raise WeightkitError(
                f"--device {device}: under torchrun each process uses its own GPU (this one cuda:{own}); "
                "pass --device cuda"
            )
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running process group, ``(0, 1)`` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0, the one that writes files and reports."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for without one)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def gather_scalars(value: torch.Tensor) -> list[float]:
    """Every process's scalar ``value``, by rank; all processes get the same list.

    One all-reduce of a ``world``-long vector holding each process's value at its rank (each entry sums
    one value and zeros, so a NaN or Inf stays at the rank it came from). Call it from every process at the
    same point, as any collective.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [value.item()]
    values = torch.zeros(world, dtype=torch.float32, device=value.device)
    values[rank] = value.detach().float()
    torch.distributed.all_reduce(values)
    return values.tolist()
