"""compressed-tensors' "pack-quantized" checkpoint format: the tensors and the ``quantization_config``.

The directory is an ordinary Hugging Face model directory that ``transformers`` (through its
compressed-tensors integration) and vLLM load unchanged. For every quantized linear layer ``NAME``
the checkpoint holds, instead of ``NAME.weight``:

- ``NAME.weight_packed``: ``int32 [out, ceil(in * bits / 32)]``, the grid values densely bit-packed
  row by row (:func:`weightkit.quantized.pack.pack_int32`);
- ``NAME.weight_scale``: ``[out, groups]`` in the model's float dtype (per-channel: ``[out, 1]``);
- ``NAME.weight_shape``: ``int64 [2]``, the unpacked ``[out, in]``;
- ``NAME.weight_zero_point`` (asymmetric grids only): ``int32 [ceil(out * bits / 32), groups]``, the
  integer zero points packed along the *output* dimension, as compressed-tensors stores them;
- ``NAME.bias`` when the layer has one.

Floating-point grids (:mod:`weightkit.quantized.float_grid`) use compressed-tensors' float formats:

- FP8 E4M3, format "float-quantized": ``NAME.weight`` in ``float8_e4m3fn`` ``[out, in]`` and
  ``NAME.weight_scale`` ``[out, groups]`` in the model's float dtype (strategy "channel" or "group");
- FP4 E2M1, format "nvfp4-pack-quantized": ``NAME.weight_packed`` ``uint8 [out, in / 2]`` (two E2M1
  codes per byte, the even column in the low nibble; a code is the sign bit over the index of the
  magnitude in 0, 0.5, 1, 1.5, 2, 3, 4, 6), ``NAME.weight_scale`` ``float8_e4m3fn [out, in / 16]`` and
  ``NAME.weight_global_scale`` ``float32 [1]`` (strategy "tensor_group", group size 16).

E5M2 weights have no compressed-tensors format (its float8 storage dtype is E4M3 only): they are refused.

``config.json`` gains a ``quantization_config`` block that says which modules use which scheme; the
schema is the one compressed-tensors' own ``ModelCompressor.update_config`` writes.

Writing: :func:`packed_tensors` and :func:`float_tensors` give one layer's tensors in this layout and
:func:`quantization_config` the block; :mod:`weightkit.quantized.formats` picks them (or weightkit's own
format, :mod:`weightkit.quantized.weightkit_format`, for layers compressed-tensors has no format for) for
a whole model. Reading: :func:`is_quantized_checkpoint`, :func:`config_groups` and :func:`scheme_of`
interpret a stored ``quantization_config`` (the model loader in :mod:`weightkit.models` rebuilds the
layers). :func:`refuse_quantized` is the one error of the verbs that need full-precision weights (merging,
compressing, Fisher ...) on a quantized checkpoint.
"""

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from weightkit.errors import WeightkitError
from weightkit.quantized.float_grid import FloatQuantizedWeight, FloatScheme
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.pack import pack_int32

__all__ = [
    "config_groups",
    "check_exportable",
    "float_scheme_from_weights_args",
    "float_tensors",
    "is_quantized_checkpoint",
    "packed_tensors",
    "quantization_config",
    "quantization_description",
    "refuse_quantized",
    "scheme_from_weights_args",
    "scheme_of",
    "sparsity_config",
    "unpack_e2m1",
]


def check_exportable(scheme: QuantScheme | FloatScheme, where: str) -> None:
    """Refuse a float scheme compressed-tensors has no format for, naming ``where``."""
    if isinstance(scheme, FloatScheme) and scheme.format == "e5m2":
        raise WeightkitError(
            f"{where}: E5M2 weights cannot be saved: compressed-tensors stores FP8 weights as E4M3 only "
            "(its float8 storage dtype is float8_e4m3fn); quantize with fp8 format e4m3 to save"
        )


def _format_of(scheme: QuantScheme | FloatScheme) -> str:
    """The compressed-tensors format name a scheme is stored in."""
    if isinstance(scheme, QuantScheme):
        return "pack-quantized"
    return "nvfp4-pack-quantized" if scheme.format == "e2m1" else "float-quantized"


def _weights_args(scheme: QuantScheme | FloatScheme) -> dict:
    """compressed-tensors ``QuantizationArgs`` of a weightkit scheme, as it appears in config.json."""
    if isinstance(scheme, FloatScheme):
        args = {"num_bits": scheme.bits, "type": "float", "symmetric": True, "group_size": scheme.group_size}
        if scheme.format == "e2m1":  # NVFP4: FP8 group scales times a per-tensor global scale
            return {
                **args,
                "strategy": "tensor_group",
                "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn",
            }
        return {**args, "strategy": "group" if scheme.group_size else "channel", "dynamic": False}
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": scheme.group_size,
        "strategy": "group" if scheme.group_size else "channel",
        "dynamic": False,
        # Our act-order uses static groups (columns stay in place), so no g_idx is stored.
        "actorder": None,
    }


