"""Model-level GPTQ/AWQ: block-wise capture, grouping by shared input, padding masks, folding, quality."""

import copy

import pytest
import torch
from sample_texts import TEXTS

from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, compress
from weightkit.compress.quant.blockwise import calibrate_block, capture_block_inputs, input_groups
from weightkit.compress.quant.calibrated import _divide_output, _fold_target, calibration_batches
from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.models import transformer_blocks
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import tiny_bert, tiny_llama, tiny_tokenizer

CALIB, HELD_OUT = TEXTS[:16], TEXTS[16:]


def _batches(tokenizer, texts, batch_size=4):
    return tokenize_batches(tokenizer, texts, max_length=64, batch_size=batch_size)


@pytest.fixture(params=["causal-lm", "encoder"])
def model_and_tokenizer(request):
    if request.param == "causal-lm":
        return tiny_llama(seed=1), tiny_tokenizer(128), request.param
    return tiny_bert(seed=1), tiny_tokenizer(128, kind="encoder"), request.param


def run_block(block, inputs):
    return calibrate_block(block, [], inputs, on_input=None)


def _output(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_captured_inputs_replayed_through_the_blocks_reproduce_the_model(model_and_tokenizer):
    model, tokenizer, kind = model_and_tokenizer
    batches = _batches(tokenizer, CALIB)
    blocks = transformer_blocks(model, kind)
    inputs = capture_block_inputs(model, blocks[0], batches)
    for block in blocks:
        inputs.hidden = run_block(block, inputs)
    for batch, hidden in zip(batches, inputs.hidden, strict=True):
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states[-1]
        if kind == "causal-lm":  # Llama's last hidden state is after the final norm
            hidden = model.model.norm(hidden)
        torch.testing.assert_close(hidden, states)


def test_linears_are_grouped_by_shared_input_in_call_order(model_and_tokenizer):
    model, tokenizer, kind = model_and_tokenizer
    block = transformer_blocks(model, kind)[0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:4]))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {
        "causal-lm": [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["self_attn.o_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ],
        "encoder": [
            ["attention.self.query", "attention.self.key", "attention.self.value"],
            ["attention.output.dense"],
            ["intermediate.dense"],
            ["output.dense"],
        ],
    }[kind]
    assert input_groups(block, linears, inputs) == expected


def test_padding_never_reaches_the_statistics():
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer(128)
    block = model.model.layers[0]
    texts = CALIB[:6]
    padded = capture_block_inputs(model, block, _batches(tokenizer, texts, batch_size=6))
    alone = capture_block_inputs(model, block, _batches(tokenizer, texts, batch_size=1))
    seen_padded, seen_alone = [], []
    calibrate_block(block, [block.mlp.down_proj], padded, lambda _i, x: seen_padded.append(x))
    calibrate_block(block, [block.mlp.down_proj], alone, lambda _i, x: seen_alone.append(x))
    x_padded, x_alone = torch.cat(seen_padded), torch.cat(seen_alone)
    assert x_padded.shape[0] == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    torch.testing.assert_close(x_padded, x_alone, atol=1e-5, rtol=1e-4)


def test_calibration_pass_holds_every_batch_until_the_layer_is_changed():
    # Changing v_proj once all batches reached q/k/v must show in what o_proj and down_proj receive
    # and in the block's outputs, exactly as a fresh pass with the changed weights would give.
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer(128)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:8], batch_size=3))
    modules = [block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.down_proj]
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    reached = []

    def on_all_reached(i):
        assert len(seen[i]) == len(inputs)  # every batch is there before anything changes
        reached.append(i)
        if i == 0:
            block.self_attn.v_proj.weight.data.mul_(-2)

    outputs = calibrate_block(block, modules, inputs, lambda i, x: seen[i].append(x), on_all_reached)
    assert reached == [0, 1, 2]
    fresh: dict[int, list] = {0: [], 1: [], 2: []}
    fresh_outputs = calibrate_block(block, modules, inputs, lambda i, x: fresh[i].append(x))
    for i in (1, 2):
        torch.testing.assert_close(torch.cat(seen[i]), torch.cat(fresh[i]))
    for a, b in zip(outputs, fresh_outputs, strict=True):
        torch.testing.assert_close(a, b)


