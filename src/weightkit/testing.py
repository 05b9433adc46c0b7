"""Tiny, seeded models and tokenizers for tests, examples and benchmarks (built offline, no downloads)."""

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from weightkit.errors import WeightkitError

__all__ = [
    "tiny_llama",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_model",
    "example_inputs",
    "model_output",
    "TINY_CONFIGS",
    "tiny_tokenizer",
    "save_tiny",
]


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


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer GPT-2 (hidden size 32, vocabulary 128) in eval mode, for tests.

    Its attention and MLP projections are transformers' ``Conv1D`` layers, whose weights are stored
    ``in x out`` (``c_attn`` 32x96, ``attn.c_proj`` 32x32, ``c_fc`` 32x128, ``mlp.c_proj`` 128x32).

    Args:
        seed: torch seed for the initial weights.
        **overrides: any ``GPT2Config`` field.
    """
    fields = dict(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**fields)).eval()


# Config fields of a tiny model of each architecture the test suite covers (hidden size 32, 2 blocks,
# vocabulary 128, 4 heads; grouped-query attention where the architecture has it).
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=128, max_position_embeddings=128, pad_token_id=3, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_ENCODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
    max_position_embeddings=128, type_vocab_size=2, pad_token_id=0,
)  # fmt: skip
TINY_CONFIGS = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "olmo2": _DECODER,
    "phi3": _DECODER,
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt2": dict(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    ),
    "opt": dict(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    ),
    "falcon": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, bos_token_id=1,
        eos_token_id=2,
    ),
    "bert": _ENCODER,
    "roberta": {**_ENCODER, "pad_token_id": 0, "max_position_embeddings": 130},
    "t5": dict(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=128, pad_token_id=0,
        eos_token_id=2, decoder_start_token_id=0,
    ),
    "vit": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, num_channels=3,
    ),
}  # fmt: skip


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of ``model_type`` (one of :data:`TINY_CONFIGS`), in eval mode.

    Causal LMs come with their LM head, encoder-decoders as ``...ForConditionalGeneration``, encoders and
    image models bare (``BertModel``, ``ViTModel``), as :func:`weightkit.models.load_model` loads them.
    """
    from transformers import AutoConfig

    from weightkit.arch import model_task
    from weightkit.models import model_auto_class

    if model_type not in TINY_CONFIGS:
        raise WeightkitError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_CONFIGS)}")
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    torch.manual_seed(seed)
    return model_auto_class(model_task(config.to_dict())).from_config(config).eval()


def example_inputs(task: str) -> dict:
    """Fixed inputs for a tiny model of :func:`weightkit.arch.model_task` ``task``: two 12-token sequences
    (and the first 6 as the decoder's for ``seq2seq``), or two random 32x32 images for ``vision``."""
    generator = torch.Generator().manual_seed(0)
    if task == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    ids = torch.randint(4, 128, (2, 12), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        inputs["decoder_input_ids"] = ids[:, :6]
    return inputs


def model_output(model: nn.Module, task: str) -> torch.Tensor:
    """``model``'s logits (or last hidden state) on :func:`example_inputs`, without gradients."""
    with torch.no_grad():
        out = model(**example_inputs(task))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


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
