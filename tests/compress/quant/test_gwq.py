"""GWQ: outlier selection by |gradient|, the grid of the non-outliers, the storage count, the LM-loss
gradient, and the gain over RTN at an equal bit budget on a weight with planted sensitive entries."""

import copy

import pytest
import torch

from weightkit.compress import RTNConfig, compress
from weightkit.compress.quant.calibrated import calibration_batches
from weightkit.compress.quant.gwq import (
    GWQConfig,
    gwq_quantize,
    lm_loss_gradients,
    outlier_count,
    select_outliers,
)
from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import OutlierQuantizedLinear
from weightkit.quantized.outliers import outlier_storage_bits
from weightkit.select import DEFAULT_IGNORE
from weightkit.testing import tiny_bert, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_outliers(score: torch.Tensor, count: int) -> list[int]:
    """Top ``count`` positions by a plain sort of (-score, position) pairs."""
    flat = score.reshape(-1).tolist()
    ranked = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return sorted(ranked[:count])


# -- selection --------------------------------------------------------------------------------------------


def test_exactly_the_requested_count_is_kept_even_through_ties():
    # Scores in {0, 1, 2, 3}: every cut falls inside a run of equal scores.
    score = torch.randint(0, 4, (16, 32), generator=torch.Generator().manual_seed(1)).float()
    for fraction in (0.0, 0.01, 0.1, 0.25, 0.5, 0.99):
        count = outlier_count(score.numel(), fraction)
        assert count == round(fraction * 512)
        chosen = select_outliers(score, count)
        assert chosen.tolist() == reference_outliers(score, count)
        q = gwq_quantize(torch.randn(16, 32), score, QuantScheme(3, 32), outlier_fraction=fraction)
        assert len(q.outlier_index) == count
        assert q.outlier_index.tolist() == reference_outliers(score, count)


def test_selection_ranks_by_absolute_gradient():
    gradient = torch.zeros(4, 8)
    gradient[1, 2], gradient[3, 7], gradient[0, 0] = -5.0, 4.0, 3.0
    q = gwq_quantize(torch.randn(4, 8), gradient, QuantScheme(3, 8), outlier_fraction=2 / 32)
    assert q.outlier_index.tolist() == [1 * 8 + 2, 3 * 8 + 7]


# -- the grid and the outliers ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_restored_exactly_and_the_rest_on_a_grid_fitted_without_them(symmetric):
    gen = torch.Generator().manual_seed(2)
    # float16-representable weights, so "restored exactly" means bit-equal to the input.
    weight = (torch.randn(8, 64, generator=gen) * 0.1).half().float()
    weight[2, 5], weight[6, 40] = 9.0, -7.5  # huge weights that would wreck their group's scale
    gradient = torch.randn(8, 64, generator=gen) * 1e-3
    gradient[2, 5], gradient[6, 40] = 1.0, -1.0
    scheme = QuantScheme(3, 16, symmetric)
    q = gwq_quantize(weight, gradient, scheme, outlier_fraction=2 / 512)
    restored = q.dequantize()
    assert q.outlier_index.tolist() == [2 * 64 + 5, 6 * 64 + 40]
    assert restored[2, 5] == 9.0 and restored[6, 40] == -7.5

    # Reference: each group's min/max grid from its non-outliers only, computed entry by entry.
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[2, 5] = mask[6, 40] = True
    levels = 2**scheme.bits - 1
    for row in range(8):
        for g in range(4):
            cols = slice(16 * g, 16 * g + 16)
            kept = weight[row, cols][~mask[row, cols]]
            # float32 scalars throughout, as the grid computes (a float64 reference rounds some
            # half-way codes the other way).
            if symmetric:
                scale, zp = kept.abs().max() / (levels / 2), torch.tensor(0.0)
            else:
                lo, hi = kept.min().clamp(max=0), kept.max().clamp(min=0)
                scale = (hi - lo) / levels
                zp = torch.clamp(scheme.q_min - torch.round(lo / scale), scheme.q_min, scheme.q_max)
            assert q.dense.scale[row, g] == scale
            for col in range(16 * g, 16 * g + 16):
                if mask[row, col]:
                    continue
                code = torch.clamp(torch.round(weight[row, col] / scale) + zp, scheme.q_min, scheme.q_max)
                assert restored[row, col] == (code - zp) * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_outliers_of_a_16_bit_weight_are_restored_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(8, 32, generator=gen) * torch.logspace(-6, 2, 32)).to(dtype)
    gradient = torch.randn(8, 32, generator=gen)
    q = gwq_quantize(weight, gradient, QuantScheme(3, 16), outlier_fraction=0.25)
    assert q.outlier_value.dtype == dtype
    positions = q.outlier_index.long()
    assert torch.equal(q.dequantize().reshape(-1)[positions], weight.reshape(-1)[positions])