def scheme_from_weights_args(args: dict, where: str) -> QuantScheme:
    """The weightkit scheme of a compressed-tensors ``weights`` block, refusing what weightkit cannot hold.

    Args:
        args: the ``weights`` dict of one config group.
        where: what to name in an error (e.g. ``"config.json quantization_config group_0"``).

    Raises:
        WeightkitError: not a static integer grid with group or channel strategy (e.g. float8, dynamic,
            block or tensor strategy), or activation reordering with ``g_idx``.
    """
    kind = args.get("type", "int")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    if kind != "int" or args.get("dynamic") or strategy not in ("group", "channel"):
        raise WeightkitError(
            f"{where}: weightkit reads static integer weights with strategy 'group' or 'channel', "
            f"got type {kind!r}, strategy {strategy!r}, dynamic {args.get('dynamic')!r}"
        )
    if args.get("actorder") == "group":
        raise WeightkitError(f"{where}: activation ordering 'group' (weights with g_idx) is not supported")
    group_size = args.get("group_size") if strategy == "group" else None
    return QuantScheme(bits=int(args["num_bits"]), group_size=group_size, symmetric=bool(args["symmetric"]))


def float_scheme_from_weights_args(args: dict, where: str) -> FloatScheme:
    """The weightkit float scheme of a compressed-tensors ``weights`` block of type float.

    weightkit holds static symmetric FP8 E4M3 with strategy "channel" or "group" (format
    "float-quantized"), and NVFP4: 4 bits, strategy "tensor_group", group size 16, E4M3 group scales
    (format "nvfp4-pack-quantized").

    Raises:
        WeightkitError: anything else (e.g. per-tensor or block FP8, MXFP4, dynamic or asymmetric), naming
            ``where`` and the fields.
    """
    bits, strategy, group_size = args.get("num_bits"), args.get("strategy"), args.get("group_size")
    static = args.get("type") == "float" and not args.get("dynamic") and args.get("symmetric", True)
    if static and bits == 8 and strategy in ("group", "channel"):
        return FloatScheme("e4m3", group_size if strategy == "group" else None)
    nvfp4 = strategy == "tensor_group" and group_size == 16
    if static and bits == 4 and nvfp4 and args.get("scale_dtype") in (None, "torch.float8_e4m3fn"):
        return FloatScheme("e2m1", 16)
    raise WeightkitError(
        f"{where}: weightkit reads static symmetric float weights as FP8 with strategy 'channel' or "
        f"'group', or NVFP4 (4 bits, strategy 'tensor_group', group size 16); got type {args.get('type')!r}, "
        f"num_bits {bits!r}, strategy {strategy!r}, group_size {group_size!r}, "
        f"dynamic {args.get('dynamic')!r}"
    )


