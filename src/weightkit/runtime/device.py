"""Where computation runs: the ``device`` every computing verb takes (``--device`` on the command line).

The default is the GPU when there is one: ``cuda`` (``cuda:LOCAL_RANK`` under ``torchrun``, so each
process of a multi-GPU run takes its own GPU), else the CPU. An explicit device that this machine does
not have is refused with a message saying what it has, instead of failing deep inside PyTorch.
"""

import os

import torch

from weightkit.errors import WeightkitError

__all__ = ["resolve_device", "local_rank"]


def local_rank() -> int | None:
    """This process's ``LOCAL_RANK`` under ``torchrun`` (its index on this machine), else ``None``."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def _available() -> str:
    if torch.cuda.is_available():
        return f"cpu and cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return "cpu only (torch.cuda.is_available() is False)"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` to compute on.

    Args:
        device: ``None`` for the default (``cuda`` when available, else ``cpu``), or any torch device
            string (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"``, ``"meta"``). A bare ``"cuda"`` under
            ``torchrun`` means this process's GPU, ``cuda:LOCAL_RANK``.

    Raises:
        WeightkitError: an unparsable device, or one this machine does not have.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightkitError(f"--device {device!r} is not a device; try cuda, cuda:1 or cpu") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightkitError(f"--device {device}: this machine has no CUDA GPU; it has {_available()}")
        index = resolved.index if resolved.index is not None else local_rank() or 0
        if index >= torch.cuda.device_count():
            raise WeightkitError(
                f"--device {device}: there is no cuda:{index}; this machine has {_available()}"
            )
        resolved = torch.device("cuda", index)
    elif resolved.type in ("mps", "xpu"):
        backend = torch.backends.mps if resolved.type == "mps" else torch.xpu
        if not backend.is_available():
            raise WeightkitError(f"--device {device}: not available here; this machine has {_available()}")
    elif resolved.type not in ("cpu", "meta"):
        raise WeightkitError(
            f"--device {device}: weightkit runs on cpu, cuda, mps or xpu (meta: shapes only)"
        )
    return resolved
