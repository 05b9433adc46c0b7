"""Git Re-Basin for Hugging Face transformers: the permutations of Llama and BERT blocks, and aligning a
checkpoint to another one block at a time (``weightkit align``).

Paper: Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
arXiv 2209.04836. The matching itself (coordinate descent over linear assignment problems) is
:func:`weightkit.merge.rebasin.weight_matching`; this module says what may be permuted in a transformer
and streams a checkpoint through it.

- :func:`llama_spec`, :func:`bert_spec`, and :func:`transformer_spec`, which picks one from
  ``config.json`` and checks the tensor shapes.
- :func:`align_checkpoint`: permutes a Hugging Face checkpoint to match another, streamed block by block.

Deliberate deviations from the paper:

1. **The residual stream is not permuted.** The paper's experiments are MLPs, VGG and ResNets; for
   residual networks it gives every tensor joined by a skip connection one shared permutation. Carried
   over to a transformer, that is one permutation of the residual stream shared by the embeddings, every
   block's input and output projections and every norm weight, which couples all blocks into one
   problem. Here each block gets exactly two permutations, one over its attention heads and one over its
   MLP neurons. Both are exact, function-preserving symmetries of that block alone, so every block's
   matching is an independent problem and a checkpoint can be aligned one block at a time (norm weights,
   embeddings and ``lm_head`` are copied unchanged). The price: the residual bases of two models trained
   from scratch are not aligned, which a residual permutation would try.
2. **Attention heads move whole.** A single row of ``W_q`` or ``W_k`` cannot be moved independently of
   its head (the attention scores mix all dimensions of a head), so the head permutation is an
   assignment over heads whose similarity is the sum, over q/k/v/o, of the inner products of the heads'
   weight slices. With grouped-query attention a key/value head and the query heads that share it move
   together; the query heads within a group, and the dimensions within a head, are not permuted
   (rotary embeddings act on each head alike, so whole-head moves are exact symmetries).
"""

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader, CheckpointWriter
from weightkit.errors import WeightkitError
from weightkit.merge.rebasin import PermutationSpec, apply_permutation, matching_objective, weight_matching
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device

__all__ = [
    "llama_spec",
    "bert_spec",
    "transformer_spec",
    "align_checkpoint",
    "LLAMA_MODEL_TYPES",
    "BERT_MODEL_TYPES",
]

