"""weightkit.models: model kinds, offline loading, blocks, and the tiny builders used across the tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

from weightkit.compress.quant.export import save_quantized
from weightkit.compress.quant.grid import QuantScheme, rtn_quantize
from weightkit.compress.quant.module import QuantizedLinear
from weightkit.errors import WeightkitError
from weightkit.models import (
    default_model_path,
    load_model,
    model_kind,
    save_tiny,
    tiny_bert,
    tiny_llama,
    tiny_tokenizer,
    transformer_blocks,
)


def test_model_kind():
    assert model_kind({"model_type": "llama"}) == "causal-lm"
    assert model_kind({"model_type": "qwen2"}) == "causal-lm"
    assert model_kind({"model_type": "bert"}) == "encoder"
    assert model_kind({"model_type": "roberta"}) == "encoder"
    assert model_kind(tiny_llama().config.to_dict()) == "causal-lm"
    with pytest.raises(WeightkitError) as err:
        model_kind({"model_type": "gpt2"})
    message = str(err.value)
    assert "'gpt2'" in message
    for supported in ("llama", "mistral", "qwen2", "bert", "roberta"):
        assert supported in message
    with pytest.raises(WeightkitError, match="None"):
        model_kind({})


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2"])
def test_causal_lm_kinds_have_the_llama_module_layout(model_type):
    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    blocks = transformer_blocks(model, model_kind(config.to_dict()))
    assert len(blocks) == 2
    linears = {n for n, m in blocks[1].named_modules() if isinstance(m, nn.Linear)}
    assert linears == {f"self_attn.{p}_proj" for p in "qkvo"} | {
        f"mlp.{p}_proj" for p in ("gate", "up", "down")
    }


def test_transformer_blocks_of_bare_and_wrapped_models():
    llama = tiny_llama()
    assert transformer_blocks(llama, "causal-lm") is llama.model.layers
    assert transformer_blocks(llama.model, "causal-lm") is llama.model.layers
    bert = tiny_bert()
    assert transformer_blocks(bert, "encoder") is bert.encoder.layer
    mlm = transformers.BertForMaskedLM(bert.config)
    assert transformer_blocks(mlm, "encoder") is mlm.bert.encoder.layer
    with pytest.raises(WeightkitError, match="encoder.layer"):
        transformer_blocks(llama, "encoder")
    with pytest.raises(WeightkitError, match="model.layers"):
        transformer_blocks(nn.Linear(2, 2), "causal-lm")
    with pytest.raises(WeightkitError, match="unknown model kind"):
        transformer_blocks(llama, "decoder")


def test_tiny_builders_are_small_and_seeded():
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert not a.training
    cfg = a.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 128)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3
    bert = tiny_bert(seed=0)
    assert isinstance(bert, transformers.BertModel) and not bert.training
    assert (bert.config.hidden_size, bert.config.num_hidden_layers, bert.config.vocab_size) == (32, 2, 128)
    assert torch.equal(
        bert.encoder.layer[0].output.dense.weight, tiny_bert(seed=0).encoder.layer[0].output.dense.weight
    )


def test_tiny_tokenizer_causal_lm():
    tok = tiny_tokenizer(128)
    assert tok.get_vocab() == tiny_tokenizer(128).get_vocab()  # deterministic
    assert len(tok) == 128
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "The weights of a model are rounded onto a grid."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert max(ids) < 128
    assert tok.unk_token_id not in ids  # every letter of the text is in the vocabulary
    assert len(ids) < len(text) / 2  # merges learned real subwords, not one id per character
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # It drives a tiny Llama of the same vocabulary.
    batch = tok([text, "a fox"], return_tensors="pt", padding=True)
    logits = tiny_llama()(**batch).logits
    assert logits.shape[:2] == batch.input_ids.shape


def test_tiny_tokenizer_encoder():
    tok = tiny_tokenizer(128, kind="encoder")
    ids = tok("the quick brown fox").input_ids
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert max(ids) < 128
    with pytest.raises(WeightkitError, match="too small"):
        tiny_tokenizer(20)
    with pytest.raises(WeightkitError, match="unknown tokenizer kind"):
        tiny_tokenizer(128, kind="vision")


def test_load_model_round_trips_a_saved_tiny_model(tmp_path):
    model, tok = tiny_llama(seed=2), tiny_tokenizer(128)
    out = save_tiny(model, tmp_path / "llama", tok)
    loaded, loaded_tok, kind = load_model(out)
    assert kind == "causal-lm" and isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    ids = tok(["the lazy dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16, _, _ = load_model(out, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16

    bert_dir = save_tiny(tiny_bert(), tmp_path / "bert")
    bert, no_tok, kind = load_model(bert_dir)
    assert kind == "encoder" and isinstance(bert, transformers.BertModel) and no_tok is None


def test_load_model_returns_quantized_layers_for_a_quantized_dir(tmp_path):
    model = tiny_llama(seed=3)
    src = save_tiny(model, tmp_path / "src", tiny_tokenizer(128))
    name = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    model.set_submodule(
        name, QuantizedLinear.from_linear(linear, rtn_quantize(linear.weight.detach(), QuantScheme(4, 32)))
    )
    out = save_quantized(model, tmp_path / "q", source_dir=src)
    loaded, tok, kind = load_model(out)
    assert kind == "causal-lm" and tok is not None
    assert isinstance(loaded.get_submodule(name), QuantizedLinear)
    assert torch.equal(loaded.get_submodule(name).qweight, model.get_submodule(name).qweight)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, nn.Linear)


def test_load_model_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(WeightkitError):
        load_model(tmp_path)  # empty
    (tmp_path / "README.md").write_text("# notes")
    with pytest.raises(WeightkitError):
        load_model(tmp_path)
    with pytest.raises(WeightkitError):
        load_model(tmp_path / "missing")
    # Pickle weights are refused, naming the file.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = tiny_bert()
    model.config.to_json_file(pickled / "config.json")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(WeightkitError, match="pytorch_model.bin"):
        load_model(pickled)
    # A real model of an unsupported architecture: the error names it.
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    save_tiny(transformers.GPT2LMHeadModel(config), gpt2)
    assert json.loads((gpt2 / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(WeightkitError, match="gpt2"):
        load_model(gpt2)


def test_default_model_loads_offline_and_embeds_meaningfully():
    """The bundled MiniLM, with the hub switched off before anything imports it (a fresh interpreter)."""
    script = textwrap.dedent(
        """
        import json, torch
        from weightkit.models import default_model_path, load_model
        model, tok, kind = load_model(default_model_path())
        texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell today."]
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
        print(json.dumps({"kind": kind, "cls": type(model).__name__, "shape": list(hidden.shape),
                          "training": model.training, "near": near, "far": far}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == "encoder" and result["cls"] == "BertModel" and not result["training"]
    assert result["shape"][0] == 3 and result["shape"][2] == 384
    # A pretrained sentence encoder puts paraphrases much closer than unrelated sentences.
    assert result["near"] > result["far"] + 0.3
    assert (default_model_path() / "config.json").is_file()
