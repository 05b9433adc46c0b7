"""Which files of a Hugging Face model directory hold the weights.

Only file names and index JSON are read here; tensor headers are the reader's business. The order of
preference follows ``transformers``: a safetensors index, then ``model.safetensors``, then any other
safetensors files, and only then the pickle formats (``pytorch_model.bin`` and friends).
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from weightkit.errors import WeightkitError

__all__ = [
    "PICKLE_SUFFIXES",
    "PEFT_ADAPTER_WEIGHTS",
    "PEFT_KEY_PREFIX",
    "WeightLayout",
    "is_weight_file",
    "locate_weights",
    "read_adapter_config",
    "read_index",
    "read_json_object",
    "weights_size",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# A PEFT adapter directory's tensors, keyed under this prefix (``base_model.model.<module>.lora_A.weight``).
PEFT_ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

# Files a model directory may hold that describe or contain weights in some format. Copying them next to
# rewritten weights would leave stale, contradictory copies (an ONNX export of the unquantized model).
WEIGHT_SUFFIXES = (
    ".safetensors",
    *PICKLE_SUFFIXES,
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".tflite",
)
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")

# Trainer checkpoints keep optimizer state and RNG state as pickles beside the model; they are not weights.
_TRAINER_PICKLES = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt"}


def is_weight_file(name: str) -> bool:
    """True for weight files and weight indexes (by file name)."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEX_SUFFIXES)


def _is_model_pickle(path: Path) -> bool:
    name = path.name
    return (
        path.is_file()
        and name.endswith(PICKLE_SUFFIXES)
        and name not in _TRAINER_PICKLES
        and not name.startswith("rng_state")
    )


@dataclass(frozen=True)
class WeightLayout:
    """The weight files of a checkpoint.

    Attributes:
        kind: ``"safetensors"`` or ``"pickle"``.
        files: the weight files, in reading order.
        directory: the model directory, or None when a bare file was given.
        index: the index JSON for a sharded checkpoint, else None.
        weight_map: tensor name -> file, from the index (None without an index).
    """

    kind: Literal["safetensors", "pickle"]
    files: list[Path]
    directory: Path | None
    index: Path | None = None
    weight_map: dict[str, Path] | None = None