# Decoder families with Llama's tensor names and per-head layout (Qwen2 adds q/k/v biases).
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Encoder families with BERT's tensor names (``{prefix}encoder.layer.{i}.attention.self.query`` ...).
BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def _config_int(config: Mapping, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    if type(value) is not int or value < 1:
        raise WeightkitError(f"config field {key} is {value!r}; expected a positive integer")
    return value


def _layers(config: Mapping, layers: Iterable[int] | None) -> list[int]:
    count = _config_int(config, "num_hidden_layers")
    chosen = list(range(count)) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < count:
            raise WeightkitError(f"layer {layer} is out of range: the model has {count} layers")
    return chosen


# Entry of a spec under construction: tensor name, axes, expected shape.
_Entry = tuple[str, tuple[str | None, ...], tuple[int, ...]]


def _llama_entries(config: Mapping, prefix: str, layers: list[int]) -> tuple[dict[str, int], list[_Entry]]:
    hidden = _config_int(config, "hidden_size")
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads", heads)
    inter = _config_int(config, "intermediate_size")
    head_dim = _config_int(config, "head_dim", hidden // heads)
    if heads % kv_heads:
        raise WeightkitError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias"))
    mlp_bias = bool(config.get("mlp_bias"))
    sizes: dict[str, int] = {}
    entries: list[_Entry] = []
    for i in layers:
        base = f"{prefix}layers.{i}."
        h, m = f"layers.{i}.heads", f"layers.{i}.mlp"
        # One unit of the head permutation = one key/value head plus the query heads that share it.
        sizes[h], sizes[m] = kv_heads, inter
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            entries.append((f"{base}self_attn.{proj}_proj.weight", (h, None), (rows, hidden)))
            if qkv_bias:
                entries.append((f"{base}self_attn.{proj}_proj.bias", (h,), (rows,)))
        entries.append((f"{base}self_attn.o_proj.weight", (None, h), (hidden, heads * head_dim)))
        for proj in ("gate", "up"):
            entries.append((f"{base}mlp.{proj}_proj.weight", (m, None), (inter, hidden)))
            if mlp_bias:
                entries.append((f"{base}mlp.{proj}_proj.bias", (m,), (inter,)))
        entries.append((f"{base}mlp.down_proj.weight", (None, m), (hidden, inter)))
    return sizes, entries


def _bert_entries(config: Mapping, prefix: str, layers: list[int]) -> tuple[dict[str, int], list[_Entry]]:
    hidden = _config_int(config, "hidden_size")
    heads = _config_int(config, "num_attention_heads")
    inter = _config_int(config, "intermediate_size")
    if hidden % heads:
        raise WeightkitError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
    sizes: dict[str, int] = {}
    entries: list[_Entry] = []
    for i in layers:
        base = f"{prefix}encoder.layer.{i}."
        h, m = f"layers.{i}.heads", f"layers.{i}.mlp"
        sizes[h], sizes[m] = heads, inter
        for proj in ("query", "key", "value"):
            entries.append((f"{base}attention.self.{proj}.weight", (h, None), (hidden, hidden)))
            entries.append((f"{base}attention.self.{proj}.bias", (h,), (hidden,)))
        entries.append((f"{base}attention.output.dense.weight", (None, h), (hidden, hidden)))
        entries.append((f"{base}intermediate.dense.weight", (m, None), (inter, hidden)))
        entries.append((f"{base}intermediate.dense.bias", (m,), (inter,)))
        entries.append((f"{base}output.dense.weight", (None, m), (hidden, inter)))
    return sizes, entries


def llama_spec(
    config: Mapping, *, prefix: str = "model.", layers: Iterable[int] | None = None
) -> PermutationSpec:
    """Permutation spec of the transformer blocks of a Hugging Face Llama (also Mistral, Qwen2).

    Per block ``i``: permutation ``layers.{i}.heads`` over the ``num_key_value_heads`` key/value heads
    (rows of ``k_proj``/``v_proj``, the rows of ``q_proj`` and columns of ``o_proj`` of the query heads
    sharing each key/value head, and q/k/v biases when the config has them) and ``layers.{i}.mlp`` over
    the ``intermediate_size`` MLP neurons (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``).
    The residual stream is not permuted (see the module docstring), so norms and embeddings are untouched.

    Args:
        config: the model's ``config.json`` as a dict (``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``, ``num_hidden_layers``, optional ``head_dim``,
            ``attention_bias``, ``mlp_bias``, ``model_type``).
        prefix: what precedes ``layers.{i}.`` in tensor names (``"model."`` for ``LlamaForCausalLM``,
            ``""`` for a bare ``LlamaModel``).
        layers: the blocks to include (default: all).

    Returns:
        The spec.

    Raises:
        WeightkitError: a missing or non-positive config field, heads not divisible into key/value
            groups, or a layer out of range.
    """
    sizes, entries = _llama_entries(config, prefix, _layers(config, layers))
    return PermutationSpec(sizes, {name: axes for name, axes, _ in entries})


def bert_spec(
    config: Mapping, *, prefix: str = "bert.", layers: Iterable[int] | None = None
) -> PermutationSpec:
    """Permutation spec of the encoder blocks of a Hugging Face BERT (also RoBERTa, XLM-RoBERTa).

    Per block ``i``: permutation ``layers.{i}.heads`` over the ``num_attention_heads`` heads (rows and
    biases of ``attention.self.{query,key,value}``, columns of ``attention.output.dense``) and
    ``layers.{i}.mlp`` over the ``intermediate_size`` neurons (rows and bias of ``intermediate.dense``,
    columns of ``output.dense``). The residual stream is not permuted (see the module docstring).

    Args:
        config: the model's ``config.json`` as a dict (``hidden_size``, ``num_attention_heads``,
            ``intermediate_size``, ``num_hidden_layers``).
        prefix: what precedes ``encoder.layer.{i}.`` in tensor names: ``"bert."`` for the task models
            (``BertForMaskedLM`` ...), ``""`` for ``BertModel`` and sentence-transformers checkpoints.
        layers: the blocks to include (default: all).

    Returns:
        The spec.

    Raises:
        WeightkitError: a missing or non-positive config field, ``hidden_size`` not divisible by the head
            count, or a layer out of range.
    """
    sizes, entries = _bert_entries(config, prefix, _layers(config, layers))
    return PermutationSpec(sizes, {name: axes for name, axes, _ in entries})


def _family(config: Mapping) -> str:
    model_type = config.get("model_type")
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    if model_type in BERT_MODEL_TYPES:
        return "bert"
    supported = ", ".join(LLAMA_MODEL_TYPES + BERT_MODEL_TYPES)
    raise WeightkitError(
        f"permutation alignment does not support model_type {model_type!r}; supported: {supported}"
    )


# How to find the name prefix of the blocks: a regex and the example shown when it matches nothing.
_BLOCK_MARKERS = {
    "llama": (r"layers\.\d+\.self_attn\.q_proj\.weight", "model.layers.0.self_attn.q_proj.weight"),
    "bert": (
        r"encoder\.layer\.\d+\.attention\.self\.query\.weight",
        "encoder.layer.0.attention.self.query.weight",
    ),
}


def _detect_prefix(family: str, names: Iterable[str]) -> str:
    marker, example = _BLOCK_MARKERS[family]
    pattern = re.compile(rf"(.*?){marker}")
    prefixes = sorted({m.group(1) for name in names if (m := pattern.fullmatch(name))})
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in prefixes)
        raise WeightkitError(
            f"cannot find the {family} transformer blocks: expected tensor names like {example!r} "
            f"under a single prefix; prefixes found: {found}"
        )
    return prefixes[0]


def transformer_spec(
    config: Mapping, shapes: Mapping[str, Sequence[int]], *, layers: Iterable[int] | None = None
) -> PermutationSpec:
    """The permutation spec of a Llama- or BERT-family checkpoint, checked against its tensor shapes.

    Picks :func:`llama_spec` or :func:`bert_spec` from ``config["model_type"]``, finds the name prefix
    (``"model."``, ``"bert."``, ``""`` ...) from the tensor names, and checks that every spec tensor
    exists with the shape the config implies, so a config that does not describe the weights (wrong
    ``num_key_value_heads``, say) is refused instead of silently scrambling heads.

    Args:
        config: the model's ``config.json`` as a dict.
        shapes: tensor name -> shape of every tensor of the checkpoint
            (``{k: v.shape for k, v in model.state_dict().items()}``).
        layers: the blocks to include (default: all).

    Returns:
        The spec.

    Raises:
        WeightkitError: an unsupported ``model_type``, blocks not found, a missing tensor, a shape that
            disagrees with the config, or a bias of a permuted projection that the config does not
            declare (it would be left unpermuted).
    """
    family = _family(config)
    prefix = _detect_prefix(family, shapes)
    chosen = _layers(config, layers)
    build = _llama_entries if family == "llama" else _bert_entries
    sizes, entries = build(config, prefix, chosen)
    axes = {}
    for name, name_axes, expected in entries:
        if name not in shapes:
            raise WeightkitError(f"tensor {name} is missing from the checkpoint (expected from its config)")
        if tuple(shapes[name]) != expected:
            raise WeightkitError(
                f"tensor {name} has shape {list(shapes[name])} but the config implies {list(expected)} "
                f"(check hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size)"
            )
        axes[name] = name_axes
        if name.endswith(".weight") and name_axes[0] is not None:
            bias = name.removesuffix(".weight") + ".bias"
            if bias in shapes and not any(n == bias for n, _, _ in entries):
                raise WeightkitError(
                    f"tensor {bias} exists but the config declares no such bias (attention_bias/mlp_bias); "
                    f"refusing to permute {name} without it"
                )
    return PermutationSpec(sizes, axes)


# -- checkpoints ---------------------------------------------------------------------------------------


def _structure(config: Mapping) -> dict:
    """The config fields that fix the block shapes, with their defaults filled in.

    Defaults matter: one writer of ``config.json`` omits ``head_dim`` or ``num_key_value_heads`` where
    another spells out the same value.
    """
    keys = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    structure = {key: config.get(key) for key in keys}
    heads, hidden = structure["num_attention_heads"], structure["hidden_size"]
    structure["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    default_head_dim = (
        hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    )
    structure["head_dim"] = config.get("head_dim") or default_head_dim
    structure["attention_bias"] = bool(config.get("attention_bias"))
    structure["mlp_bias"] = bool(config.get("mlp_bias"))
    return structure


def _check_configs(reference: CheckpointReader, model: CheckpointReader) -> dict:
    for reader in (reference, model):
        if reader.config is None:
            raise WeightkitError(f"{reader.path} has no config.json; permutation alignment needs one")
    ref_config, config = reference.config, model.config
    if ref_config.get("model_type") != config.get("model_type"):
        raise WeightkitError(
            f"different architectures: {reference.path} is {ref_config.get('model_type')!r}, "
            f"{model.path} is {config.get('model_type')!r}"
        )
    _family(config)
    ref_structure, structure = _structure(ref_config), _structure(config)
    for key, value in structure.items():
        if ref_structure[key] != value:
            raise WeightkitError(
                f"config field {key} differs: {ref_structure[key]!r} in {reference.path}, "
                f"{value!r} in {model.path}; only models of the same shape can be aligned"
            )
    return config


def _norm(state: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(t.float().square().sum(dtype=torch.float64)) for t in state.values()))