def test_no_outliers_is_plain_rtn():
    weight, gradient = torch.randn(8, 32), torch.randn(8, 32)
    scheme = QuantScheme(4, 16, symmetric=False)
    q = gwq_quantize(weight, gradient, scheme, outlier_fraction=0.0)
    assert torch.equal(q.dequantize(), rtn_quantize(weight, scheme).dequantize())
    assert q.storage_bits() == outlier_storage_bits((8, 32), scheme, 0)


def test_storage_bits_known_answers():
    # 3-bit, groups of 128, symmetric: 3 + 16/128 bits per weight, + 48 bits per outlier.
    assert outlier_storage_bits((64, 128), QuantScheme(3, 128), 64) == 64 * 128 * 3 + 64 * 16 + 64 * 48
    # Asymmetric, per channel: a 16-bit scale and a 4-bit zero point per row.
    assert outlier_storage_bits((10, 20), QuantScheme(4, None, symmetric=False), 0) == 200 * 4 + 10 * 20


# -- the claim: better than RTN at an equal budget -----------------------------------------------------------


def planted_problem():
    """A linear layer whose loss weighs 8 output rows 100x and whose 8 input features are 10x larger:
    the 64 entries at their crossings matter 10^4 times more than the rest (per squared error). The
    weight is near, not at, the loss minimum, so its gradient is not zero."""
    gen = torch.Generator().manual_seed(0)
    out, inp = 64, 128
    rows, cols = torch.arange(8) * 8 + 3, torch.arange(8) * 16 + 5
    row_weight, col_scale = torch.ones(out), torch.ones(inp)
    row_weight[rows], col_scale[cols] = 100.0, 10.0
    target_weight = torch.randn(out, inp, generator=gen)
    weight = target_weight + 0.05 * torch.randn(out, inp, generator=gen)

    def data(n):
        x = torch.randn(n, inp, generator=gen) * col_scale
        return x, x @ target_weight.T + 0.1 * torch.randn(n, out, generator=gen)

    def loss(w, x, y):
        return 0.5 * (((x @ w.T - y) ** 2) * row_weight).sum(1).mean()

    planted = {int(i) * inp + int(j) for i in rows for j in cols}
    return weight, data, loss, planted


