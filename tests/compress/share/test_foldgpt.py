"""FoldGPT: block removal by input/output similarity, and group sharing with least-squares gates."""

import pytest
import torch
from sample_texts import TEXTS

from weightkit.arch import model_task
from weightkit.compress import compress
from weightkit.compress.quant.blockwise import capture_block_inputs
from weightkit.compress.share.foldgpt import (
    FoldGPTConfig,
    block_similarities,
    blocks_to_drop,
    drop_blocks,
    sharing_groups,
)
from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.inspect.similarity import activation_similarity
from weightkit.quantized.shared import SharedLinear
from weightkit.testing import model_output, tiny_bert, tiny_llama, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENIZER = tiny_tokenizer(128)
CALIBRATION = dict(calib_max_length=64, calib_batch_size=4)
HELD_OUT = TOKENIZER(TEXTS[16:24], return_tensors="pt", padding=True)


def _config(**fields) -> FoldGPTConfig:
    return FoldGPTConfig(**fields, **CALIBRATION)


def _fold(model, **fields):
    return compress(model, _config(**fields), data=TEXTS[:16], tokenizer=TOKENIZER, progress=False)


def _logits(model):
    with torch.no_grad():
        return model(**HELD_OUT).logits


def _loss(model) -> float:
    labels = HELD_OUT["input_ids"].masked_fill(HELD_OUT["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**HELD_OUT, labels=labels).loss)


def _planted(index=2, layers=4):
    """A tiny Llama whose block ``index`` barely changes its input (its output projections scaled down)."""
    model = tiny_llama(seed=0, num_hidden_layers=layers)
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[index].mlp.down_proj.weight.mul_(1e-3)
    return model


# -- pure functions ----------------------------------------------------------------------------------------


def test_blocks_to_drop_takes_the_most_similar_blocks_in_order():
    similarities = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1], dtype=torch.float64)
    assert blocks_to_drop(similarities, 2) == [1, 3]
    assert blocks_to_drop(similarities, 1) == [1]  # of equal similarities, the earlier block
    assert blocks_to_drop(similarities, 3) == [1, 2, 3]
    assert blocks_to_drop(similarities, 0) == []
    with pytest.raises(WeightkitError, match="fewer than the model's 5 blocks"):
        blocks_to_drop(similarities, 5)


def test_sharing_groups_are_consecutive_runs():
    assert sharing_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert sharing_groups(4, 4) == [[0, 1, 2, 3]]
    assert sharing_groups(3, 1) == [[0], [1], [2]]
    with pytest.raises(WeightkitError, match="between 1 and the 3 blocks kept"):
        sharing_groups(3, 4)


# -- on a model --------------------------------------------------------------------------------------------


def test_block_similarities_equal_inspects_input_output_cosine():
    model = tiny_llama(seed=1, num_hidden_layers=3)
    batches = tokenize_batches(TOKENIZER, TEXTS[:12], max_length=64, batch_size=4, by_length=True)
    reference = activation_similarity(model, batches).rows
    inputs = capture_block_inputs(model, model.model.layers[0], batches, torch.device("cpu"))
    got = block_similarities(model.model.layers, inputs, torch.device("cpu"))
    torch.testing.assert_close(
        got, torch.tensor([r["cosine_in_out"] for r in reference], dtype=torch.float64)
    )


def test_removing_the_near_identity_block_hurts_held_out_loss_least():
    original = _planted(index=2)
    loss, logits = _loss(original), _logits(original)
    folded = _fold(_planted(index=2), drop=1, share=1)
    assert folded.config.num_hidden_layers == len(folded.model.layers) == 3
    # FoldGPT removed the planted block: the output is that of the model without it.
    torch.testing.assert_close(_logits(folded), _logits(drop_blocks(_planted(index=2), [2])))
    harm = abs(_loss(folded) - loss)
    for other in (0, 1, 3):
        dropped = drop_blocks(_planted(index=2), [other])
        assert harm < abs(_loss(dropped) - loss) / 10, other
        assert (_logits(folded) - logits).norm() < (_logits(dropped) - logits).norm() / 10, other


@pytest.mark.parametrize("model_type", ["gemma2", "qwen2", "llama", "bert"])
def test_a_model_with_dropped_blocks_saves_and_loads_in_transformers(tmp_path, model_type):
    model = tiny_model(model_type)
    if model_type == "gemma2":
        assert model.config.layer_types == ["sliding_attention", "full_attention"]
    drop_blocks(model, [0])
    assert model.config.num_hidden_layers == 1
    blocks = model.encoder.layer if model_type == "bert" else model.model.layers
    attention = blocks[0].attention.self if model_type == "bert" else blocks[0].self_attn
    assert attention.layer_idx == 0
    if model_type == "gemma2":
        assert model.config.layer_types == ["full_attention"] and attention.sliding_window is None
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 1
    task = model_task(model.config.to_dict())
    torch.testing.assert_close(model_output(loaded, task), model_output(model, task))


