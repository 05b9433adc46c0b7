"""Model-level GPTQ/AWQ: block-wise capture, grouping by shared input, padding masks, folding, quality."""

import copy
import weakref

import pytest
import torch
from sample_texts import TEXTS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from weightkit.arch import block_layout, block_lists, folds
from weightkit.compress import AWQConfig, GPTQConfig, RTNConfig, VPTQConfig, compress
from weightkit.compress.quant.blockwise import capture_block_inputs, input_groups, run_batches
from weightkit.compress.quant.calibrated import _divide_output, _fold_for, calibration_batches
from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import tiny_bert, tiny_llama, tiny_tokenizer

CALIB, HELD_OUT = TEXTS[:16], TEXTS[16:]
CPU = torch.device("cpu")


def _batches(tokenizer, texts, batch_size=4):
    return tokenize_batches(tokenizer, texts, max_length=64, batch_size=batch_size)


@pytest.fixture(params=["causal-lm", "encoder"])
def model_and_tokenizer(request):
    if request.param == "causal-lm":
        return tiny_llama(seed=1), tiny_tokenizer(128), request.param
    return tiny_bert(seed=1), tiny_tokenizer(128, kind="encoder"), request.param


def run_block(block, inputs):
    return run_batches(block, inputs, CPU)


def _output(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_captured_inputs_replayed_through_the_blocks_reproduce_the_model(model_and_tokenizer):
    model, tokenizer, kind = model_and_tokenizer
    batches = _batches(tokenizer, CALIB)
    [(_, blocks)] = block_lists(model)
    inputs = capture_block_inputs(model, blocks[0], batches, CPU)
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
    block = block_lists(model)[0][1][0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:4]), CPU)
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
    assert input_groups(block, linears, inputs, CPU) == expected


