"""The Fisher file: one ``.safetensors`` per model, written by ``weightkit fisher``, read by Fisher merging.

:func:`save_fisher` writes the Fisher under the model's tensor names *as stored in its checkpoint* (so
the Fisher of tensor ``X`` is read under ``X``), with the metadata ``{"weightkit": "fisher", "examples":
N, ...}``; a tied ``lm_head`` the checkpoint does not store gets no entry either. The format is
weightkit's (the paper's reference code keeps Fishers in memory).
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from weightkit.checkpoint.writer import atomic_file
from weightkit.errors import WeightkitError, require_finite

__all__ = ["save_fisher", "load_fisher"]


def save_fisher(
    fisher: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Fisher to one ``.safetensors`` file, atomically.

    The file is written beside ``path`` under a temporary name and renamed into place when complete, so
    a crash never leaves a truncated Fisher at ``path``. Tensor names are written as given: pass the
    names of the checkpoint the Fisher belongs to (:func:`fisher_checkpoint` does).

    Args:
        fisher: ``{tensor name: Fisher}``; floating-point, finite, >= 0.
        path: the file to write; must end in ``.safetensors``.
        metadata: extra safetensors metadata (values are stored as strings), e.g. ``{"examples": 128}``;
            ``"format": "pt"`` and ``"weightkit": "fisher"`` are always set.
        overwrite: replace an existing file.

    Returns:
        ``path``.

    Raises:
        WeightkitError: an empty Fisher, a non-float, negative or non-finite tensor (named), a bad
            extension, or an existing file without ``overwrite``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightkitError(f"{path}: a Fisher file must end in .safetensors")
    if not fisher:
        raise WeightkitError("refusing to write an empty Fisher (no tensors)")
    if path.exists() and not overwrite:
        raise WeightkitError(f"{path} exists; pass --force (overwrite=True) to overwrite it")
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in fisher.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise WeightkitError(f"Fisher of {name} is not a floating-point tensor")
        require_finite(tensor, f"Fisher of {name}")
        if tensor.numel() and float(tensor.min()) < 0:
            raise WeightkitError(f"Fisher of {name} has negative entries; a Fisher is >= 0")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (a tied weight's Fisher under two names).
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": "pt", "weightkit": "fisher"})

    with atomic_file(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load_fisher(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a file written by :func:`save_fisher`.

    For merging large models, read it lazily instead: ``CheckpointReader(path).get(name)``.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        WeightkitError: the file is missing, corrupt, or not a weightkit Fisher file.
    """
    from weightkit.checkpoint import CheckpointReader

    with CheckpointReader(path) as reader:
        if reader.metadata.get("weightkit") != "fisher":
            raise WeightkitError(f"{path} is not a weightkit Fisher file (no 'weightkit: fisher' metadata)")
        return {name: reader.get(name) for name in reader.names()}, dict(reader.metadata)
