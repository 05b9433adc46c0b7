"""Git Re-Basin for Hugging Face transformers: the permutations of a transformer block's attention heads and
MLP neurons, taken from weightkit's architecture description (:mod:`weightkit.arch`), and aligning a
checkpoint to another one block at a time (``weightkit align``).

Paper: Ainsworth, Hayase, Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
arXiv 2209.04836. The matching itself (coordinate descent over linear assignment problems) is
:func:`weightkit.merge.rebasin.weight_matching`; this module says what may be permuted in a transformer
and streams a checkpoint through it.

- :func:`transformer_blocks` (one spec per block) and :func:`transformer_spec` (all blocks): the specs
  of a checkpoint, from its ``config.json`` and the roles of :func:`weightkit.arch.block_layout`,
  checked against its tensor shapes.
- :func:`align_checkpoint`: permutes a Hugging Face checkpoint to match another, streamed block by block.

What is permuted (:data:`ALIGN_MODEL_TYPES`; every other model type is refused by name):

- **MLP neurons**, wherever the block has a dense MLP: the rows (and bias) of each MLP input, the
  columns of the MLP output. A fused gate-up layer (Phi-3) holds the gate rows then the up rows: both
  halves get the same permutation. Gated (Llama family, Phi-3) or not (GPT-2, GPT-NeoX, OPT, Falcon,
  BERT family, ViT, T5), the function in between acts on each neuron alone, so this is exact.
- **Attention heads**, where moving them is exact: separate query/key/value layers (Llama family, Mixtral,
  OPT, BERT family, ViT); a fused layer holding all query rows, then key rows, then value rows (Phi-3's
  ``qkv_proj``, GPT-2's ``c_attn`` columns), each section permuted alike; GPT-NeoX's
  ``query_key_value``, whose rows are grouped per head (``[q_h; k_h; v_h]``: units of 3 ``head_dim``).
- **Not permuted**: T5's heads (:data:`FIXED_HEADS`: the relative position bias of block 0 is shared by
  every block and indexed by head), Falcon's heads (the fused layout and the position scheme depend on
  the variant: a single key/value head, ALiBi slopes indexed by head), and Mixtral's experts and router,
  copied unchanged (its attention heads are permuted).

GPT-2's ``Conv1D`` weights are stored ``in x out``: its rows and columns swap. Tensor names are the
checkpoint's: ViT checkpoints keep the names of transformers 4 (``attention.attention.query``), which
:data:`_CHECKPOINT_ROLES` maps the layout's roles to.

Deliberate deviations from the paper:

1. **The residual stream is not permuted.** The paper's experiments are MLPs, VGG and ResNets; for
   residual networks it gives every tensor joined by a skip connection one shared permutation. Carried
   over to a transformer, that is one permutation of the residual stream shared by the embeddings, every
   block's input and output projections and every norm weight, which couples all blocks into one
   problem. Here each block gets at most two permutations, one over its attention heads and one over its
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
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader, CheckpointWriter, ModelCard, Provenance
from weightkit.errors import WeightkitError
from weightkit.merge.rebasin import PermutationSpec, apply_permutation, matching_objective, weight_matching
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.runtime.device import resolve_device

__all__ = ["transformer_blocks", "transformer_spec", "align_checkpoint", "ALIGN_MODEL_TYPES", "FIXED_HEADS"]

# The model types whose permutations are tested to be exact symmetries (tests/merge/test_align.py). Others
# with a layout in weightkit.arch may hold a block tensor the layout does not name that depends on the
# order of heads (OLMo 2's q_norm/k_norm span the whole projection): they are refused until tested.
ALIGN_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "phi3", "gpt2", "gpt_neox", "opt",
    "falcon", "bert", "roberta", "xlm-roberta", "vit", "t5",
)  # fmt: skip

# Model types whose attention heads stay in place (their MLP neurons are permuted), and why.
FIXED_HEADS = {
    "t5": "the relative position bias, stored in block 0 and shared by every block, is indexed by head",
    "falcon": (
        "the fused query_key_value layout and the position scheme depend on the variant (one key/value head "
        "shared by all queries; ALiBi slopes indexed by head)"
    ),
}

# Layout role -> checkpoint name, where checkpoints name a block's layers otherwise than the model
# transformers builds (weightkit.arch describes the built model; align reads the files).
_CHECKPOINT_ROLES = {
    "vit": {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}


def _check_supported(config: Mapping) -> str:
    model_type = config.get("model_type")
    if model_type not in ALIGN_MODEL_TYPES:
        raise WeightkitError(
            f"permutation alignment does not support model_type {model_type!r}; supported: "
            f"{', '.join(ALIGN_MODEL_TYPES)}"
        )
    return model_type


def _positive(value, key: str) -> int:
    if type(value) is not int or value < 1:
        raise WeightkitError(f"config field {key} is {value!r}; expected a positive integer")
    return value


def _structure(config: Mapping) -> dict[str, int]:
    """The config fields that fix the attention shapes, by transformers' standard names and defaults.

    Read through transformers' config class of the model type: it knows each family's spelling
    (``n_embd``, ``d_model`` ...) and fills in the defaults a ``config.json`` may leave out (one writer
    omits ``head_dim`` or ``num_key_value_heads`` where another spells out the same value).
    """
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    hf = AutoConfig.for_model(_check_supported(config), **fields)
    hidden = _positive(hf.hidden_size, "hidden_size")
    heads = _positive(hf.num_attention_heads, "num_attention_heads")
    kv_heads = _positive(getattr(hf, "num_key_value_heads", None) or heads, "num_key_value_heads")
    if heads % kv_heads:
        raise WeightkitError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _positive(getattr(hf, "head_dim", None) or hidden // heads, "head_dim"),
        "num_hidden_layers": _positive(hf.num_hidden_layers, "num_hidden_layers"),
    }


def _role(config: Mapping, block: str, role: str) -> str:
    """The checkpoint name of the layer playing ``role`` in ``block``."""
    return f"{block}.{_CHECKPOINT_ROLES.get(config['model_type'], {}).get(role, role)}"


def _block_lists(config: Mapping, names: Sequence[str]) -> dict[str, list[int]]:
    """The checkpoint's lists of blocks: name prefix (``model.layers``, ``encoder.block`` ...) -> indices."""
    from weightkit.arch import block_layout

    # Every list of blocks has the attention output, named alike in all of them (T5's encoder and decoder).
    marker = _role(config, "", block_layout(config, "").attention_out).removeprefix(".")
    pattern = re.compile(rf"(.+)\.(\d+)\.{re.escape(marker)}\.weight")
    found: dict[str, list[int]] = {}
    for name in names:
        if m := pattern.fullmatch(name):
            found.setdefault(m.group(1), []).append(int(m.group(2)))
    most = 2 if config.get("is_encoder_decoder") else 1  # an encoder's and a decoder's
    if not 1 <= len(found) <= most:
        lists = ", ".join(repr(p) for p in sorted(found)) or "none"
        raise WeightkitError(
            f"cannot find the {config['model_type']} blocks: expected tensor names like "
            f"'<blocks>.0.{marker}.weight' under at most {most} prefixes; found: {lists}"
        )
    return {prefix: sorted(found[prefix]) for prefix in sorted(found)}


