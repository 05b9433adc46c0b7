"""The architectures and methods the PEFT-interop suite runs (tests/adapt/test_peft_interop.py).

Each architecture is a tiny seeded model from a transformers config, the inputs it takes and how to read
its output. ``bench/tables.py`` renders the README's interop table from :data:`CASES`, so the table lists
exactly what the suite checks, and the suite fails if a row stops holding.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from weightkit.testing import tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3]])
_DECODER = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], nn.Module]  # a fresh model, the same weights on every call
    inputs: dict
    task_type: str | None = None  # PEFT's task type for resolving "all-linear"
    head: tuple[str, ...] = ()  # trained in full (modules_to_save)
    extra_targets: tuple[str, ...] = ()  # besides "all-linear": a non-linear layer too
    output: str = "logits"


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build():
        torch.manual_seed(0)
        return make().eval()

    return build


class _MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):  # keyword input, like the transformers models
        return super().forward(x)


ARCHITECTURES = [
    Architecture("Llama (tied embeddings)", lambda: tiny_llama(seed=0, tie_word_embeddings=True).eval(),
                 {"input_ids": IDS}),
    Architecture("Qwen2", _seeded(lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER, **_HEADS))),
                 {"input_ids": IDS}),
    Architecture("Mistral", _seeded(lambda: MistralForCausalLM(MistralConfig(**_DECODER, **_HEADS))),
                 {"input_ids": IDS}),
    Architecture("OPT", _seeded(lambda: OPTForCausalLM(OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64,
    ))), {"input_ids": IDS}),
    Architecture("GPT-2 (Conv1D layers)", lambda: tiny_gpt2(seed=0), {"input_ids": IDS}),
    Architecture("BERT (sequence classifier)", _seeded(lambda: BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3,
    ))), {"input_ids": IDS}, task_type="SEQ_CLS", head=("classifier",)),
    Architecture("T5 (encoder-decoder)", _seeded(lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0,
    ))), {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}),
    Architecture("ViT (image classifier)", _seeded(lambda: ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=3,
    ))), {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))},
        task_type="SEQ_CLS", head=("classifier",),
        extra_targets=("vit.embeddings.patch_embeddings.projection",)),
    Architecture("MLP (plain torch)", _seeded(_MLP),
                 {"x": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))}, output=""),
]  # fmt: skip

METHODS = {"LoRA": {}, "DoRA": {"use_dora": True}}
DIRECTIONS = ("weightkit -> PEFT", "PEFT -> weightkit")

# (architecture, method, direction): every combination the suite checks; each must give PEFT's outputs.
CASES = [
    (arch.name, method, direction) for arch in ARCHITECTURES for method in METHODS for direction in DIRECTIONS
]
