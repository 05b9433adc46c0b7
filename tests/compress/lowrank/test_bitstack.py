"""BitStack's decomposition against a plain reference: each block is the sign of the residual times the best
rank-k fit of its absolute values; the blocks add up to the weight ever more closely; the activation scale
favours the input channels that carry large activations."""

import copy

import numpy as np
import pytest
import torch
from sample_texts import TEXTS

from weightkit.compress import compress
from weightkit.compress.lowrank.bitstack import (
    BitStackConfig,
    absolute_value_block,
    activation_scale,
    bitstack_decompose,
)
from weightkit.compress.quant.calibrated import calibration_batches
from weightkit.errors import WeightkitError
from weightkit.quantized.bitstack import BitStackLinear, universal_order
from weightkit.quantized.pack import unpack_bits
from weightkit.testing import tiny_bert, tiny_llama, tiny_tokenizer


def reference_decomposition(weight: np.ndarray, scale: np.ndarray, iterations: int, rank: int) -> list:
    """The paper's loop in numpy: sign of the residual; rank-k SVD of |residual * scale|; vectors rounded to
    float16 with v divided by the scale; subtract; repeat. Returns ``[(sign, u, v), ...]``."""
    residual, blocks = weight.astype(np.float64), []
    for _ in range(iterations):
        sign = np.where(residual >= 0, 1.0, -1.0)
        left, singular, right_t = np.linalg.svd(np.abs(residual * scale), full_matrices=False)
        u = (left[:, :rank] * np.sqrt(singular[:rank])).astype(np.float16).astype(np.float64)
        v = (
            (right_t[:rank].T * np.sqrt(singular[:rank]) / scale[:, None])
            .astype(np.float16)
            .astype(np.float64)
        )
        residual = residual - sign * (u @ v.T)
        blocks.append((sign, u, v))
    return blocks


def _signs(decomposed) -> torch.Tensor:
    out_features, in_features = decomposed.shape
    return unpack_bits(decomposed.signs, 1, out_features * in_features).reshape(-1, out_features, in_features)


def test_each_block_is_the_sign_of_the_residual_times_the_rank_k_fit_of_its_magnitudes():
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    scale = torch.rand(20) + 0.5
    decomposed = bitstack_decompose(weight, scale, iterations=3, rank=2)
    expected = reference_decomposition(weight.numpy(), scale.numpy(), iterations=3, rank=2)
    signs = _signs(decomposed)
    for b, (sign, u, v) in enumerate(expected):
        assert np.array_equal(signs[b].numpy() * 2 - 1, sign)
        # u @ v.T is what the block holds (the SVD's sign of each pair of singular vectors is arbitrary).
        got = decomposed.u[b].double() @ decomposed.v[b].double().T
        np.testing.assert_allclose(got.numpy(), u @ v.T, rtol=2e-3, atol=2e-3)
    reference = sum(sign * (u @ v.T) for sign, u, v in expected)
    np.testing.assert_allclose(decomposed.dense().numpy(), reference, atol=5e-3)


def test_the_rank_one_fit_of_the_magnitudes_is_optimal():
    """Eckart-Young through an independent route: the squared error of the best rank-1 fit of |R| is
    ||R||^2 minus the largest eigenvalue of |R|^T |R|; a zero residual entry takes the sign +1."""
    torch.manual_seed(1)
    residual = torch.randn(9, 7, dtype=torch.float64)
    residual[0, 0] = 0.0
    positive, u, v = absolute_value_block(residual, 1)
    magnitudes = residual.abs()
    top = torch.linalg.eigvalsh(magnitudes.T @ magnitudes)[-1]
    error = (magnitudes - u @ v.T).square().sum()
    assert torch.allclose(error, magnitudes.square().sum() - top)
    assert torch.equal(positive, residual >= 0) and bool(positive[0, 0])


def test_reconstruction_error_shrinks_with_iterations_to_the_full_weight():
    torch.manual_seed(2)
    weight = torch.randn(48, 64)
    stack = bitstack_decompose(weight, None, iterations=32, rank=4)  # n iterations = its first n blocks
    errors = [
        float((stack.truncated(n).dense() - weight).norm() / weight.norm()) for n in (1, 2, 4, 8, 16, 32)
    ]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[0] > 0.3 and errors[-1] < 1e-3  # measured: 0.53 and 9.5e-05


def test_more_blocks_are_a_prefix_extension():
    """Blocks are decomposed one after another: the first blocks of a longer stack are the shorter stack."""
    torch.manual_seed(3)
    weight = torch.randn(16, 24)
    short, long = (bitstack_decompose(weight, None, iterations=n, rank=2) for n in (3, 6))
    cut = long.truncated(3)
    for got, expected in zip((cut.signs, cut.u, cut.v), (short.signs, short.u, short.v), strict=True):
        assert torch.equal(got, expected)
    assert cut.scores == short.scores


