"""Read and validate a safetensors header without touching the tensor data.

A safetensors file is ``[8-byte little-endian header length N][N bytes of JSON][data]``. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the start
of the data section) plus an optional ``"__metadata__"`` of strings. The tensors must tile the data
section exactly: no gaps, no overlaps, nothing left over. We check all of that from the header and the
file size alone, so a truncated or corrupt file is reported by name before any work starts, instead of
failing (or crashing inside a memory map) halfway through a merge.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from weightkit.errors import WeightkitError

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "read_safetensors_header"]

# safetensors refuses headers larger than this; a bigger length field means a corrupt file, and checking
# it first stops us from trying to allocate gigabytes for a garbage length.
MAX_HEADER_BYTES = 100_000_000
# safetensors' reader counts elements and bits in unsigned 64-bit integers and refuses a file where they
# overflow, even for a tensor with a zero dimension: so must we, or a header we pass fails when opened.
_USIZE_LIMIT = 2**64

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
# Newer dtypes exist only in recent torch builds.
for _code, _attr in [
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
]:
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
        name: tensor name as stored in the header.
        dtype: torch dtype of the elements.
        shape: tensor shape.
        start: absolute byte offset of the first data byte in the file.
        end: absolute byte offset one past the last data byte.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _corrupt(path: Path, why: str) -> WeightkitError:
    return WeightkitError(f"{path} is corrupt or truncated: {why}")


def _fits_usize(shape: list[int], itemsize: int) -> bool:
    """Whether safetensors can hold each dimension of ``shape`` and count the elements (dimension by
    dimension, in order) and bits of such a tensor without overflowing 64 bits."""
    count = 1
    for dim in shape:
        count *= dim
        if dim >= _USIZE_LIMIT or count >= _USIZE_LIMIT:
            return False
    return count * itemsize * 8 < _USIZE_LIMIT


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"header entry for tensor {name} is not an object")
    dtype_code = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype_code, str) or dtype_code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _corrupt(path, f"tensor {name} has unsupported dtype {dtype_code!r} (known: {known})")
    dtype = SAFETENSORS_DTYPES[dtype_code]
    # bool is a subclass of int in Python; a JSON true/false is not a dimension.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] < _USIZE_LIMIT
    ):
        raise _corrupt(path, f"tensor {name} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            path,
            f"tensor {name} ({dtype_code} {shape}) needs {expected} bytes but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}",
        )
    # In practice an empty tensor (a zero after huge dimensions): no other tensor this large is in the file.
    if not _fits_usize(shape, dtype.itemsize):
        raise _corrupt(path, f"tensor {name} has a shape {shape} whose size overflows 64 bits")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class _DuplicateKey(ValueError):
    """A JSON object of the header holds one key twice (its message is the key)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict, refusing a repeated key: JSON parsers keep the last of two equal keys, so a
    header naming a tensor twice would otherwise silently lose one of them."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"tensor {key}" if isinstance(value, dict) else repr(key))
        seen[key] = value
    return seen


def _no_float_constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _int(text: str) -> int | float:
    # safetensors' reader takes -0 for a float (so not a dimension or offset); Python's json, for the int 0.
    return -0.0 if text == "-0" else int(text)


def _parse_json(raw: bytes) -> object:
    """The header's JSON, as safetensors' own reader (Rust's serde_json) would read it: Python's json also
    accepts NaN and Infinity, numbers beyond the float range and lone UTF-16 surrogates (``"\\ud800"``, no
    UTF-8 text), which would make a header we pass fail when safetensors opens the file. Raises ValueError
    (incl. UnicodeError) for those and for what is not JSON at all, _DuplicateKey for a repeated key."""
    header = json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_unique_keys,
        parse_constant=_no_float_constant,
        parse_float=_finite_float,
        parse_int=_int,
    )
    json.dumps(header, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError on a lone surrogate
    return header


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file, reading only the header bytes.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: tensors by name in the order their data is stored in the file, and the
        header's ``__metadata__`` (empty if absent).

    Raises:
        WeightkitError: naming the file, if the header length is out of range, the header is not valid
            JSON, a tensor's dtype/shape/offsets are invalid or inconsistent, tensors overlap or leave
            gaps, or the file is shorter (truncated) or longer than the header says.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len == 0 or header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise _corrupt(
                    path, f"the header length field says {header_len} bytes but the file has {size} bytes"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise WeightkitError(f"cannot read {path}: {e.strerror or e}") from e

    try:
        header = _parse_json(raw)
    except _DuplicateKey as e:
        raise _corrupt(path, f"the header names {e} twice") from None
    except ValueError as e:  # not UTF-8, not JSON (as safetensors reads it), or an int of over 4300 digits
        raise _corrupt(path, f"the header is not valid JSON ({e})") from e
    except RecursionError:  # brackets nested thousands deep: no safetensors header looks like that
        raise _corrupt(path, "the header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    infos = [_parse_entry(path, name, entry, data_start) for name, entry in header.items()]

    # Check truncation first: it is the common failure (an interrupted download or copy) and deserves
    # the plainest message.
    for info in infos:
        if info.end > size:
            raise _corrupt(
                path,
                f"tensor {info.name} ends at byte {info.end} but the file has only {size} bytes "
                f"(the file is truncated)",
            )
    # Stable sort keeps header order among zero-sized tensors that share an offset.
    infos.sort(key=lambda i: (i.start, i.end))
    cursor = data_start
    for info in infos:
        if info.start < cursor:
            raise _corrupt(path, f"tensor {info.name} overlaps the tensor stored before it")
        if info.start > cursor:
            raise _corrupt(path, f"there are {info.start - cursor} unused bytes before tensor {info.name}")
        cursor = info.end
    if cursor != size:
        raise _corrupt(path, f"{size - cursor} bytes after the last tensor are not described by the header")
    return {info.name: info for info in infos}, dict(metadata)