# One tensor of a spec under construction: name, axes, expected shape, sections of the permuted axis.
_Entry = tuple[str, tuple[str | None, ...], tuple[int, ...], tuple[int, ...] | None]


def _layer_entries(
    layer: str,
    perm: str,
    outputs: bool,
    shape: tuple[int, int],
    transposed: bool,
    shapes: Mapping[str, Sequence[int]],
    sections: tuple[int, ...] | None = None,
) -> list[_Entry]:
    """A linear layer permuted along its outputs (rows, and the bias) or inputs (columns).

    ``shape`` is ``(out, in)``; a transposed (``Conv1D``) weight is stored ``in x out``. The bias is
    permuted with the outputs when the checkpoint has one, whatever the config says, so it never stays
    behind; any other tensor of the layer (quantization scales ...) is refused.
    """
    weight, bias = f"{layer}.weight", f"{layer}.bias"
    others = [name for name in shapes if name.startswith(f"{layer}.") and name not in (weight, bias)]
    if others:
        raise WeightkitError(
            f"tensor {others[0]} belongs to a layer that alignment permutes, which handles plain weights "
            f"and biases only (is the checkpoint quantized?)"
        )
    axis = int(outputs == transposed)  # the stored axis of the permuted features
    axes = tuple(perm if i == axis else None for i in range(2))
    entries = [(weight, axes, shape[::-1] if transposed else shape, sections)]
    if outputs and bias in shapes:
        entries.append((bias, (perm,), (shape[0],), sections))
    return entries