def test_learned_gates_bring_the_shared_model_closer_than_gates_of_one():
    logits = _logits(tiny_llama(seed=0, num_hidden_layers=4))
    plain = _fold(tiny_llama(seed=0, num_hidden_layers=4), drop=0, share=2, steps=0)
    learned = _fold(tiny_llama(seed=0, num_hidden_layers=4), drop=0, share=2, steps=40, lr=0.05)
    for model in (plain, learned):  # each group's first block keeps its own weights: gates of one
        for i in (0, 2):
            assert all(
                torch.equal(m.coefficients, torch.ones_like(m.coefficients))
                for m in _shared(model.model.layers[i])
            )
    assert all(
        torch.equal(m.coefficients, torch.ones_like(m.coefficients)) for m in _shared(plain.model.layers[1])
    )
    assert not all(
        torch.equal(m.coefficients, torch.ones_like(m.coefficients)) for m in _shared(learned.model.layers[1])
    )
    assert (_logits(learned) - logits).norm() < 0.9 * (_logits(plain) - logits).norm()


def _shared(block) -> list[SharedLinear]:
    return [m for m in block.modules() if isinstance(m, SharedLinear)]


def test_blocks_of_a_group_share_one_parameter_per_layer_and_keep_their_norms():
    model = tiny_llama(seed=2, num_hidden_layers=5)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.input_layernorm.weight.add_(i)  # tell the blocks' norms apart
    norms = [block.input_layernorm.weight.clone() for block in model.model.layers]
    _fold(model, drop=1, share=2, steps=0)
    layers = model.model.layers
    assert len(layers) == 4
    for group in ((0, 1), (2, 3)):
        first, second = (dict(layers[i].named_modules()) for i in group)
        for name, module in first.items():
            if isinstance(module, SharedLinear):
                assert second[name].atoms is module.atoms, name
    assert layers[0].self_attn.q_proj.atoms is not layers[2].self_attn.q_proj.atoms
    kept = [block.input_layernorm.weight for block in layers]
    assert all(any(torch.equal(k, n) for n in norms) for k in kept)
    assert len({float(k.detach().mean()) for k in kept}) == 4  # each block its own norm


def test_an_encoders_shared_layers_keep_their_own_bias():
    model = tiny_bert(seed=0, num_hidden_layers=2)
    own_bias = model.encoder.layer[1].attention.self.query.bias.clone()
    compress(
        model,
        _config(drop=0, share=2, steps=0),
        data=TEXTS[:16],
        tokenizer=tiny_tokenizer(128, kind="encoder"),
        progress=False,
    )
    second = model.encoder.layer[1].attention.self.query
    assert (
        torch.equal(second.bias, own_bias)
        and second.atoms is model.encoder.layer[0].attention.self.query.atoms
    )


@pytest.mark.parametrize(
    ("make", "fields", "message"),
    [
        (lambda: tiny_llama(num_hidden_layers=3), {"drop": 3}, "fewer than the model's 3 blocks"),
        (lambda: tiny_llama(num_hidden_layers=3), {"drop": 1, "share": 3}, "between 1 and the 2 blocks kept"),
        (lambda: tiny_model("gpt2"), {"drop": 1}, "does not know how to remove blocks from a 'gpt2'"),
        (lambda: tiny_model("phi3"), {"drop": 1}, "'phi3'"),
    ],
)
def test_bad_input_is_refused_with_the_model_unchanged(make, fields, message):
    model = make()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(WeightkitError, match=message):
        _fold(model, **fields)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"drop": -1}, "drop must be at least 0"),
        ({"share": 0}, "share must be at least 1"),
        ({"drop": 0, "share": 1}, "leave the model as it is"),
        ({"steps": -1}, "steps must be a whole number at least 0"),
        ({"lr": 0.0}, "lr must be a positive number"),
    ],
)
def test_config_validates_itself(fields, message):
    with pytest.raises(WeightkitError, match=message):
        FoldGPTConfig(**fields)


@pytest.mark.parametrize("drop", [[4], [0, 1, 2, 3], [-1]])
def test_drop_blocks_refuses_indices_that_are_not_some_of_the_blocks(drop):
    model = tiny_llama(num_hidden_layers=4)
    with pytest.raises(WeightkitError, match="cannot drop blocks"):
        drop_blocks(model, drop)
    assert len(model.model.layers) == model.config.num_hidden_layers == 4


@pytest.mark.parametrize("fields", [{"drop": 1, "share": 1}, {"drop": 0, "share": 2}])
def test_calibration_data_without_tokens_is_refused_before_any_change(fields):
    model = tiny_llama(num_hidden_layers=4)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    padding = [{"input_ids": torch.full((2, 5), 3), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(WeightkitError, match="no tokens"):
        compress(model, FoldGPTConfig(**fields), data=padding, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
