"""Lazy, one-tensor-at-a-time reading of Hugging Face checkpoints (single file, sharded, or directory).

Opening a checkpoint reads only headers and index JSON, so names, shapes, dtypes and sizes are known
at once and a corrupt file is reported before any work starts; tensor data is read by :meth:`get`,
one tensor per call, which is what lets merge/quantize/inspect stream a model bigger than memory.
"""

import difflib
import math
import mmap
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from weightkit.checkpoint.files import WeightLayout, locate_weights, read_json_object
from weightkit.checkpoint.header import read_safetensors_header
from weightkit.errors import WeightkitError, require_finite

__all__ = ["CheckpointReader"]


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    start: int = 0  # safetensors: absolute offset of the first data byte in the file


def _open_safetensors(path: Path) -> tuple[Any, bool]:
    # Only on a big-endian machine (the library swaps the bytes). Either backend maps the whole file when
    # it opens it (pread: for the time of the call; mmap: for good), which costs address space the size of
    # the file (a ulimit -v / RLIMIT_AS cap counts it), hence get()'s own pread elsewhere.
    # The pread backend (safetensors >= 0.8) returns a tensor that owns its memory. The default mmap
    # backend returns a view of the mapping, so an in-place edit by the caller (w.mul_(s)) would change
    # what the next get() of that name returns.
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread"), False
    except TypeError:
        return safe_open(path, framework="pt", device="cpu"), True


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Files written with the legacy (pre-zipfile) torch.save format cannot be memory-mapped.
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightkitError(
            f"cannot load {path} with torch.load(weights_only=True): {first_line}. Only plain state dicts "
            f"of tensors are accepted from pickle files"
        ) from e
    if not isinstance(obj, dict):
        raise WeightkitError(f"{path} holds a {type(obj).__name__}, not a state dict (tensor name -> tensor)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightkitError(
                f"{path} is not a plain state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return obj


class CheckpointReader:
    """Read the tensors of a checkpoint lazily, by name.

    Accepts a Hugging Face model directory or a single ``.safetensors`` file. In a directory the weights
    are taken from ``model.safetensors.index.json`` (sharded), else ``model.safetensors``, else the other
    ``*.safetensors`` files. Pickle checkpoints (``pytorch_model.bin``, ``*.bin``, ``*.pt``, ``*.pth``)
    can run arbitrary code when unpickled and are refused unless ``allow_pickle=True``; even then they
    are loaded with ``torch.load(weights_only=True)``, which only accepts tensors and plain containers.

    Every safetensors file is validated from its header and size when the reader is created, so a
    corrupt or truncated file fails here, with its name, not halfway through a job.

    Example::

        with CheckpointReader("path/to/model") as ckpt:
            for name in ckpt.names():
                w = ckpt.get(name)   # one tensor in memory at a time

    Attributes:
        directory: the model directory, or None when a bare file was given.
        config: the parsed ``config.json`` of the directory, or None.
        metadata: the ``__metadata__`` of the first safetensors file (e.g. ``{"format": "pt"}``).
    """

    def __init__(self, path: str | Path, *, allow_pickle: bool = False):
        self.path = Path(path)
        layout = locate_weights(self.path)
        self.directory: Path | None = layout.directory
        self.config: dict | None = self._read_config()
        self.metadata: dict[str, str] = {}
        self._layout = layout
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[Path, Any] = {}
        self._handle_is_view: dict[Path, bool] = {}
        self._fds: dict[Path, int] = {}  # the weight files, open for reading
        self._pickled: dict[str, torch.Tensor] = {}
        if layout.kind == "pickle":
            if not allow_pickle:
                refused = layout.index or layout.files[0]
                raise WeightkitError(
                    f"{refused} is a pickle checkpoint; unpickling can run arbitrary code, so it is "
                    f"not loaded by default. If you trust the file, pass --allow-pickle "
                    f"(API: allow_pickle=True), or convert it to safetensors"
                )
            self._index_pickles(layout)
        else:
            self._index_safetensors(layout)

    # -- opening ---------------------------------------------------------------------------------------

    def _read_config(self) -> dict | None:
        if self.directory is None or not (self.directory / "config.json").is_file():
            return None
        return read_json_object(self.directory / "config.json")

    def _add(self, name: str, entry: _Entry) -> None:
        if name in self._entries:
            raise WeightkitError(f"tensor {name} is in both {self._entries[name].file} and {entry.file}")
        self._entries[name] = entry

    def _index_safetensors(self, layout: WeightLayout) -> None:
        headers = {}
        for file in layout.files:
            tensors, metadata = read_safetensors_header(file)
            headers[file] = tensors
            if not self.metadata:
                self.metadata = metadata
        if layout.weight_map is None:
            for file in layout.files:
                for name, info in headers[file].items():
                    self._add(name, _Entry(file, info.dtype, info.shape, info.nbytes, info.start))
            return
        for name, file in layout.weight_map.items():
            info = headers[file].get(name)
            if info is None:
                raise WeightkitError(f"{layout.index} maps tensor {name} to {file}, which has no such tensor")
            self._add(name, _Entry(file, info.dtype, info.shape, info.nbytes, info.start))

    def _index_pickles(self, layout: WeightLayout) -> None:
        # mmap=True: the state dict's storages are file-backed, so "loading" costs address space, not RAM.
        loaded = {file: _load_pickle(file) for file in layout.files}
        if layout.weight_map is None:
            pairs = [(name, file) for file in layout.files for name in loaded[file]]
        else:
            pairs = list(layout.weight_map.items())
        for name, file in pairs:
            tensor = loaded[file].get(name)
            if tensor is None:
                raise WeightkitError(f"{layout.index} maps tensor {name} to {file}, which has no such tensor")
            nbytes = tensor.numel() * tensor.element_size()
            self._add(name, _Entry(file, tensor.dtype, tuple(tensor.shape), nbytes))
            self._pickled[name] = tensor

    # -- queries ---------------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise WeightkitError(f"tensor {name} is not in {self.path}.{hint}") from None

    def names(self) -> list[str]:
        """Tensor names: index order for a sharded checkpoint, else storage order within each file."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, from the header (no data is read)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of tensor ``name``, from the header (no data is read)."""
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        """The weight file that holds tensor ``name``."""
        return self._entry(name).file

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` from disk into a new CPU tensor that the caller owns.

        Raises:
            WeightkitError: if there is no such tensor (with a "did you mean" hint).
        """
        entry = self._entry(name)
        if name in self._pickled:
            # The loaded tensor is memory-mapped and possibly shares storage with a tied weight; a copy
            # keeps callers' in-place edits from leaking into later reads.
            return self._pickled[name].clone()
        if self._handles is None:
            raise RuntimeError("CheckpointReader is closed")
        if sys.byteorder != "little":  # safetensors stores little-endian values: its library swaps them
            handle = self._handles.get(entry.file)
            if handle is None:
                handle, is_view = _open_safetensors(entry.file)
                self._handles[entry.file] = handle
                self._handle_is_view[entry.file] = is_view
            tensor = handle.get_tensor(name)
            return tensor.clone() if self._handle_is_view[entry.file] else tensor
        # The tensor's bytes alone, read into memory the caller owns: nothing of the file is mapped, so a
        # process's address space grows by the tensor, not by the file (the header was checked on opening).
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < entry.nbytes:
            read = os.preadv(self._fd(entry.file), [data[done:]], entry.start + done)
            if read == 0:
                raise WeightkitError(f"{entry.file} ends inside tensor {name}: was it truncated meanwhile?")
            done += read
        return tensor

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor ``name`` into ``out``, converted to ``out``'s dtype (and device), allocating nothing.

        For streamed work that reuses its buffers (the merge engine reads each model's tensor into a
        float32 work buffer it keeps): the tensor's bytes are memory-mapped for the copy alone and
        converted on the way, so there is no intermediate copy in the file's dtype, no page faults on
        fresh memory, and nothing of the file stays mapped afterwards.

        Args:
            name: the tensor to read.
            out: a contiguous tensor with as many elements as ``name`` (any shape, dtype or device).

        Returns:
            ``out`` viewed with the tensor's shape.

        Raises:
            WeightkitError: no such tensor, or ``out`` has another number of elements.
        """
        entry = self._entry(name)
        numel = math.prod(entry.shape)
        if out.numel() != numel or not out.is_contiguous():
            raise WeightkitError(
                f"read_into: tensor {name} has {numel} elements, the buffer {out.numel()}"
                + ("" if out.is_contiguous() else " and is not contiguous")
            )
        out = out.view(entry.shape)
        itemsize = entry.dtype.itemsize
        # Pickled tensors, an empty tensor, a misaligned offset or a big-endian machine (safetensors is
        # little-endian): the ordinary read.
        if name in self._pickled or numel == 0 or entry.start % itemsize or sys.byteorder != "little":
            return out.copy_(self.get(name)) if numel else out
        if self._handles is None:
            raise RuntimeError("CheckpointReader is closed")
        fd = self._fd(entry.file)
        first_page = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
        # ACCESS_COPY: a private mapping is writable (torch.frombuffer warns on read-only buffers) and
        # copies a page only if it is written, which nothing here does.
        with mmap.mmap(
            fd, entry.start + entry.nbytes - first_page, access=mmap.ACCESS_COPY, offset=first_page
        ) as m:
            view = torch.frombuffer(m, dtype=entry.dtype, count=numel, offset=entry.start - first_page)
            out.copy_(view.view(entry.shape))
            del view  # the mapping can only close once no tensor points into it
        return out

    def _fd(self, file: Path) -> int:
        """A file descriptor of ``file``, opened once for the reader's lifetime."""
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def get_finite(self, name: str) -> torch.Tensor:
        """:meth:`get`, refusing a tensor that holds NaN or Inf (the message names it and this checkpoint)."""
        tensor = self.get(name)
        require_finite(tensor, f"{name} of {self.path}")
        return tensor

    def nbytes(self) -> int:
        """Total bytes of tensor data (headers excluded)."""
        return sum(e.nbytes for e in self._entries.values())

    def weight_files(self) -> list[Path]:
        """The files the tensors are read from (shards in order, or the single file)."""
        return list(self._layout.files)

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release open file handles and memory maps; the reader cannot be used afterwards."""
        for handle in (self._handles or {}).values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles = None  # type: ignore[assignment]
        self._pickled.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors, {len(self._layout.files)} files)"