def _block_entries(
    config: Mapping, block_list: str, block: str, structure: Mapping[str, int], shapes: Mapping
) -> tuple[dict[str, int], list[_Entry]]:
    """The permutations of one block and the tensors they act on, with the shapes the config implies."""
    from weightkit.arch import block_layout

    layout = block_layout(config, block_list)
    hidden = structure["hidden_size"]
    t = layout.transposed
    sizes: dict[str, int] = {}
    entries: list[_Entry] = []
    if config["model_type"] not in FIXED_HEADS:
        heads, kv_heads = structure["num_attention_heads"], structure["num_key_value_heads"]
        q_rows, kv_rows = heads * structure["head_dim"], kv_heads * structure["head_dim"]
        perm = f"{block}.heads"
        # One unit = one key/value head and the query heads sharing it (one head without GQA).
        sizes[perm] = kv_heads
        attention = [_role(config, block, role) for role in layout.attention]
        if layout.fused_qkv == "sections":
            shape = (q_rows + 2 * kv_rows, hidden)
            entries += _layer_entries(attention[0], perm, True, shape, t, shapes, (q_rows, kv_rows, kv_rows))
        elif layout.fused_qkv == "per-head":
            if kv_heads != heads:
                raise WeightkitError(
                    f"{attention[0]} groups its rows per head, which grouped-query attention "
                    f"({kv_heads} key/value heads for {heads} query heads) does not fit"
                )
            entries += _layer_entries(attention[0], perm, True, (3 * q_rows, hidden), t, shapes)
        else:
            for layer, out in zip(attention, (q_rows, kv_rows, kv_rows), strict=True):
                entries += _layer_entries(layer, perm, True, (out, hidden), t, shapes)
        out_layer = _role(config, block, layout.attention_out)
        entries += _layer_entries(out_layer, perm, False, (hidden, q_rows), t, shapes)
    if layout.mlp_in:
        perm = f"{block}.mlp"
        down = _role(config, block, layout.mlp_out)
        # The MLP width is read from the output layer's inputs; the input layers are checked against it.
        width = _shape(shapes, f"{down}.weight")[0 if layout.transposed else -1]
        sizes[perm] = width
        fused = layout.gated and len(layout.mlp_in) == 1  # gate rows, then up rows
        for role in layout.mlp_in:
            layer = _role(config, block, role)
            if fused:
                entries += _layer_entries(layer, perm, True, (2 * width, hidden), t, shapes, (width, width))
            else:
                entries += _layer_entries(layer, perm, True, (width, hidden), t, shapes)
        entries += _layer_entries(down, perm, False, (hidden, width), t, shapes)
    return sizes, entries