def test_gwq_beats_rtn_at_equal_bits_per_weight_on_planted_sensitive_entries():
    weight, data, loss, planted = planted_problem()
    calib, held_out = data(512), data(512)
    w = weight.clone().requires_grad_(True)
    loss(w, *calib).backward()

    # Equal budget, exactly: GWQ 3 bits, groups of 128, 64 of 8192 outliers = 3 + 0.125 + 0.375 bits per
    # weight; RTN 3 bits spends the same 0.5 extra bits on scales, as groups of 32.
    gwq = gwq_quantize(weight, w.grad, QuantScheme(3, 128), outlier_fraction=64 / 8192)
    rtn_scheme = QuantScheme(3, 32)
    assert gwq.storage_bits() == outlier_storage_bits((64, 128), rtn_scheme, 0) == 3.5 * 8192

    # Control at the same budget: the 64 largest |w| kept instead (a gradient-blind choice).
    by_magnitude = gwq_quantize(weight, weight, QuantScheme(3, 128), outlier_fraction=64 / 8192)

    base = loss(weight, *held_out)
    gwq_loss = loss(gwq.dequantize(), *held_out) - base
    rtn_loss = loss(rtn_quantize(weight, rtn_scheme).dequantize(), *held_out) - base
    magnitude_loss = loss(by_magnitude.dequantize(), *held_out) - base
    assert len(planted & set(gwq.outlier_index.tolist())) >= 56  # the gradient finds the planted entries
    assert gwq_loss < 0.5 * rtn_loss  # measured: 5.77e3 vs 1.66e4 (magnitude-ranked: 1.45e4)
    assert gwq_loss < 0.5 * magnitude_loss


# -- the gradient of the LM loss -----------------------------------------------------------------------------


