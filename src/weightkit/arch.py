"""What weightkit knows about a Hugging Face architecture: its task, its repeated blocks and their layers.

One description serves every verb that needs more than a list of tensors:

- :func:`model_task` says how a model loads and what it computes (``causal-lm``, ``encoder``,
  ``seq2seq``, ``vision``), from ``config.json`` and transformers' own Auto mappings, so a new decoder
  that transformers knows is a causal LM here too;
- :func:`block_lists` finds the repeated blocks (``model.layers``, ``transformer.h``,
  ``encoder.block`` and ``decoder.block`` ...) in the built model itself: every ``ModuleList`` of
  blocks of one class that hold linear layers, outside any other such list;
- :func:`block_layout` names the roles of a block's layers (attention inputs and output, MLP inputs
  and output, the norms in front of them) for the families in :data:`LAYOUTS`; the calibrated
  quantizers take AWQ's scaling folds and its unclipped query/key layers from it, and permutation
  alignment its head and neuron permutations.

A model type without a layout still works wherever roles are not needed ("every linear layer in every
repeated block"); the verbs that need roles warn (AWQ then only clips) or refuse (alignment) by name.
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from weightkit.errors import WeightkitError

__all__ = [
    "BlockLayout",
    "Fold",
    "LAYOUTS",
    "TASKS",
    "model_task",
    "block_lists",
    "block_layout",
    "folds",
]

TASKS = ("causal-lm", "encoder", "seq2seq", "vision")


def model_task(config: Mapping) -> str:
    """What a model computes, from its ``config.json``: ``causal-lm``, ``encoder``, ``seq2seq`` or ``vision``.

    Encoder-decoders are ``seq2seq``; types transformers can build as a masked LM are ``encoder`` (BERT,
    RoBERTa ...; some of them can also be causal LMs); other types it can build as a causal LM are
    ``causal-lm``; image classifiers are ``vision``.

    Raises:
        WeightkitError: no ``model_type``, or one transformers does not know as any of these.
    """
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type")
    if not model_type:
        raise WeightkitError("config.json has no model_type: it is not a Hugging Face model config")
    if config.get("is_encoder_decoder") or model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    if model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "vision"
    raise WeightkitError(
        f"model_type {model_type!r} is not a causal LM, encoder, encoder-decoder or image model that the "
        "installed transformers knows"
    )


def _holds_linear(module: nn.Module) -> bool:
    # Imported here: select imports transformers, which the merge verbs do not pay for at start-up.
    from weightkit.select import LINEAR_TYPES

    return any(isinstance(m, LINEAR_TYPES) or hasattr(m, "base_layer") for m in module.modules())


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's lists of repeated blocks, in module order, as ``(name, list)``.

    A list of blocks is a ``ModuleList`` whose items are all of one class and hold linear layers; lists
    inside a block (T5's sub-layers, a mixture of experts) are parts of that block, not lists of blocks.

    Raises:
        WeightkitError: the model has no such list.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if len({type(m) for m in module}) == 1 and all(_holds_linear(m) for m in module):
            found.append((name, module))
    if not found:
        raise WeightkitError(f"{type(model).__name__} has no list of repeated blocks holding linear layers")
    return found


@dataclass(frozen=True)
class BlockLayout:
    """The roles of the layers of one block, as names relative to the block.

    Attributes:
        attention: the projections reading the attention's input: query, key, value, or one fused layer.
        attention_out: the attention's output projection.
        mlp_in: the MLP's input projections (gate and up, one fused gate-up, or one); empty for a mixture
            of experts whose experts are not linear layers.
        mlp_out: the MLP's output projection (``None`` with ``mlp_in`` empty).
        attention_norm: the norm whose output only the ``attention`` layers read (pre-norm blocks), else
            ``None`` (post-norm blocks, whose norm output is also the residual).
        mlp_norm: the same for ``mlp_in``; equal to ``attention_norm`` when one norm feeds both
            (parallel blocks).
        fused_qkv: the row layout of a fused ``attention`` layer: ``"sections"`` (all query rows, then key,
            then value), ``"per-head"`` (each head's query, key and value rows together, GPT-NeoX) or
            ``"per-group"`` (each key/value head's query heads, then its key and value; Falcon's new
            decoder architecture).
        gated: the MLP multiplies an activated gate by a linear "up" projection (the last ``mlp_in``, or
            the second half of a fused gate-up), which then feeds ``mlp_out`` linearly.
        norm_offset: the norms scale by ``offset + weight`` (Gemma's RMSNorm: 1).
        transposed: the layers are GPT-2's ``Conv1D`` (weights stored ``in x out``).
        carries: outputs of a list's first block that its other blocks receive as positional arguments,
            as ``(output index, argument index after the hidden states)`` (T5's position biases).
    """

    attention: tuple[str, ...]
    attention_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str | None
    attention_norm: str | None
    mlp_norm: str | None
    fused_qkv: str | None = None
    gated: bool = False
    norm_offset: float = 0.0
    transposed: bool = False
    carries: tuple[tuple[int, int], ...] = ()

    @property
    def query_key(self) -> tuple[str, ...]:
        """The layers whose outputs meet in the attention scores (a fused layer counts as one)."""
        return self.attention if self.fused_qkv else self.attention[:2]


def _llama(
    *, mlp: bool = True, attention_norm="input_layernorm", mlp_norm="post_attention_layernorm", offset=0.0
) -> BlockLayout:
    return BlockLayout(
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out="self_attn.o_proj",
        mlp_in=("mlp.gate_proj", "mlp.up_proj") if mlp else (),
        mlp_out="mlp.down_proj" if mlp else None,
        attention_norm=attention_norm,
        mlp_norm=mlp_norm if mlp else None,
        gated=mlp,
        norm_offset=offset,
    )


_BERT = BlockLayout(
    attention=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    attention_norm=None,  # post-norm: LayerNorm(x + attention(x)) is the residual too
    mlp_norm=None,
)


def _t5(config: Mapping, block_list: str) -> BlockLayout:
    decoder = "decoder" in block_list.split(".")  # its blocks hold a cross-attention layer before the MLP
    gated = config.get("is_gated_act", False)
    ff = "layer.2" if decoder else "layer.1"
    return BlockLayout(
        attention=("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v"),
        attention_out="layer.0.SelfAttention.o",
        mlp_in=(f"{ff}.DenseReluDense.wi_0", f"{ff}.DenseReluDense.wi_1")
        if gated
        else (f"{ff}.DenseReluDense.wi",),
        mlp_out=f"{ff}.DenseReluDense.wo",
        attention_norm="layer.0.layer_norm",
        mlp_norm=f"{ff}.layer_norm",
        gated=gated,
        # T5Stack calls each block with (hidden, mask, position_bias, encoder_hidden_states, encoder_mask,
        # encoder_decoder_position_bias): the first block returns the two biases it computed.
        carries=((1, 1), (2, 4)) if decoder else ((1, 1),),
    )


def _opt(config: Mapping, block_list: str) -> BlockLayout:
    pre = config.get("do_layer_norm_before", True)
    return BlockLayout(
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        attention_norm="self_attn_layer_norm" if pre else None,
        mlp_norm="final_layer_norm" if pre else None,
    )


def _falcon(config: Mapping, block_list: str) -> BlockLayout:
    # FalconAttention._split_heads: the fused rows' layout depends on the variant.
    if config.get("new_decoder_architecture"):
        fused = "per-group"
    else:
        fused = "sections" if config.get("multi_query", True) else "per-head"
    if config.get("new_decoder_architecture") and (config.get("num_ln_in_parallel_attn") or 2) == 2:
        norms = ("ln_attn", "ln_mlp")
    elif config.get("new_decoder_architecture") or config.get("parallel_attn", True):
        norms = ("input_layernorm", "input_layernorm")
    else:
        norms = ("input_layernorm", "post_attention_layernorm")
    return BlockLayout(
        attention=("self_attention.query_key_value",),
        attention_out="self_attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attention_norm=norms[0],
        mlp_norm=norms[1],
        fused_qkv=fused,
    )


_PHI3 = BlockLayout(
    attention=("self_attn.qkv_proj",),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_up_proj",),
    mlp_out="mlp.down_proj",
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    fused_qkv="sections",
    gated=True,
)
_GPT_NEOX = BlockLayout(
    attention=("attention.query_key_value",),
    attention_out="attention.dense",
    mlp_in=("mlp.dense_h_to_4h",),
    mlp_out="mlp.dense_4h_to_h",
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    fused_qkv="per-head",
)
_GPT2 = BlockLayout(
    attention=("attn.c_attn",),
    attention_out="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    attention_norm="ln_1",
    mlp_norm="ln_2",
    fused_qkv="sections",
    transposed=True,
)
# ViT as transformers 5 builds it (checkpoints name these encoder.layer.{i}.attention.attention.query ...).
_VIT = BlockLayout(
    attention=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    attention_out="attention.o_proj",
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",
    attention_norm="layernorm_before",
    mlp_norm="layernorm_after",
)

# model_type -> the layout of its blocks, or a function of the config and the block list's name giving it.
# Checked by building each from a tiny config with the pinned transformers (tests/test_architectures.py).
LAYOUTS = {
    **dict.fromkeys(
        ("llama", "mistral", "ministral", "qwen2", "qwen3", "granite", "olmo", "helium"), _llama()
    ),
    "gemma": _llama(offset=1.0),
    "gemma2": _llama(mlp_norm="pre_feedforward_layernorm", offset=1.0),
    # OLMo 2 normalises each sub-layer's output (post-norm): no norm output feeds only the projections.
    "olmo2": _llama(attention_norm=None, mlp_norm=None),
    # Experts held as fused 3-D parameters (transformers 5) are not linear layers.
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), _llama(mlp=False)),
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "opt": _opt,
    "falcon": _falcon,
    **dict.fromkeys(
        (
            "bert",
            "roberta",
            "xlm-roberta",
            "camembert",
            "electra",
            "ernie",
            "megatron-bert",
            "data2vec-text",
            "roberta-prelayernorm",
        ),
        _BERT,
    ),
    "vit": _VIT,
    "t5": _t5,
}


def block_layout(config: Mapping, block_list: str, *, purpose: str | None = None) -> BlockLayout | None:
    """The layout of the blocks in ``block_list`` (a :func:`block_lists` name) of a model of ``config``.

    Args:
        config: the model's ``config.json`` as a dict.
        block_list: the list's module name; for encoder-decoders its ``encoder``/``decoder`` part picks
            the layout.
        purpose: what the layout is wanted for; given, an unknown model type warns that it is done
            without one (e.g. ``"AWQ's scaling folds"``).

    Returns:
        The layout, or ``None`` for a model type without one.
    """
    model_type = config.get("model_type")
    layout = LAYOUTS.get(model_type)
    if layout is None:
        if purpose:
            warnings.warn(
                f"weightkit has no layer layout for model_type {model_type!r}: {purpose} treat every linear "
                f"layer of every block alike",
                stacklevel=3,
            )
        return None
    return layout(config, block_list) if callable(layout) else layout


@dataclass(frozen=True)
class Fold:
    """An op whose output is exactly the input of ``readers`` and nothing else, so that AWQ can divide its
    output channels (``rows``: all, or the last ``n`` of a fused layer) by the scales it multiplies the
    readers' input columns by, leaving the model's function unchanged."""

    source: str
    readers: tuple[str, ...]
    last_rows: int | None = None  # only the last rows of ``source`` (the up half of a fused gate-up)
    norm_offset: float = 0.0


def folds(layout: BlockLayout, block: nn.Module) -> list[Fold]:
    """AWQ's scaling folds in one block of ``layout`` (the reference code's smoothing pairs).

    The pre-norms fold into the layers reading them (both the attention and the MLP in parallel blocks);
    a separate value projection folds into the attention output when their widths agree (not under
    grouped-query attention); the "up" projection of a gated MLP folds into the MLP output.
    """
    found = []
    if layout.attention_norm and layout.attention_norm == layout.mlp_norm:
        found.append(Fold(layout.attention_norm, layout.attention + layout.mlp_in, None, layout.norm_offset))
    else:
        if layout.attention_norm:
            found.append(Fold(layout.attention_norm, layout.attention, None, layout.norm_offset))
        if layout.mlp_norm and layout.mlp_in:
            found.append(Fold(layout.mlp_norm, layout.mlp_in, None, layout.norm_offset))
    out = block.get_submodule(layout.attention_out)
    if not layout.fused_qkv:
        value = block.get_submodule(layout.attention[-1])
        if value.out_features == out.in_features:
            found.append(Fold(layout.attention[-1], (layout.attention_out,)))
    if layout.gated and layout.mlp_out:
        down = block.get_submodule(layout.mlp_out)
        if len(layout.mlp_in) == 2:
            found.append(Fold(layout.mlp_in[1], (layout.mlp_out,)))
        else:
            found.append(Fold(layout.mlp_in[0], (layout.mlp_out,), last_rows=down.in_features))
    return found