def _shape(shapes: Mapping[str, Sequence[int]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise WeightkitError(f"tensor {name} is missing from the checkpoint (expected from its config)")
    return tuple(shapes[name])


def transformer_blocks(config: Mapping, shapes: Mapping[str, Sequence[int]]) -> dict[str, PermutationSpec]:
    """The permutation spec of every transformer block of a checkpoint, checked against its tensor shapes.

    Per block (``model.layers.3``, ``encoder.block.0`` ...): permutation ``{block}.heads`` over its
    key/value heads, each with the query heads sharing it (no such permutation for :data:`FIXED_HEADS`),
    and ``{block}.mlp`` over its MLP neurons (none for an MLP of experts); see the module docstring for
    the tensors each acts on. The lists of blocks are found from the tensor names (any prefix:
    ``bert.encoder.layer``, ``encoder.layer`` ...), and every tensor is checked to exist with the shape
    the config implies, so a config that does not describe the weights (wrong ``num_key_value_heads``,
    say) is refused instead of silently scrambling heads.

    Args:
        config: the model's ``config.json`` as a dict.
        shapes: tensor name -> shape of every tensor of the checkpoint
            (``{k: v.shape for k, v in model.state_dict().items()}``).

    Returns:
        Block name -> spec of that block, in the order of the lists of blocks, then of the blocks.

    Raises:
        WeightkitError: an unsupported ``model_type``, a config field that is not a positive integer,
            heads not divisible into key/value groups, blocks not found, a missing tensor, a shape that
            disagrees with the config, or a permuted layer holding more than a weight and a bias.
    """
    structure = _structure(config)
    specs = {}
    for block_list, indices in _block_lists(config, list(shapes)).items():
        for index in indices:
            block = f"{block_list}.{index}"
            sizes, entries = _block_entries(config, block_list, block, structure, shapes)
            for name, _, expected, _ in entries:
                if _shape(shapes, name) != expected:
                    raise WeightkitError(
                        f"tensor {name} has shape {list(shapes[name])} but the config implies "
                        f"{list(expected)} (check hidden_size, num_attention_heads, num_key_value_heads, "
                        f"head_dim and the MLP output layer's width)"
                    )
            axes = {name: name_axes for name, name_axes, _, _ in entries}
            sections = {name: s for name, _, _, s in entries if s is not None}
            specs[block] = PermutationSpec(sizes, axes, sections)
    return specs


def transformer_spec(config: Mapping, shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
    """The permutation spec of all blocks of a checkpoint: :func:`transformer_blocks` in one spec."""
    specs = transformer_blocks(config, shapes).values()
    return PermutationSpec(
        {perm: size for spec in specs for perm, size in spec.sizes.items()},
        {name: axes for spec in specs for name, axes in spec.axes.items()},
        {name: sections for spec in specs for name, sections in spec.sections.items()},
    )


# -- checkpoints ---------------------------------------------------------------------------------------


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
    ref_structure, structure = _structure(ref_config), _structure(config)
    for key, value in structure.items():
        if ref_structure[key] != value:
            raise WeightkitError(
                f"config field {key} differs: {ref_structure[key]!r} in {reference.path}, "
                f"{value!r} in {model.path}; only models of the same shape can be aligned"
            )
    return config


def _paired_blocks(
    reference: CheckpointReader, model: CheckpointReader
) -> list[tuple[str, PermutationSpec, list[tuple[str, str]]]]:
    """Each block of ``model`` with its spec and its tensors' names in (``reference``, ``model``).

    Whole-model specs up front: every missing tensor or bad shape is reported before any work. The name
    prefixes may differ (``bert.encoder...`` vs ``encoder...``); the blocks and their shapes may not.
    """
    ref_shapes = {name: tuple(reference.shape(name)) for name in reference.names()}
    shapes = {name: tuple(model.shape(name)) for name in model.names()}
    ref_blocks = transformer_blocks(reference.config, ref_shapes)
    blocks = transformer_blocks(model.config, shapes)
    if len(ref_blocks) != len(blocks):
        raise WeightkitError(
            f"{reference.path} has {len(ref_blocks)} transformer blocks, {model.path} has {len(blocks)}"
        )
    paired = []
    for ref_spec, (block, spec) in zip(ref_blocks.values(), blocks.items(), strict=True):
        if len(ref_spec.axes) != len(spec.axes):
            raise WeightkitError(
                f"block {block} of {model.path} has {len(spec.axes)} permuted tensors, its counterpart in "
                f"{reference.path} {len(ref_spec.axes)} (a bias in one only?)"
            )
        names = list(zip(ref_spec.axes, spec.axes, strict=True))
        for ref_name, name in names:
            if ref_shapes[ref_name] != shapes[name]:
                raise WeightkitError(
                    f"tensor {name} has shape {list(shapes[name])} in {model.path} but {ref_name} has "
                    f"{list(ref_shapes[ref_name])} in {reference.path}; only models of the same shape can "
                    f"be aligned"
                )
        paired.append((block, spec, names))
    return paired


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
    checkpoints, match (:func:`weight_matching` with the block's spec from :func:`transformer_blocks`),
    write the permuted block; every other tensor (norms, embeddings, Mixtral's experts ...) is copied
    unchanged. Peak memory is about two blocks in float32.

    Args:
        reference_dir: the model to align to (a model type of :data:`ALIGN_MODEL_TYPES`).
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
        A summary: ``layers`` (one dict per block: ``block`` = its name in ``model_dir``, ``heads_moved``
        and ``mlp_moved`` = fraction of heads / neurons not at their original position, or None where
        they are not permuted, ``objective_before``/``objective_after`` = the block's
        ``sum <W_reference, W_model>`` before and after, ``cosine_before``/``cosine_after`` = the same
        divided by both blocks' norms), ``tensors``, ``output_bytes``, ``seconds``, ``out_dir``,
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
        _check_configs(reference, model)
        blocks = _paired_blocks(reference, model)
        tensors = len(model.names())
        summary_layers = []
        written: set[str] = set()
        total_bytes = 0
        settings = {"max_iter": max_iter, "seed": seed}
        provenance = Provenance("align", "weight_matching", settings, (model_dir, reference_dir))
        with CheckpointWriter(out_dir, overwrite=overwrite, provenance=provenance) as writer:
            for block, spec, names in track(blocks, "aligning blocks", enabled=progress):
                ref_state = {name: reference.get_finite(ref_name).to(device) for ref_name, name in names}
                state = {name: model.get_finite(name).to(device) for _, name in names}
                perms = weight_matching(ref_state, state, spec, max_iter=max_iter, seed=seed)
                before = matching_objective(ref_state, state, spec)
                after = matching_objective(ref_state, state, spec, perms)
                norms = _norm(ref_state) * _norm(state)
                moved = {
                    p: float((index != torch.arange(index.numel())).float().mean())
                    for p, index in perms.items()
                }
                summary_layers.append(
                    {
                        "block": block,
                        "heads_moved": moved.get(f"{block}.heads"),
                        "mlp_moved": moved.get(f"{block}.mlp"),
                        "objective_before": before,
                        "objective_after": after,
                        "cosine_before": before / norms if norms else 0.0,
                        "cosine_after": after / norms if norms else 0.0,
                    }
                )
                for name, tensor in apply_permutation(state, spec, perms).items():
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
            writer.write_model_card(
                ModelCard("align", "weight_matching", [str(model_dir), str(reference_dir)], settings)
            )
    finally:
        for reader in readers:
            reader.close()
    return {
        "layers": summary_layers,
        "tensors": tensors,
        "output_bytes": total_bytes,
        "seconds": time.perf_counter() - start,
        "out_dir": str(out_dir),
        "device": str(device),
    }