def test_padding_never_reaches_the_statistics():
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer(128)
    block = model.model.layers[0]
    texts = CALIB[:6]
    padded = capture_block_inputs(model, block, _batches(tokenizer, texts, batch_size=6), CPU)
    alone = capture_block_inputs(model, block, _batches(tokenizer, texts, batch_size=1), CPU)
    seen_padded, seen_alone = [], []
    down = [block.mlp.down_proj]
    run_batches(block, padded, CPU, modules=down, on_input=lambda _i, x: seen_padded.append(x))
    run_batches(block, alone, CPU, modules=down, on_input=lambda _i, x: seen_alone.append(x), until=down[0])
    x_padded, x_alone = torch.cat(seen_padded), torch.cat(seen_alone)
    assert x_padded.shape[0] == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    torch.testing.assert_close(x_padded, x_alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("source", ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"])
def test_awq_scale_folding_leaves_the_llama_block_function_unchanged(source):
    model, tokenizer = tiny_llama(seed=2), tiny_tokenizer(128)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _batches(tokenizer, CALIB[:4]), CPU)
    before = run_block(block, inputs)
    readers = {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.up_proj": ["mlp.down_proj"],
    }[source]
    group = {n: block.get_submodule(n) for n in readers}
    fold = _fold_for(_folds(model, block), group)
    assert fold.source == source
    s = torch.rand(block.get_submodule(source).weight.shape[0]) * 4 + 0.25
    _divide_output(block, fold, s)
    for m in group.values():
        m.weight.data.mul_(s)
    for a, b in zip(before, run_block(block, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _folds(model, block):
    return folds(block_layout(model.config.to_dict(), block_lists(model)[0][0]), block)


def test_awq_folds_nothing_where_it_would_change_the_function():
    llama = tiny_llama(seed=0)  # grouped-query attention: v_proj is narrower than o_proj's input
    block = llama.model.layers[0]
    assert _fold_for(_folds(llama, block), {"self_attn.o_proj": block.self_attn.o_proj}) is None
    q_alone = {"self_attn.q_proj": block.self_attn.q_proj}  # k, v also read it
    assert _fold_for(_folds(llama, block), q_alone) is None
    bert = tiny_bert(seed=0)  # post-norm: the norm's output is also the residual
    layer = bert.encoder.layer[0]
    assert _fold_for(_folds(bert, layer), {"intermediate.dense": layer.intermediate.dense}) is None
    assert _fold_for(_folds(bert, layer), {"attention.output.dense": layer.attention.output.dense})


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
    block = model.model.layers[0]
    assert _fold_for(_folds(model, block), {"self_attn.o_proj": block.self_attn.o_proj})
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
    stats = _AWQInputStats(even_sample(len(everything), 10), scaled=True, needs_hessian=True)
    for chunk in chunks:
        stats.add(chunk)
    assert stats.count == len(everything)
    whole = Hessian()
    whole.add(everything)
    torch.testing.assert_close(stats.hessian.value(), whole.value())
    torch.testing.assert_close(stats.abs_sum / stats.count, everything.abs().mean(dim=0))
    assert torch.equal(torch.cat(stats.sample), everything[even_sample(len(everything), 10)])


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created while active and still referenced (a CPU memory gauge:
    each op's outputs are counted until the last Python tensor viewing their storage is gone)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [live tensors, bytes]
        self.now = self.peak = 0

    def _release(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.now -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                entry = self.refs.get(key)
                if entry is None:
                    entry = self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.now += entry[1]
                    self.peak = max(self.peak, self.now)
                entry[0] += 1
                weakref.finalize(t, self._release, key)
        return out


@pytest.mark.filterwarnings("ignore:GPTQ. the calibration data has")
def test_gptq_calibration_memory_does_not_grow_with_the_number_of_batches():
    # A wide MLP (512) next to narrow hidden states (32): what a batch's forward pass holds is far
    # more than what is captured per batch, so holding every batch's pass at once (as calibration
    # did before) multiplies the peak by the batch count; one batch at a time, only the captured
    # hidden states grow (about 10% here from 2 to 24 batches; it was 2.6x).
    tokenizer, text = tiny_tokenizer(128), " ".join(TEXTS[:3])
    config = GPTQConfig(bits=4, group_size=32, calib_batch_size=1, calib_max_length=128)
    peaks = {}
    for n_batches in (2, 24):
        model = tiny_llama(seed=0, num_hidden_layers=1, intermediate_size=512)
        with _LiveTensorBytes() as gauge:
            compress(model, config, data=[text] * n_batches, tokenizer=tokenizer, progress=False)
        peaks[n_batches] = gauge.peak
    assert peaks[24] < 1.3 * peaks[2], peaks


class _Seen(Exception):
    """Stops a run once a hook has recorded where things are."""


def _state(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].device == tensor.device and torch.equal(after[name], tensor), name


@pytest.mark.parametrize("method", [GPTQConfig, AWQConfig])
def test_calibration_captures_the_first_block_inputs_on_the_device(method):
    # The embeddings go to the device (meta here: it records placement without a GPU); the blocks
    # and the head stay where they are; after the run the model holds its own tensors again.
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    before, seen = _state(model), {}

    def record(module, args):
        seen["embeddings"], seen["token ids"] = module.weight.device, args[0].device
        seen["blocks"] = {p.device.type for p in model.model.layers.parameters()}
        seen["head"] = model.lm_head.weight.device
        raise _Seen

    model.model.embed_tokens.register_forward_pre_hook(record)
    with pytest.raises(_Seen):
        compress(model, method(group_size=16), data=CALIB, tokenizer=tokenizer, progress=False, device="meta")
    assert seen == {
        "embeddings": torch.device("meta"),
        "token ids": torch.device("meta"),
        "blocks": {"cpu"},
        "head": torch.device("cpu"),
    }
    _assert_unchanged(model, before)


@pytest.mark.parametrize("method", [GPTQConfig, AWQConfig])
def test_calibration_moves_one_block_and_one_batch_at_a_time_to_the_device(monkeypatch, method):
    # Block inputs captured on the CPU (as they are kept when computing on a GPU) must reach the
    # device batch by batch, together with the block being calibrated, and nothing else.
    from weightkit.compress.quant import calibrated

    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    twin, capture = copy.deepcopy(model), calibrated.capture_block_inputs
    monkeypatch.setattr(
        calibrated,
        "capture_block_inputs",
        lambda _model, _block, batches, _device: capture(twin, twin.model.layers[0], batches, CPU),
    )
    before, seen = _state(model), {}

    def record(module, args):
        seen["layer"], seen["input"] = module.weight.device, args[0].device
        seen["block"] = {p.device.type for p in model.model.layers[0].parameters()}
        seen["next block"] = {p.device.type for p in model.model.layers[1].parameters()}
        seen["embeddings"] = model.model.embed_tokens.weight.device
        raise _Seen

    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record)
    with pytest.raises(_Seen):
        compress(model, method(group_size=16), data=CALIB, tokenizer=tokenizer, progress=False, device="meta")
    assert seen == {
        "layer": torch.device("meta"),
        "input": torch.device("meta"),
        "block": {"meta"},
        "next block": {"cpu"},
        "embeddings": torch.device("cpu"),
    }
    _assert_unchanged(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", [GPTQConfig, AWQConfig])
def test_calibration_on_a_gpu_leaves_the_model_on_the_cpu_and_matches_the_cpu_result(method):
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    config = method(bits=4, group_size=16, calib_max_length=64)
    on_cpu = compress(copy.deepcopy(model), config, data=CALIB, tokenizer=tokenizer, progress=False)
    on_gpu = compress(model, config, data=CALIB, tokenizer=tokenizer, progress=False, device="cuda")
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cpu"}
    batch = _batches(tokenizer, HELD_OUT[:4])[0]
    torch.testing.assert_close(_output(on_gpu, batch), _output(on_cpu, batch), atol=1e-3, rtol=1e-3)


def test_gptq_calibrates_each_group_on_the_outputs_of_the_rounded_groups_before_it(monkeypatch):
    # "True sequential": the Hessian each group is quantized with must be the one of the inputs it
    # receives in the finished (quantized) model, not in the float one.
    from weightkit.compress.quant import calibrated
    from weightkit.compress.quant.hessian import Hessian

    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer(128)
    reference = copy.deepcopy(model)
    used = {}
    quantize_group = calibrated._gptq_group

    def record(prefix, group, h, config):
        used[f"{prefix}.{next(iter(group))}"] = h.clone()
        return quantize_group(prefix, group, h, config)

    monkeypatch.setattr(calibrated, "_gptq_group", record)
    batches = _batches(tokenizer, CALIB)
    compress(model, GPTQConfig(bits=3, group_size=16, hessian_shrinkage=False), data=batches, progress=False)

    firsts = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    for net, expect_equal in ((model, True), (reference, False)):
        inputs = capture_block_inputs(net, net.model.layers[0], batches, CPU)
        layers = [net.model.layers[0].get_submodule(n) for n in firsts]
        hessians = [Hessian() for _ in firsts]
        run_batches(
            net.model.layers[0], inputs, CPU, modules=layers, on_input=lambda i, x, hs=hessians: hs[i].add(x)
        )
        for name, hessian in zip(firsts[1:], hessians[1:], strict=True):
            same = torch.allclose(hessian.value(), used[f"model.layers.0.{name}"], rtol=1e-4, atol=1e-6)
            assert same == expect_equal, (name, expect_equal)


SHORT_SENTENCES = [
    "The cat sat on the mat.",
    "Stock prices fell sharply on Monday.",
    "She plays the violin every evening.",
    "Rain is expected later this week.",
]


@pytest.mark.parametrize("method", [GPTQConfig, AWQConfig])
def test_scarce_calibration_warns_with_the_tokens_needed_and_is_not_worse_than_rtn(minilm, method):
    # 36 tokens for layers up to 1536 inputs wide: the paper's GPTQ scored held-out cosine 0.88
    # here against round-to-nearest's 0.93 (issue 11).
    from weightkit.data import stdlib_docstrings
    from weightkit.eval import embedding_fidelity

    reference, tokenizer = minilm
    held_out = stdlib_docstrings("eval")[:48]
    rtn = compress(copy.deepcopy(reference), RTNConfig(bits=4, group_size=128), progress=False)
    with pytest.warns(UserWarning, match=r"36 tokens, fewer than the 1536 inputs.*at least 1536 tokens"):
        calibrated = compress(
            copy.deepcopy(reference),
            method(bits=4, group_size=128),
            data=SHORT_SENTENCES,
            tokenizer=tokenizer,
            progress=False,
        )
    fidelity = {
        name: embedding_fidelity(reference, model, tokenizer, held_out, max_length=128)
        for name, model in (("rtn", rtn), ("calibrated", calibrated))
    }
    assert fidelity["calibrated"] > fidelity["rtn"] - 0.01, fidelity


def test_awq_scores_q_k_v_at_the_attention_output_and_gate_up_at_the_mlp_output():
    from weightkit.compress.quant.calibrated import _inspected

    block = tiny_llama(seed=0).model.layers[0]
    group = {n: block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    assert _inspected(block, group) is block.self_attn
    assert (
        _inspected(block, {n: block.get_submodule(n) for n in ("mlp.gate_proj", "mlp.up_proj")}) is block.mlp
    )
    assert _inspected(block, {"mlp.down_proj": block.mlp.down_proj}) is None  # scored by its own output


@torch.no_grad()
def test_awq_module_losses_equal_a_plain_loop_over_the_batches(monkeypatch):
    # The streamed scoring (every candidate run inside the forward pass, batch by batch) must give,
    # per candidate, the squared error of the inspected module's output over all real tokens.
    from weightkit.compress.quant import calibrated

    calls = []
    module_losses = calibrated._module_losses

    def record(block, inputs, here, module, layers, candidates):
        losses = module_losses(block, inputs, here, module, layers, candidates)
        names = {m: n for n, m in block.named_modules()}
        # The inputs' hidden states are replaced when the block is done: keep this block's.
        calls.append((copy.copy(inputs), names[module], [names[m] for m in layers], candidates, losses))
        return losses

    monkeypatch.setattr(calibrated, "_module_losses", record)
    model, tokenizer = tiny_llama(seed=2, num_hidden_layers=1), tiny_tokenizer(128)
    reference_block = copy.deepcopy(model.model.layers[0])
    compress(model, AWQConfig(bits=3, group_size=16), data=_batches(tokenizer, CALIB), progress=False)
    assert [(module, layers) for _, module, layers, *_ in calls] == [
        ("self_attn", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("mlp", ["mlp.gate_proj", "mlp.up_proj"]),
    ]
    for inputs, module, layers, candidates, losses in calls:
        inspected = reference_block.get_submodule(module)
        copies = [reference_block.get_submodule(n) for n in layers]
        originals = [m.weight.data for m in copies]
        expected = torch.zeros(len(candidates), dtype=torch.float64)
        for b in range(len(inputs)):
            seen = {}

            def grab(_m, args, kwargs, seen=seen):
                seen["args"], seen["kwargs"] = args, kwargs

            handle = inspected.register_forward_pre_hook(grab, with_kwargs=True)
            hidden, args, kwargs = inputs.batch(b, CPU)
            reference_block(hidden, *args, **kwargs)
            handle.remove()
            mask = inputs.token_masks[b]
            reference = _first_output(inspected(*seen["args"], **seen["kwargs"]))[mask]
            for k, weights in enumerate(candidates):
                for m, w in zip(copies, weights, strict=True):
                    m.weight.data = w
                out = _first_output(inspected(*seen["args"], **seen["kwargs"]))[mask]
                expected[k] += float((out - reference).double().square().sum())
            for m, w in zip(copies, originals, strict=True):
                m.weight.data = w
        torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-9)


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def test_awq_searches_each_layer_on_its_own_grid_and_never_clips_query_or_key(monkeypatch):
    from weightkit.compress.quant import calibrated

    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer(128)
    attention = model.model.layers[0].self_attn
    names = {attention.get_submodule(n).weight.data_ptr(): n for n in ("q_proj", "k_proj", "v_proj")}
    searched, clipped = {}, []
    scaled_rtn, search_clip = calibrated.scaled_rtn, calibrated.awq_search_clip

    def record_search(w, s, scheme, *args):
        if w.data_ptr() in names:
            searched.setdefault(names[w.data_ptr()], set()).add(scheme.bits)
        return scaled_rtn(w, s, scheme, *args)

    def record_clip(w, x, scheme, **kwargs):
        clipped.append(kwargs["name"])
        return search_clip(w, x, scheme, **kwargs)

    monkeypatch.setattr(calibrated, "scaled_rtn", record_search)
    monkeypatch.setattr(calibrated, "awq_search_clip", record_clip)
    config = AWQConfig(bits=3, group_size=16, overrides={"re:.*k_proj": {"bits": 8}})
    compress(model, config, data=CALIB, tokenizer=tokenizer, progress=False)
    assert searched == {"q_proj": {3}, "k_proj": {8}, "v_proj": {3}}
    assert attention.k_proj.scheme.bits == 8
    layers = {
        name.removeprefix("model.layers.0.").removesuffix(".weight") for name in clipped if ".0." in name
    }
    assert layers == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize(
    "config",
    [
        GPTQConfig(bits=3, group_size=16),
        AWQConfig(bits=3, group_size=16),
        VPTQConfig(bits=2, vector_length=2, kmeans_iterations=5),
    ],
    ids=["gptq", "awq", "vptq"],
)
def test_a_model_in_training_mode_calibrates_without_dropout_and_keeps_its_mode(config):
    model = tiny_bert(seed=1, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    batches = tokenize_batches(tiny_tokenizer(128, kind="encoder"), TEXTS[:8], max_length=32, batch_size=4)
    weights = []
    for seed in (0, 1):  # with dropout on, the Hessians and the block outputs would differ by seed
        torch.manual_seed(seed)
        quantized = compress(copy.deepcopy(model), config, data=batches, progress=False)
        layers = [m for m in quantized.encoder.layer.modules() if hasattr(m, "dequantized_weight")]
        weights.append([m.dequantized_weight() for m in layers])
        assert all(m.training for m in quantized.encoder.layer.modules() if m not in layers)
    assert len(weights[0]) == 12 and all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