def test_a_failing_calibration_step_stops_every_paused_pass():
    import gc

    import greenlet

    def paused_passes():  # started, unfinished forward passes (no gc run: they must end at once)
        return [g for g in gc.get_objects() if type(g) is greenlet.greenlet and g and g.parent]

    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer(128)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:8], batch_size=2))
    expected = run_block(block, inputs)

    def fail(i):
        assert len(paused_passes()) == len(inputs)
        raise WeightkitError("stop here")

    with pytest.raises(WeightkitError, match="stop here"):
        calibrate_block(block, [block.self_attn.o_proj], inputs, lambda i, x: None, fail)
    assert paused_passes() == []
    # Layers listed out of call order are refused, naming the problem.
    with pytest.raises(WeightkitError, match="called layer number 1"):
        modules = [block.mlp.down_proj, block.self_attn.o_proj]
        calibrate_block(block, modules, inputs, lambda i, x: None, lambda i: None)
    assert paused_passes() == []
    # No pause hook is left behind: the block runs as before.
    for a, b in zip(run_block(block, inputs), expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("source", ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"])
def test_awq_scale_folding_leaves_the_llama_block_function_unchanged(source):
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer(128)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:4]))
    before = run_block(block, inputs)
    readers = {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.up_proj": ["mlp.down_proj"],
    }[source]
    group = {n: block.get_submodule(n) for n in readers}
    op = _fold_target(block, group)
    assert op is block.get_submodule(source)
    s = torch.rand(op.weight.shape[0]) * 4 + 0.25
    _divide_output(op, s)
    for m in group.values():
        m.weight.data.mul_(s)
    for a, b in zip(before, run_block(block, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_awq_folds_nothing_where_it_would_change_the_function():
    llama = tiny_llama(seed=0)  # grouped-query attention: v_proj is narrower than o_proj's input
    block = llama.model.layers[0]
    assert _fold_target(block, {"self_attn.o_proj": block.self_attn.o_proj}) is None
    assert _fold_target(block, {"self_attn.q_proj": block.self_attn.q_proj}) is None  # k, v also read it
    bert = tiny_bert(seed=0).encoder.layer[0]  # post-norm: the norm's output is also the residual
    assert _fold_target(bert, {"intermediate.dense": bert.intermediate.dense}) is None
    assert _fold_target(bert, {"attention.output.dense": bert.attention.output.dense}) is not None


def _relative_error(reference, model, batches):
    num = den = 0.0
    for batch in batches:
        ref, out = _output(reference, batch), _output(model, batch)
        mask = batch["attention_mask"].bool()
        num += (ref - out)[mask].pow(2).sum().item()
        den += ref[mask].pow(2).sum().item()
    return (num / den) ** 0.5


@pytest.mark.parametrize("method", [GPTQConfig, AWQConfig])
def test_calibrated_methods_beat_rtn_on_held_out_text(model_and_tokenizer, method):
    model, tokenizer, _ = model_and_tokenizer
    held_out = _batches(tokenizer, HELD_OUT)
    errors = {}
    for config in (RTNConfig(bits=3, group_size=None), method(bits=3, group_size=None, calib_max_length=64)):
        quantized = compress(copy.deepcopy(model), config, data=CALIB, tokenizer=tokenizer, progress=False)
        errors[type(config).__name__] = _relative_error(model, quantized, held_out)
    assert errors[method.__name__] < 0.95 * errors["RTNConfig"], errors


def test_compress_swaps_every_selected_linear_and_keeps_embeddings_and_head():
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    compress(model, GPTQConfig(bits=4, group_size=32), data=CALIB, tokenizer=tokenizer, progress=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("proj") or n == "lm_head"}
    assert kinds.pop("lm_head") == "Linear"
    assert set(kinds.values()) == {"QuantizedLinear"} and len(kinds) == 14
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.scheme.group_size == 32


def test_overrides_pick_a_grid_per_module():
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    config = GPTQConfig(bits=4, group_size=32, overrides={"re:.*down_proj": {"bits": 8, "group_size": None}})
    compress(model, config, data=CALIB, tokenizer=tokenizer, progress=False)
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert model.model.layers[0].mlp.down_proj.scheme.group_size is None
    assert model.model.layers[0].mlp.up_proj.scheme.bits == 4


def test_calibration_needs_text_and_a_tokenizer():
    model = tiny_llama(seed=0)
    with pytest.raises(WeightkitError, match="tokenizer"):
        compress(model, GPTQConfig(group_size=32), data=CALIB, progress=False)
    with pytest.raises(WeightkitError, match="empty"):
        calibration_batches(GPTQConfig(), [], tiny_tokenizer(128))


def test_minilm_at_8_bits_keeps_sentence_embeddings(minilm):
    from weightkit.data import stdlib_docstrings
    from weightkit.eval import embedding_fidelity

    reference, tokenizer = minilm
    model = compress(copy.deepcopy(reference), RTNConfig(bits=8, group_size=128), progress=False)
    assert embedding_fidelity(reference, model, tokenizer, stdlib_docstrings("eval")[:64]) > 0.999


def test_awq_folds_every_scale_before_rounding_anything():
    # With kv heads == heads, v_proj -> o_proj and up_proj -> down_proj fold into layers of earlier
    # groups; folding into an already-rounded layer would leave its stored weight unscaled and
    # change the model far beyond 8-bit rounding error.
    model, tokenizer = tiny_llama(seed=3, num_key_value_heads=4), tiny_tokenizer(128)
    assert _fold_target(model.model.layers[0], {"self_attn.o_proj": model.model.layers[0].self_attn.o_proj})
    held_out = _batches(tokenizer, HELD_OUT)
    errors = {}
    for config in (RTNConfig(bits=8, group_size=None), AWQConfig(bits=8, group_size=None, clip=False)):
        quantized = compress(copy.deepcopy(model), config, data=CALIB, tokenizer=tokenizer, progress=False)
        errors[type(config).__name__] = _relative_error(model, quantized, held_out)
    assert errors["AWQConfig"] < 1.5 * errors["RTNConfig"] < 0.01, errors


def test_awq_statistics_streamed_by_batch_equal_those_of_all_tokens():
    from weightkit.compress.quant.awq import even_sample
    from weightkit.compress.quant.calibrated import _AWQInputStats
    from weightkit.compress.quant.hessian import Hessian

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 8, generator=g) for n in (7, 0, 30, 12, 1)]
    everything = torch.cat(chunks)
    stats = _AWQInputStats(even_sample(len(everything), 10), scaled=True)
    for chunk in chunks:
        stats.add(chunk)
    assert stats.count == len(everything)
    whole = Hessian()
    whole.add(everything)
    torch.testing.assert_close(stats.hessian.value(), whole.value())
    torch.testing.assert_close(stats.abs_sum / stats.count, everything.abs().mean(dim=0))
    assert torch.equal(torch.cat(stats.sample), everything[even_sample(len(everything), 10)])