def align_checkpoint(
    reference_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Write ``model_dir`` with its heads and MLP neurons permuted to match ``reference_dir``.

    The output is an ordinary Hugging Face directory (``model_dir``'s config, tokenizer and other files
    copied) computing exactly the same function as ``model_dir``; merging it with the reference then
    averages corresponding units. Work goes one transformer block at a time: read the block from both
    checkpoints, match (:func:`weight_matching` with :func:`transformer_spec` of that block), write the
    permuted block; every other tensor is copied unchanged. Peak memory is about two blocks in float32.

    Args:
        reference_dir: the model to align to (Llama, Mistral, Qwen2, BERT, RoBERTa families).
        model_dir: the model to permute; same architecture and sizes as the reference. The name prefix may
            differ (``bert.encoder...`` vs ``encoder...``).
        out_dir: the output directory, written atomically.
        overwrite: replace an existing ``out_dir``.
        progress: show a progress bar.
        max_iter: maximum coordinate-descent rounds per block.
        seed: seed of the visiting order.
        device: where each block's similarity matrices and permutations are computed: None for the GPU
            when there is one (:func:`weightkit.runtime.device.resolve_device`), or ``"cpu"``, ``"cuda:1"``
            ... The assignment problems are solved on the CPU (scipy) either way.
        allow_pickle: also read ``.bin``/``.pt`` pickle checkpoints (unpickling can run code: trusted files
            only).

    Returns:
        A summary: ``layers`` (one dict per block: ``layer``, ``heads_moved`` and ``mlp_moved`` = fraction
        of heads / neurons not at their original position, ``objective_before``/``objective_after`` = the
        block's ``sum <W_reference, W_model>`` before and after, ``cosine_before``/``cosine_after`` = the
        same divided by both blocks' norms), ``tensors``, ``output_bytes``, ``seconds``, ``out_dir``,
        ``device``.

    Raises:
        WeightkitError: an unsupported architecture, missing config.json, configs or block shapes that
            differ, a missing tensor, NaN/Inf weights in a block, an existing ``out_dir`` without
            ``overwrite``, or a device this machine does not have. Nothing is written then.
    """
    start = time.perf_counter()
    for path in (reference_dir, model_dir):
        refuse_quantized(
            path, verb="weightkit align", instead="align the full-precision models, then compress"
        )
    device = resolve_device(device)
    readers: list[CheckpointReader] = []
    try:
        reference = CheckpointReader(reference_dir, allow_pickle=allow_pickle)
        readers.append(reference)
        model = CheckpointReader(model_dir, allow_pickle=allow_pickle)
        readers.append(model)
        config = _check_configs(reference, model)
        ref_shapes = {name: reference.shape(name) for name in reference.names()}
        shapes = {name: model.shape(name) for name in model.names()}
        # Whole-model specs up front: every missing tensor or bad shape is reported before any work. Both
        # configs agree on every structure field, so equal expected shapes mean equal block shapes.
        transformer_spec(reference.config, ref_shapes)
        transformer_spec(config, shapes)
        layers = _layers(config, None)
        summary_layers = []
        written: set[str] = set()
        total_bytes = 0
        with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
            for layer in track(layers, "aligning blocks", enabled=progress):
                block = transformer_spec(config, shapes, layers=[layer])
                ref_block = transformer_spec(reference.config, ref_shapes, layers=[layer])
                # Both specs list the same entries in the same order; only the name prefix may differ.
                pairs = list(zip(ref_block.axes, block.axes, strict=True))
                ref_state = {name: reference.get_finite(ref_name).to(device) for ref_name, name in pairs}
                state = {name: model.get_finite(name).to(device) for _, name in pairs}
                perms = weight_matching(ref_state, state, block, max_iter=max_iter, seed=seed)
                before = matching_objective(ref_state, state, block)
                after = matching_objective(ref_state, state, block, perms)
                norms = _norm(ref_state) * _norm(state)
                moved = {
                    p: float((index != torch.arange(index.numel())).float().mean())
                    for p, index in perms.items()
                }
                summary_layers.append(
                    {
                        "layer": layer,
                        "heads_moved": moved[f"layers.{layer}.heads"],
                        "mlp_moved": moved[f"layers.{layer}.mlp"],
                        "objective_before": before,
                        "objective_after": after,
                        "cosine_before": before / norms if norms else 0.0,
                        "cosine_after": after / norms if norms else 0.0,
                    }
                )
                for name, tensor in apply_permutation(state, block, perms).items():
                    writer.add(name, tensor)
                    written.add(name)
                    total_bytes += tensor.numel() * tensor.element_size()
                del ref_state, state
            for name in model.names():
                if name not in written:
                    tensor = model.get(name)
                    writer.add(name, tensor)
                    total_bytes += tensor.numel() * tensor.element_size()
            if model.directory is not None:
                writer.copy_files(model.directory)
    finally:
        for reader in readers:
            reader.close()
    return {
        "layers": summary_layers,
        "tensors": len(shapes),
        "output_bytes": total_bytes,
        "seconds": time.perf_counter() - start,
        "out_dir": str(out_dir),
        "device": str(device),
    }