def test_scores_are_the_shares_of_the_activation_weighted_error_each_block_removes():
    torch.manual_seed(4)
    weight, scale = torch.randn(10, 30), torch.rand(30) + 0.1
    decomposed = bitstack_decompose(weight, scale, iterations=5, rank=1)
    remaining = float(
        ((weight - decomposed.dense()) * scale).square().sum() / (weight * scale).square().sum()
    )
    assert sum(decomposed.scores) == pytest.approx(1 - remaining, abs=1e-5)
    assert all(s > 0 for s in decomposed.scores)
    zero = bitstack_decompose(torch.zeros(4, 6), None, iterations=2, rank=1)
    assert zero.scores == (0.0, 0.0) and torch.equal(zero.dense(), torch.zeros(4, 6))


def test_activation_scale_protects_the_channels_with_large_activations():
    """With planted outlier input channels, the scaled decomposition's output error on those inputs is lower
    than the unscaled one's at the same size; the scale is undone (the blocks approximate the weight)."""
    torch.manual_seed(5)
    weight = torch.randn(32, 64)
    inputs = torch.randn(512, 64)
    inputs[:, :4] *= 30.0
    scale = activation_scale(inputs.double().square().sum(0))
    scaled = bitstack_decompose(weight, scale, iterations=3, rank=2).dense()
    plain = bitstack_decompose(weight, None, iterations=3, rank=2).dense()
    output_error = [float(((w - weight) @ inputs.T).norm()) for w in (scaled, plain)]
    assert output_error[0] < 0.8 * output_error[1]
    assert float((scaled - weight).norm() / weight.norm()) < 0.5


def test_activation_scale_is_the_channel_norm_with_a_floor():
    square_sum = torch.tensor([25.0, 0.0, 4.0e6], dtype=torch.float64)
    scale = activation_scale(square_sum)
    assert torch.allclose(scale, torch.tensor([5.0, 2.0, 2000.0]))  # the dead channel gets 1e-3 of the max
    with pytest.raises(WeightkitError, match="all zero"):
        activation_scale(torch.zeros(3))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"iterations": 0}, "iterations must be an integer of at least 1, got 0"),
        ({"rank": 0}, "rank must be an integer of at least 1, got 0"),
        ({"budget_mb": -1.0}, "budget_mb must be a positive number of MB, got -1.0"),
        ({"budget_mb": 0}, "budget_mb must be a positive number of MB, got 0"),
        ({"budget_mb": float("inf")}, "budget_mb must be a positive number of MB, got inf"),
        ({"budget_mb": True}, "budget_mb must be a positive number of MB, got True"),
    ],
)
def test_config_refuses_bad_values(fields, message):
    with pytest.raises(WeightkitError, match=message):
        BitStackConfig(**fields)


def test_perplexity_importance_ranks_a_level_by_the_calibration_loss(tmp_path):
    """The paper's importance: within level 2, a layer ranked earlier lowers the calibration loss (all
    layers at one block, that layer at two) at least as much as one ranked later, measured here directly."""
    tokenizer = tiny_tokenizer(128)
    model = tiny_llama(seed=0)
    config = BitStackConfig(iterations=3, rank=2, calib_max_length=32, importance="perplexity")
    compress(model, config, data=TEXTS[:4], tokenizer=tokenizer, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BitStackLinear)}
    order = universal_order({n: m.block_scores for n, m in layers.items()})
    level_two = order[len(layers) : 2 * len(layers)]
    batches = calibration_batches(config, TEXTS[:4], tokenizer)

    def loss_with(extra: str) -> float:
        trial = copy.deepcopy(model)
        for name, layer in layers.items():
            blocks = 2 if name == extra else 1
            trial.set_submodule(name, BitStackLinear(layer.quantized.truncated(blocks), layer.bias))
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                logits = trial(**batch).logits[:, :-1]
                targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), reduction="sum"
                    )
                )
                count += int((targets != -100).sum())
        return total / count

    first, last = loss_with(level_two[0]), loss_with(level_two[-1])
    assert first < last
    assert layers[level_two[0]].block_scores[1] == pytest.approx(-first, rel=1e-5)
    # The first level keeps the activation proxy's scores (the paper always keeps it whole).
    assert all(0 < m.block_scores[0] < 1 for m in layers.values())


def test_perplexity_importance_needs_a_causal_lm():
    config = BitStackConfig(iterations=2, rank=2, calib_max_length=32, importance="perplexity")
    with pytest.raises(
        WeightkitError, match="importance 'perplexity' scores blocks by a causal LM's next-token"
    ):
        compress(tiny_bert(seed=0), config, data=TEXTS[:4], tokenizer=tiny_tokenizer(128, kind="encoder"))
    with pytest.raises(WeightkitError, match="importance must be one of activation, perplexity, got 'loss'"):
        BitStackConfig(importance="loss")