def quantization_config(modules: dict[str, QuantScheme | FloatScheme], ignore: list[str]) -> dict:
    """The ``quantization_config`` block of ``config.json`` for a compressed-tensors checkpoint.

    Modules are grouped by scheme, one config group per distinct scheme (``group_0``, ``group_1`` ...
    in order of first appearance). When every quantized module shares one scheme the group targets the
    class ``"Linear"`` and relies on ``ignore`` to leave the other linear layers alone (the usual
    layout, e.g. ``ignore=["lm_head"]``); with several schemes each group lists its modules by exact name.

    Args:
        modules: quantized module name -> its scheme.
        ignore: names of the linear layers that stay unquantized; with a single scheme this must list
            every such layer, since ``"Linear"`` matches them all.

    The format is "pack-quantized" for integer grids, "float-quantized" for FP8, "nvfp4-pack-quantized"
    for FP4, named at the top and in each group; all modules must share it.

    Returns:
        A JSON-ready dict, as compressed-tensors writes it (``quant_method`` "compressed-tensors",
        ``quantization_status`` "compressed").

    Raises:
        WeightkitError: ``modules`` is empty, a name is both quantized and ignored, a scheme has no
            compressed-tensors format (E5M2), or the schemes need different formats.
    """
    if not modules:
        raise WeightkitError("no quantized modules: nothing to describe in a quantization_config")
    both = sorted(set(modules) & set(ignore))
    if both:
        raise WeightkitError(f"modules both quantized and ignored: {', '.join(both)}")
    by_scheme: dict[QuantScheme | FloatScheme, list[str]] = {}
    for name, scheme in modules.items():
        check_exportable(scheme, name)
        by_scheme.setdefault(scheme, []).append(name)
    single = len(by_scheme) == 1
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else list(names),
            "weights": _weights_args(scheme),
            "input_activations": None,
            "output_activations": None,
            "format": _format_of(scheme),
        }
    formats = sorted({group["format"] for group in groups.values()})
    if len(formats) > 1:
        # transformers 5.25's dequantizing load runs every group through the compressor of one format.
        raise WeightkitError(
            f"the quantized layers use {' and '.join(formats)} grids: one checkpoint holds one "
            "compressed-tensors format (transformers cannot dequantize a mix); quantize every layer with "
            "integer grids or every layer with float grids"
        )
    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:  # the format does not need the package; the field is informational
        ct_version = None
    config = {
        "quant_method": "compressed-tensors",
        "format": formats[0],
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if ct_version is not None:
        config["version"] = ct_version
    return config


def sparsity_config(structure: str, global_sparsity: float, targets: list[str]) -> dict:
    """compressed-tensors' ``sparsity_config`` for pruned layers stored as they are (format ``"dense"``: the
    zeros are in the quantized weights, nothing to decompress), recording the ``structure``
    (``"unstructured"``, ``"2:4"``, ``"4:8"``), the measured ``global_sparsity``, the pruned ``targets``."""
    return {
        "format": "dense",
        "targets": list(targets),
        "ignore": [],
        "global_sparsity": global_sparsity,
        "sparsity_structure": structure,
    }


def packed_tensors(quantized: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One quantized weight (and its layer's bias) in compressed-tensors' pack-quantized layout."""
    bits = quantized.scheme.bits
    rows, cols = quantized.qweight.shape
    out = {
        "weight_packed": pack_int32(quantized.qweight.detach().cpu(), bits),
        "weight_scale": quantized.scale.detach().cpu(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if quantized.zero_point is not None:
        # compressed-tensors packs zero points along the output dimension (dim 0).
        zp = quantized.zero_point.detach().cpu()
        out["weight_zero_point"] = pack_int32(zp.T.contiguous(), bits).T.contiguous()
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return out


# E2M1 magnitudes in code order: a 4-bit code is the sign bit (8) over the index of the magnitude.
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of the NVFP4 packing: ``uint8 [rows, cols / 2]`` -> E2M1 values ``[rows, cols]`` held in
    ``float8_e4m3fn`` (which represents each exactly)."""
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int64)
    values = magnitudes[codes & 7]
    return torch.where(codes & 8 != 0, -values, values).to(torch.float8_e4m3fn)


def _pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[rows, cols]`` (``cols`` even) as codes packed two per byte, even column low."""
    magnitudes = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32)
    flat = values.to(torch.float32)
    index = torch.searchsorted(magnitudes, flat.abs())
    if not torch.equal(magnitudes[index.clamp(max=7)], flat.abs()):
        raise WeightkitError("NVFP4 packing: the weight holds values that are not E2M1 numbers")
    codes = (index | (torch.signbit(flat).to(torch.int64) << 3)).to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def float_tensors(quantized: FloatQuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One float-grid weight (and its layer's bias) in compressed-tensors' float-quantized (FP8) or
    nvfp4-pack-quantized (FP4) layout (module docstring).

    Raises:
        WeightkitError: an E5M2 weight (no compressed-tensors format), or an FP4 weight with an odd number
            of columns.
    """
    check_exportable(quantized.scheme, "weight")
    qweight = quantized.qweight.detach().cpu()
    if quantized.scheme.format == "e2m1":
        if qweight.shape[1] % 2:
            raise WeightkitError(f"NVFP4 packs two values per byte: {qweight.shape[1]} columns is odd")
        out = {
            "weight_packed": _pack_e2m1(qweight),
            "weight_scale": quantized.scale.detach().cpu(),
            "weight_global_scale": quantized.global_scale.detach().cpu(),
        }
    else:
        out = {"weight": qweight, "weight_scale": quantized.scale.detach().cpu()}
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return out


# The quant_methods of the checkpoints weightkit writes and reads: compressed-tensors, and weightkit's own
# format for VPTQ and GWQ layers (weightkit.quantized.weightkit_format.QUANT_METHOD).
_WEIGHTKIT_QUANT_METHODS = ("compressed-tensors", "weightkit")


def is_quantized_checkpoint(config: dict | None) -> bool:
    """Whether a ``config.json`` dict describes a quantized checkpoint of a format weightkit writes and
    :func:`weightkit.load` reads: compressed-tensors (``quant_method`` "compressed-tensors") or weightkit's
    own VPTQ/GWQ format (``quant_method`` "weightkit"). Code that reads the stored tensors itself must tell
    the two apart by ``quant_method``."""
    qc = (config or {}).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in _WEIGHTKIT_QUANT_METHODS


def quantization_description(config: dict | None) -> str | None:
    """How a ``config.json`` dict says its weights are stored quantized, e.g. ``"compressed-tensors
    pack-quantized, 4 bits"``; None when it has no ``quantization_config``. Any quantization method counts
    (GPTQ's and AWQ's configs say ``bits``), not only the compressed-tensors checkpoints weightkit writes."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method", "unknown method")
    if method in _WEIGHTKIT_QUANT_METHODS:  # weightkit's gwq format describes its grid as compressed-tensors
        groups = (qc.get("config_groups") or {}).values()
        bits = {(group.get("weights") or {}).get("num_bits") for group in groups}
        what = f"{method} {qc.get('format')}"
    else:
        bits, what = {qc.get("bits")}, method
    bits = sorted(b for b in bits if isinstance(b, int))
    return f"{what}, {' and '.join(map(str, bits))} bits" if bits else what


def refuse_quantized(path: str | Path, *, verb: str, instead: str) -> None:
    """Refuse the checkpoint directory ``path`` as input of ``verb`` when its ``config.json`` says it is
    quantized: ``verb`` needs full-precision weights, and read as stored the packed tensors would be missing
    or garbage (merging, compressing again, aligning, extracting or merging an adapter, a Fisher).

    Called by each such verb before it opens anything, so every verb refuses a quantized checkpoint with
    the same message: what the checkpoint is, and ``instead``, what to do (e.g. "merge the full-precision
    models, then compress the result").

    Raises:
        WeightkitError: ``path`` is a quantized checkpoint.
    """
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no readable config.json (or a bare weights file): the verb's reader reports what is wrong
    description = quantization_description(config if isinstance(config, dict) else None)
    if description is not None:
        # Adapters do not work over weightkit's own VPTQ/GWQ layers (weightkit.adapt refuses them).
        own_format = config["quantization_config"].get("quant_method") == "weightkit"
        works = (
            "weightkit eval works"
            if own_format
            else "weightkit eval, and weightkit adapt on a causal LM, work"
        )
        raise WeightkitError(
            f"{path} is a quantized checkpoint ({description}): {verb} needs full-precision weights; "
            f"{instead}. ({works} on quantized checkpoints.)"
        )


def config_groups(
    qc: dict, path: Path, *, floats: bool = False
) -> tuple[list[tuple[str, list[str], QuantScheme | FloatScheme]], list[str]]:
    """``[(group name, targets, scheme)]`` and the ignore list of a compressed-tensors quantization_config.

    Reads "pack-quantized" groups (integer ``QuantScheme``); with ``floats`` also "float-quantized" (FP8)
    and "nvfp4-pack-quantized" (FP4) groups as ``FloatScheme``. Any other format is refused by name.
    """
    where = f"{path / 'config.json'} quantization_config"
    fmt = qc.get("format")
    readable = (
        ("pack-quantized", "float-quantized", "nvfp4-pack-quantized") if floats else ("pack-quantized",)
    )
    groups = []
    for group_name, group in (qc.get("config_groups") or {}).items():
        group_format = group.get("format") or fmt
        if group_format not in readable:
            raise WeightkitError(
                f"{where} group {group_name}: format {group_format!r} is not supported by weightkit.load "
                f"(it reads {', '.join(map(repr, readable))}); load it with transformers instead"
            )
        if group.get("input_activations") or group.get("output_activations"):
            raise WeightkitError(f"{where} group {group_name}: activation quantization is not supported")
        if not group.get("weights"):
            raise WeightkitError(f"{where} group {group_name} has no weights scheme")
        if group_format == "pack-quantized":
            scheme = scheme_from_weights_args(group["weights"], f"{where} group {group_name}")
        else:
            scheme = float_scheme_from_weights_args(
                group["weights"], f"{where} group {group_name} (format {group_format!r})"
            )
            if _format_of(scheme) != group_format:
                raise WeightkitError(
                    f"{where} group {group_name}: format {group_format!r} does not hold "
                    f"{scheme.bits}-bit float weights (they are stored as {_format_of(scheme)!r})"
                )
        groups.append((group_name, list(group.get("targets") or []), scheme))
    if not groups:
        raise WeightkitError(f"{where} has no config_groups")
    return groups, list(qc.get("ignore") or [])


def scheme_of(
    name: str, module: nn.Module, groups, ignore: list[str], path: Path
) -> QuantScheme | FloatScheme:
    """The scheme of the first config group whose targets match the module (compressed-tensors' rules)."""
    from compressed_tensors.utils.match import is_match

    if is_match(name, module, ignore):
        raise WeightkitError(
            f"{path}: {name} is stored packed but its quantization_config lists it in ignore"
        )
    for _, targets, scheme in groups:
        if is_match(name, module, targets):
            return scheme
    raise WeightkitError(
        f"{path}: {name}.weight_packed is stored but no quantization_config group targets {name}"
    )