def test_lm_loss_gradients_is_the_gradient_of_the_mean_token_loss_over_all_batches():
    model = tiny_llama(seed=3)
    gen = torch.Generator().manual_seed(4)
    lengths = [12, 5, 9, 3]
    texts = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]

    def batch(rows, width):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, t in enumerate(rows):
            ids[k, : len(t)], mask[k, : len(t)] = t, 1
        return {"input_ids": ids, "attention_mask": mask}

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    # Uneven batches, each padded to its own width (one wider than needed).
    got = lm_loss_gradients(model, [batch(texts[:1], 12), batch(texts[1:], 11)], names)

    # Reference: every predicted token's cross-entropy, averaged over all of them, by hand.
    weights = [model.get_submodule(n).weight for n in names]
    losses = []
    for t in texts:
        logits = model(input_ids=t[None]).logits[0, :-1]
        losses.append(torch.nn.functional.cross_entropy(logits, t[1:], reduction="none"))
    expected = torch.autograd.grad(torch.cat(losses).mean(), weights)
    for name, e in zip(names, expected, strict=True):
        torch.testing.assert_close(got[name], e, rtol=1e-4, atol=1e-7)
    # The model is left as it was: no gradients, the same requires_grad flags.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_lm_loss_gradients_refusals():
    model = tiny_llama(seed=3)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(WeightkitError, match="no calibration batches"):
        lm_loss_gradients(model, [], ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(WeightkitError, match="LlamaModel returns no loss"):
        lm_loss_gradients(model.model, [{"input_ids": ids, "attention_mask": ids * 0 + 1}], [])
    with pytest.raises(WeightkitError, match="no token to predict"):
        lm_loss_gradients(model, [{"input_ids": ids[:, :1], "attention_mask": ids[:, :1] * 0 + 1}], [])


# -- a whole model ------------------------------------------------------------------------------------------


def test_compress_keeps_exactly_the_top_gradient_fraction_of_each_selected_layer():
    model = tiny_llama(seed=5)
    reference = copy.deepcopy(model)
    texts = ["The quick brown fox jumps over the lazy dog.", "A weight that matters has a large gradient."]
    config = GWQConfig(
        bits=3,
        group_size=16,
        outlier_fraction=0.02,
        overrides={"re:.*down_proj": {"bits": 4}},
        ignore=[*DEFAULT_IGNORE, "model.layers.0.mlp.up_proj"],
    )
    compress(model, config, data=texts, tokenizer=tiny_tokenizer(), progress=False)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, OutlierQuantizedLinear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {"lm_head", "model.layers.0.mlp.up_proj"} and len(layers) == 13
    gradients = lm_loss_gradients(
        reference, calibration_batches(config, texts, tiny_tokenizer()), sorted(layers)
    )
    for name, layer in layers.items():
        weight = reference.get_submodule(name).weight.detach()
        q = layer.quantized
        assert q.dense.scheme.bits == (4 if name.endswith("down_proj") else 3)
        assert len(q.outlier_index) == round(0.02 * weight.numel())
        assert q.outlier_index.tolist() == reference_outliers(gradients[name].abs(), len(q.outlier_index))
        restored = layer.dequantized_weight().reshape(-1)[q.outlier_index.long()]
        assert torch.equal(restored, weight.half().float().reshape(-1)[q.outlier_index.long()])
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def _kl_from(reference, model, batches):
    """Mean KL(reference || model) of the next-token distributions over the real tokens."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            p = reference(**batch).logits.log_softmax(-1)
            q = model(**batch).logits.log_softmax(-1)
            mask = batch["attention_mask"].bool()
            total += float((p.exp() * (p - q)).sum(-1)[mask].sum())
            count += int(mask.sum())
    return total / count


def test_gwq_beats_rtn_at_an_equal_budget_on_a_model_with_planted_sensitive_channels():
    # Two hidden channels scaled up 20x by the norms before q/k/v and gate/up (as the massive activation
    # channels of real LLMs): every weight in those input columns is amplified, and its loss gradient is
    # large. GWQ keeps them in 16 bit; RTN must round them.
    from sample_texts import TEXTS

    from weightkit.data import stdlib_docstrings, tokenize_batches

    model, tokenizer = tiny_llama(seed=0, hidden_size=64, intermediate_size=128), tiny_tokenizer(128)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] *= 20
            layer.post_attention_layernorm.weight[17] *= 20
    # Equal budget: GWQ 3 bits, one scale per row of 64 (128) columns, 1/64 outliers of 48 bits:
    # 3 + 0.25 + 0.75 = 4 bits per weight (3 + 0.125 + 0.75 on down_proj); RTN 3 bits in groups of 16: 4.
    gwq = GWQConfig(bits=3, group_size=None, outlier_fraction=1 / 64, calib_samples=8, calib_max_length=64)
    rtn = RTNConfig(bits=3, group_size=16)
    held_out = tokenize_batches(tokenizer, stdlib_docstrings("eval")[:16], max_length=64, batch_size=16)
    kl = {}
    for config in (gwq, rtn):
        quantized = compress(
            copy.deepcopy(model), config, data=TEXTS[:8], tokenizer=tokenizer, progress=False
        )
        kl[type(config).__name__] = _kl_from(model, quantized, held_out)
        if config is gwq:
            bits = sum(m.quantized.storage_bits() for m in quantized.modules() if hasattr(m, "outlier_index"))
            weights = sum(m.qweight.numel() for m in quantized.modules() if hasattr(m, "outlier_index"))
    assert bits <= 4 * weights
    assert kl["GWQConfig"] < 0.75 * kl["RTNConfig"], kl  # measured: 8.4e-4 vs 1.4e-3


def test_gwq_refuses_a_model_without_a_next_token_loss_by_name():
    ran = []
    model = tiny_bert(seed=0)
    model.embeddings.register_forward_pre_hook(lambda *_: ran.append(True))
    with pytest.raises(WeightkitError, match="BertModel \\(model_type 'bert'\\) is an encoder: GWQ ranks"):
        compress(
            model, GWQConfig(group_size=16), data=["some text"], tokenizer=tiny_tokenizer(), progress=False
        )
    assert not ran and not any(isinstance(m, OutlierQuantizedLinear) for m in model.modules())


class _Seen(Exception):
    """Stops a run once a hook has recorded where things are."""


def test_gwq_computes_on_the_device_asked_and_leaves_the_model_where_it_was():
    texts = ["The quick brown fox jumps over the lazy dog.", "A weight that matters has a large gradient."]
    config = GWQConfig(bits=4, group_size=16)
    # On the CPU: the layers are where the model is, and the same as without a device.
    on_cpu = compress(
        tiny_llama(seed=2), config, data=texts, tokenizer=tiny_tokenizer(), progress=False, device="cpu"
    )
    here = compress(tiny_llama(seed=2), config, data=texts, tokenizer=tiny_tokenizer(), progress=False)
    assert {t.device.type for t in on_cpu.state_dict().values()} == {"cpu"}
    assert all(torch.equal(t, here.state_dict()[name]) for name, t in on_cpu.state_dict().items())

    # On another device (meta: it records placement without a GPU) the gradient pass runs there, on a copy
    # of the whole model, with its inputs; the model keeps its own tensors.
    model, seen = tiny_llama(seed=2), {}
    before = {name: t.clone() for name, t in model.state_dict().items()}

    def record(module, args):
        seen["embeddings"], seen["token ids"] = module.weight.device.type, args[0].device.type
        seen["model"] = {p.device.type for p in model.parameters()}
        raise _Seen

    model.model.embed_tokens.register_forward_pre_hook(record)
    with pytest.raises(_Seen):
        compress(model, config, data=texts, tokenizer=tiny_tokenizer(), progress=False, device="meta")
    assert seen == {"embeddings": "meta", "token ids": "meta", "model": {"meta"}}
    after = model.state_dict()
    assert all(after[name].device.type == "cpu" and torch.equal(after[name], t) for name, t in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_gwq_config_round_trips_through_a_recipe(tmp_path):
    from weightkit.recipe import dump_config, load_config

    config = GWQConfig(bits=3, group_size=64, symmetric=False, outlier_fraction=0.005, calib_samples=16)
    (tmp_path / "recipe.yaml").write_text(dump_config(config))
    assert "method: gwq" in dump_config(config)
    assert load_config(tmp_path / "recipe.yaml") == config
    (tmp_path / "bad.yaml").write_text("method: gwq\noutlier_fraction: 1\n")
    with pytest.raises(WeightkitError, match="bad.yaml: outlier_fraction must be in \\[0, 1\\), got 1"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("fraction", [1.0, -0.5])
def test_config_refuses_an_outlier_fraction_outside_zero_one(fraction):
    with pytest.raises(WeightkitError, match="outlier_fraction must be in"):
        GWQConfig(outlier_fraction=fraction)


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.01])
def test_outlier_fraction_outside_zero_one_refused(fraction):
    with pytest.raises(WeightkitError, match="outlier_fraction must be in \\[0, 1\\)"):
        gwq_quantize(torch.randn(4, 8), torch.randn(4, 8), QuantScheme(3, 8), outlier_fraction=fraction)


def test_bad_shapes_and_values_refused_by_name():
    scheme = QuantScheme(3, 8)
    with pytest.raises(WeightkitError, match="fc.weight: gradient has shape \\(4, 16\\)"):
        gwq_quantize(torch.randn(4, 8), torch.randn(4, 16), scheme, name="fc.weight")
    with pytest.raises(WeightkitError, match="fc.weight: only 2-D"):
        gwq_quantize(torch.randn(32), torch.randn(32), scheme, name="fc.weight")
    with pytest.raises(WeightkitError, match="group size 8 does not divide"):
        gwq_quantize(torch.randn(4, 12), torch.randn(4, 12), scheme, name="fc.weight")
    nan = torch.randn(4, 8)
    nan[1, 1] = float("nan")
    with pytest.raises(WeightkitError, match="fc.weight"):
        gwq_quantize(nan, torch.randn(4, 8), scheme, name="fc.weight")
    with pytest.raises(WeightkitError, match="gradient of fc.weight"):
        gwq_quantize(torch.randn(4, 8), nan, scheme, name="fc.weight")
    big = torch.randn(4, 8)
    big[0, 0] = 1e6
    with pytest.raises(WeightkitError, match="float16's range"):
        gwq_quantize(big, big, scheme, outlier_fraction=0.1, name="fc.weight")