def tree_files(root: Path, *, skip_hidden: bool, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every regular file under ``root`` (symlinks followed), as sorted relative POSIX paths; with
    ``skip_hidden`` every name starting with a dot is left out, and so is each directory of ``skip``
    (absolute paths) with everything under it. An input's files for its manifest and for a resumable run's
    fingerprint."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [
            d
            for d in dirs
            if not (skip_hidden and d.startswith("."))
            and Path(os.path.abspath(os.path.join(directory, d))) not in skip
        ]
        for file in files:
            path = Path(directory, file)
            if not (skip_hidden and file.startswith(".")) and path.is_file():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a config or index file from a model or adapter directory).

    Raises:
        WeightkitError: naming the file, if it cannot be read, is not UTF-8 JSON (also: an integer of over
            4300 digits, nesting thousands deep) or holds something other than an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: also UnicodeDecodeError, JSONDecodeError
        raise WeightkitError(f"{path} is corrupt: cannot parse it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightkitError(f"{path} is corrupt: it is not a JSON object")
    return data


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_patterns(check):
    return lambda value: isinstance(value, dict) and all(check(v) for v in value.values())


# What the adapter_config.json fields weightkit reads (PEFT's LoraConfig, most shared by its other methods)
# may hold. Null is always allowed (PEFT writes it for "unset") except for the three that define an adapter.
_ADAPTER_FIELDS = {
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "r": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "lora_alpha": ("a finite number", _is_number),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "rank_pattern": ("a mapping of patterns to integers >= 1", _is_patterns(lambda v: _is_int(v) and v >= 1)),
    "alpha_pattern": ("a mapping of patterns to finite numbers", _is_patterns(_is_number)),
    "target_modules": ("a list of names or a pattern", lambda v: isinstance(v, str) or _is_strings(v)),
    "exclude_modules": ("a list of names or a pattern", lambda v: isinstance(v, str) or _is_strings(v)),
    "modules_to_save": ("a list of names", _is_strings),
    "init_lora_weights": ("true, false or a name", lambda v: isinstance(v, bool | str)),
    "bias": ("a string", lambda v: isinstance(v, str)),
    **{flag: ("true or false", lambda v: isinstance(v, bool)) for flag in (
        "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "inference_mode"
    )},
}  # fmt: skip
_REQUIRED_FOR_LORA = ("peft_type", "r", "lora_alpha")


def _check_pattern(pattern: str, where: str) -> None:
    try:
        re.compile(pattern.removeprefix("re:"))
    except re.error as e:
        raise WeightkitError(f"{where}: {pattern!r} is not a regular expression ({e})") from None


def read_adapter_config(directory: Path) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter directory, its fields' types checked.

    Every field weightkit reads is checked here, once for all readers of adapters, so a wrong value is
    refused by name instead of crashing a reader or being coerced into something else (``"r": 2.5`` read as
    rank 2). Which values a reader supports (a ``peft_type``, an ``init_lora_weights``) is the reader's to
    say.

    Raises:
        WeightkitError: naming the file and field: no such file, not a JSON object, a field of the wrong
            type or range, a pattern that is no regular expression, or a LoRA adapter without ``r`` or
            ``lora_alpha``.
    """
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise WeightkitError(f"{directory} has no adapter_config.json; it is not a PEFT adapter")
    config = read_json_object(path)
    if config.get("peft_type") == "LORA":
        missing = [key for key in _REQUIRED_FOR_LORA if config.get(key) is None]
        if missing:
            raise WeightkitError(f"{path}: a LoRA adapter needs {', '.join(missing)}")
    for key, (expected, check) in _ADAPTER_FIELDS.items():
        value = config.get(key)
        if value is not None and not check(value):
            raise WeightkitError(f"{path}: {key} = {value!r}: expected {expected}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            _check_pattern(pattern, f"{path}: {key}")
    if isinstance(config.get("exclude_modules"), str):
        _check_pattern(config["exclude_modules"], f"{path}: exclude_modules")
    if isinstance(config.get("target_modules"), str):
        _check_pattern(config["target_modules"], f"{path}: target_modules")
    return config


def read_index(index: Path) -> dict[str, Path]:
    """Parse a sharded-checkpoint index: tensor name -> shard path (in index order).

    Raises:
        WeightkitError: if the index is not valid JSON, has no ``weight_map``, names a shard outside its
            directory, or names a shard that does not exist (naming the index and the shard).
    """
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightkitError(f"{index} is corrupt: it has no weight_map of tensor name -> shard file")
    shards: dict[str, Path] = {}
    result: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            rel = PurePosixPath(shard)
            # An index is data from the internet: never let it point the reader outside the model dir.
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise WeightkitError(f"{index} names shard {shard!r}, which is outside its directory")
            path = index.parent / rel
            if not path.is_file():
                raise WeightkitError(f"{index} names shard {shard}, which does not exist ({path} is missing)")
            shards[shard] = path
        result[name] = shards[shard]
    return result


def _from_index(index: Path, directory: Path | None) -> WeightLayout:
    weight_map = read_index(index)
    files = sorted(set(weight_map.values()))
    kind = "safetensors" if all(f.name.endswith(".safetensors") for f in files) else "pickle"
    return WeightLayout(kind, files, directory, index, weight_map)


def locate_weights(path: str | Path) -> WeightLayout:
    """Find the weight files of a model directory or a single checkpoint file.

    Args:
        path: a Hugging Face model directory, a ``.safetensors``/``.bin``/``.pt``/``.pth`` file, or a
            ``*.index.json`` of a sharded checkpoint.

    Returns:
        The layout; pickle files are listed, not loaded (refusing them is up to the caller).

    Raises:
        WeightkitError: if the path does not exist, is not a checkpoint file, or is a directory with no
            weights (listing what was looked for), or if an index is broken.
    """
    path = Path(path)
    if not path.exists():
        raise WeightkitError(f"{path} does not exist")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path, None)
        if path.suffix == ".safetensors":
            return WeightLayout("safetensors", [path], None)
        if path.suffix in PICKLE_SUFFIXES:
            return WeightLayout("pickle", [path], None)
        raise WeightkitError(
            f"{path} is not a checkpoint file: expected .safetensors, .bin, .pt, .pth or a *.index.json"
        )
    if not path.is_dir():  # a device (/dev/null), a socket or a pipe
        raise WeightkitError(f"{path} is neither a checkpoint file nor a model directory")

    if (path / SAFETENSORS_INDEX).is_file():
        return _from_index(path / SAFETENSORS_INDEX, path)
    if (path / SAFETENSORS_SINGLE).is_file():
        return WeightLayout("safetensors", [path / SAFETENSORS_SINGLE], path)
    other_indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(other_indexes) == 1:
        return _from_index(other_indexes[0], path)
    safetensors = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if safetensors:
        return WeightLayout("safetensors", safetensors, path)

    if (path / PICKLE_INDEX).is_file():
        return _from_index(path / PICKLE_INDEX, path)
    if (path / PICKLE_SINGLE).is_file():
        return WeightLayout("pickle", [path / PICKLE_SINGLE], path)
    pickles = sorted(p for p in path.iterdir() if _is_model_pickle(p))
    if pickles:
        return WeightLayout("pickle", pickles, path)

    raise WeightkitError(
        f"{path} is not a model directory: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {PICKLE_SINGLE} "
        f"(nor any other *.safetensors, *.bin, *.pt or *.pth file)"
    )


def weights_size(path: str | Path) -> int:
    """Bytes on disk of the weight files of a model directory or checkpoint file.

    Counts the files a :class:`~weightkit.checkpoint.CheckpointReader` would read (headers included), so
    a directory holding both ``model.safetensors`` and ``pytorch_model.bin`` is not counted twice.

    Args:
        path: a model directory or a single checkpoint file.

    Returns:
        The total size in bytes.

    Raises:
        WeightkitError: if the path holds no weights.
    """
    return sum(f.stat().st_size for f in locate_weights(path).files)
