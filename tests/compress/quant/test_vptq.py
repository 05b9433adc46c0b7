"""Tests for weightkit.compress.quant.vptq against hand computations and an unblocked reference sweep."""

import pytest
import torch

from weightkit.compress.quant import vptq
from weightkit.compress.quant.gptq import gptq_quantize
from weightkit.compress.quant.vptq import (
    hessian_weighted_kmeans,
    nearest_codeword,
    vectors_to_weight,
    vptq_quantize,
    vptq_spec_for_bits,
    weight_to_vectors,
)
from weightkit.errors import WeightkitError
from weightkit.quantized.codebook import VPTQSpec, VPTQWeight, vptq_dequantize
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.select import DEFAULT_IGNORE

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def output_error(w, w_hat, h):
    """``tr(dW H dW^T)``: twice the mean squared output error over the calibration inputs."""
    dw = (w - w_hat).double()
    return float(torch.trace(dw @ h.double() @ dw.T))


def random_hessian(cols, seed, tokens=None):
    """``2/n X^T X`` of correlated inputs with uneven channel scales (a seeded stand-in for calibration)."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * cols
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix * (0.2 + 2 * torch.rand(cols, generator=g))
    return 2 * x.T @ x / tokens


def correlated_weight(rows, cols, rank, seed):
    """Rows drawn from a ``rank``-dimensional subspace, plus 10% noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, cols, generator=g)
    w = torch.randn(rows, rank, generator=g) @ basis + 0.1 * torch.randn(rows, cols, generator=g)
    return w / rank**0.5


def reference_sweep(w, h, codebook, damp=0.01, order=None):
    """The column-by-column assignment, unblocked, float64, in OBQ form, in ``order`` (default: 0, 1, ...).

    Column j: each vector of ``v`` rows takes its nearest codeword; err = (w_j - q_j) / [H^-1]_jj;
    W[:, later] -= err [H^-1]_{j, later}; column j is then eliminated from H^-1.
    """
    W = w.double().clone()
    v = codebook.shape[1]
    cols = W.shape[1]
    H = h.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    hinv = torch.linalg.inv(H)
    indices = torch.empty(W.shape[0] // v, cols, dtype=torch.int64)
    for j in range(cols) if order is None else order.tolist():
        column = W[:, j].reshape(-1, v)
        dist = ((column[:, None, :] - codebook.double()[None]) ** 2).sum(-1)
        indices[:, j] = dist.argmin(1)
        err = (W[:, j] - codebook.double()[indices[:, j]].reshape(-1)) / hinv[j, j]
        W -= torch.outer(err, hinv[j])  # column j itself is never read again
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return indices


# --- layout --------------------------------------------------------------------------------------------


def test_vectors_run_along_output_rows_within_one_column():
    w = torch.arange(24.0).reshape(4, 6)  # w[i, j] = 6 i + j
    vectors = weight_to_vectors(w, 2)
    # vector r * 6 + j is rows 2r, 2r+1 of column j
    assert vectors.shape == (12, 2)
    assert vectors[0].tolist() == [0.0, 6.0]
    assert vectors[5].tolist() == [5.0, 11.0]
    assert vectors[7].tolist() == [13.0, 19.0]
    assert torch.equal(vectors_to_weight(vectors, 6), w)


def test_dequantize_places_codewords_by_hand():
    codebook = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    residual = torch.tensor([[0.5, 0.0], [0.0, -0.5]])
    indices = torch.tensor([[1, 0, 1]])
    expected = torch.tensor([[3.0, 1.0, 3.0], [4.0, 2.0, 4.0]])
    assert torch.equal(vptq_dequantize(indices, codebook), expected)
    with_residual = vptq_dequantize(indices, codebook, torch.tensor([[0, 1, 1]]), residual)
    assert torch.equal(with_residual, expected + torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, -0.5]]))
    with pytest.raises(WeightkitError, match="go together"):
        vptq_dequantize(indices, codebook, residual_indices=indices)


# --- k-means -------------------------------------------------------------------------------------------


def test_kmeans_centroids_are_hessian_weighted_means():
    # Two well-separated 1-D clusters; the weights pull each centroid toward its heavier member.
    vectors = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=torch.float64)
    weight = torch.tensor([3.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    for seed in range(5):
        centroids = hessian_weighted_kmeans(vectors, weight, 2, seed=seed)
        assert sorted(centroids[:, 0].tolist()) == pytest.approx([0.25, 10.8])


def test_kmeans_is_seeded():
    vectors = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    weight = torch.rand(500, generator=torch.Generator().manual_seed(2))
    a = hessian_weighted_kmeans(vectors, weight, 16, iterations=5, seed=3)
    assert torch.equal(a, hessian_weighted_kmeans(vectors, weight, 16, iterations=5, seed=3))
    assert not torch.equal(a, hessian_weighted_kmeans(vectors, weight, 16, iterations=5, seed=4))


@pytest.mark.parametrize("chunk", [2**20, 100])  # one chunk; chunks of 2 vectors
def test_nearest_codeword_matches_brute_force(monkeypatch, chunk):
    monkeypatch.setattr(vptq, "_DISTANCE_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    vectors, codebook = torch.randn(301, 3, generator=g), torch.randn(40, 3, generator=g)
    brute = ((vectors[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_codeword(vectors, codebook), brute)


# --- quantization --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "residual"), [(16, 0), (32, 0), (16, 4)])
def test_exact_when_codebook_holds_every_distinct_vector(k, residual):
    g = torch.Generator().manual_seed(6)
    v, distinct = 4, 16
    words = torch.randn(distinct, v, generator=g).half().float()  # fp16-representable: stored exactly
    picks = torch.randint(0, distinct, (32 // v, 48), generator=g)
    w = vptq_dequantize(picks, words)
    q = vptq_quantize(w, random_hessian(48, seed=7), VPTQSpec(v, k, residual))
    assert q.codebook.dtype == torch.float16
    assert torch.equal(q.dequantize(), w)


def test_sweep_matches_the_unblocked_reference():
    w = correlated_weight(16, 40, rank=3, seed=8).double()
    h = random_hessian(40, seed=9).double()
    q = vptq_quantize(w, h, VPTQSpec(4, 32), block_size=7, kmeans_iterations=5)
    assert torch.equal(q.indices.long(), reference_sweep(w, h, q.codebook.double()))
    again = vptq_quantize(w, h, VPTQSpec(4, 32), block_size=128, kmeans_iterations=5)
    assert torch.equal(again.indices, q.indices)


def test_codebook_is_kmeans_weighted_by_each_vectors_hessian_diagonal():
    w = correlated_weight(16, 12, rank=2, seed=16)
    h = random_hessian(12, seed=17) * torch.logspace(-2, 2, 12).sqrt().outer(torch.logspace(-2, 2, 12).sqrt())
    weight = torch.empty(16 // 4 * 12)
    for r in range(16 // 4):
        for j in range(12):
            weight[r * 12 + j] = h[j, j]  # vector r * in + j holds rows 4r..4r+3 of column j
    expected = hessian_weighted_kmeans(weight_to_vectors(w, 4), weight, 8, iterations=5, seed=3).half()
    q = vptq_quantize(w, h, VPTQSpec(4, 8), kmeans_iterations=5, seed=3)
    assert torch.equal(q.codebook, expected)
    unweighted = hessian_weighted_kmeans(weight_to_vectors(w, 4), torch.ones(48), 8, iterations=5, seed=3)
    assert not torch.equal(q.codebook, unweighted.half())


def test_a_dead_input_column_does_not_matter():
    w = correlated_weight(16, 24, rank=2, seed=20)
    h = random_hessian(24, seed=21)
    h[5, :] = 0
    h[:, 5] = 0  # input 5 never fires
    q = vptq_quantize(w, h, VPTQSpec(4, 16, 4), kmeans_iterations=5)
    other = w.clone()
    other[:, 5] = 100.0
    q_other = vptq_quantize(other, h, VPTQSpec(4, 16, 4), kmeans_iterations=5)
    assert torch.equal(q.dequantize(), q_other.dequantize())


def test_act_order_sweeps_by_decreasing_hessian_diagonal():
    w = correlated_weight(16, 40, rank=3, seed=14).double()
    h = random_hessian(40, seed=15).double()
    q = vptq_quantize(w, h, VPTQSpec(4, 32), block_size=7, act_order=True, kmeans_iterations=5)
    plain = vptq_quantize(w, h, VPTQSpec(4, 32), kmeans_iterations=5)
    assert torch.equal(q.codebook, plain.codebook)  # the codebook does not depend on the column order
    order = torch.argsort(h.diagonal(), descending=True)
    assert torch.equal(q.indices.long(), reference_sweep(w, h, q.codebook.double(), order=order))
    assert not torch.equal(q.indices, plain.indices)


def test_act_order_equals_quantizing_the_permuted_layer():
    w = correlated_weight(16, 40, rank=3, seed=18).double()
    h = random_hessian(40, seed=19).double()
    spec = VPTQSpec(4, 16, 8)
    q = vptq_quantize(w, h, spec, act_order=True, kmeans_iterations=5)
    order = torch.argsort(h.diagonal(), descending=True)
    # The same (vector, weight) pairs in another order: k-means starts and ends the same (float64 sums
    # in another order only differ far below fp16's resolution).
    permuted = vptq_quantize(w[:, order], h[order][:, order], spec, kmeans_iterations=5)
    assert torch.equal(q.codebook, permuted.codebook)
    assert torch.equal(q.residual_codebook, permuted.residual_codebook)
    assert torch.equal(q.indices[:, order], permuted.indices)
    assert torch.equal(q.residual_indices[:, order], permuted.residual_indices)


ROWS, COLS = 256, 512


@pytest.fixture(scope="module")
def correlated_layer():
    w = correlated_weight(ROWS, COLS, rank=4, seed=10)
    h = random_hessian(COLS, seed=11)
    spec = vptq_spec_for_bits((ROWS, COLS), 2, vector_length=4)
    return w, h, spec, vptq_quantize(w, h, spec, kmeans_iterations=10)


def test_beats_rtn_at_equal_bits_on_correlated_weights(correlated_layer):
    w, h, spec, q = correlated_layer
    # 2-bit RTN with an fp16 scale per 128 weights: 2 + 16 / 128 bits per weight, VPTQ's budget exactly.
    assert spec.effective_bits((ROWS, COLS)) == 2 + 16 / 128
    rtn = output_error(w, rtn_quantize(w, QuantScheme(bits=2, group_size=128)).dequantize(), h)
    gptq = output_error(w, gptq_quantize(w, h, QuantScheme(bits=2, group_size=128)).dequantize(), h)
    vptq = output_error(w, q.dequantize(), h)
    assert vptq < 0.5 * min(rtn, gptq)  # measured: 0.088 / 0.334 / 0.326 of ||W||_H^2


def test_error_propagation_beats_plain_assignment(correlated_layer):
    w, h, spec, q = correlated_layer
    codebook = q.codebook.float()
    plain = VPTQWeight(
        nearest_codeword(weight_to_vectors(w, 4), codebook).reshape(ROWS // 4, COLS), q.codebook
    )
    assert output_error(w, q.dequantize(), h) < 0.95 * output_error(w, plain.dequantize(), h)


def test_residual_codebook_lowers_the_error():
    w = correlated_weight(64, 256, rank=4, seed=12)
    h = random_hessian(256, seed=13)
    alone = vptq_quantize(w, h, VPTQSpec(8, 64), kmeans_iterations=10)
    both = vptq_quantize(w, h, VPTQSpec(8, 64, 64), kmeans_iterations=10)
    assert torch.equal(both.codebook, alone.codebook)  # the main codebook is trained the same way
    assert both.spec == VPTQSpec(8, 64, 64)
    assert output_error(w, both.dequantize(), h) < 0.8 * output_error(w, alone.dequantize(), h)


# --- bits and refusals ---------------------------------------------------------------------------------


def test_bit_count_by_hand():
    shape = (4096, 4096)
    spec = vptq_spec_for_bits(shape, 2)  # v=8: 16-bit indices
    assert spec == VPTQSpec(8, 65536)
    vectors = 4096 // 8 * 4096
    assert spec.storage_bits(shape) == (vectors * 16, 65536 * 8 * 16)
    assert spec.effective_bits(shape) == 2.5  # 2 bits of index + 8 Mbit of codebook over 16 M weights
    residual = vptq_spec_for_bits(shape, 2, residual_bits=1)
    assert residual == VPTQSpec(8, 256, 256)
    assert residual.storage_bits(shape) == (vectors * 16, 2 * 256 * 8 * 16)
    assert residual.effective_bits(shape) == 2 + 65536 / 4096**2
    assert vptq_spec_for_bits((3072, 4096), 2, vector_length=6) == VPTQSpec(6, 4096)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"shape": (64, 64), "bits": 2},
            "layers.0.q_proj: a codebook of 65536 codewords is larger than the 512",
        ),
        ({"shape": (64, 4096), "bits": 2, "vector_length": 4, "residual_bits": 0.3}, "residual bits 0.3 x"),
        ({"shape": (60, 64), "bits": 1, "vector_length": 8}, "vector length 8 does not divide its 60"),
        ({"shape": (64, 64), "bits": 1.5, "vector_length": 3}, "4.5 index bits"),
        (
            {"shape": (4096, 4096), "bits": 3, "vector_length": 8},
            "24 index bits per vector for the codebook and 0",
        ),
        ({"shape": (64, 64), "bits": 2, "residual_bits": 2}, "residual bits must lie"),
        (
            {"shape": (64, 64), "bits": 2, "residual_bits": 1.25},
            "residual codebook of 1024 codewords is larger",
        ),
    ],
)
def test_refusals_name_the_problem(kwargs, message):
    with pytest.raises(WeightkitError, match=message):
        vptq_spec_for_bits(name="layers.0.q_proj", **kwargs)


def test_quantize_refuses_bad_inputs():
    w, h = torch.randn(16, 8), torch.eye(8)
    with pytest.raises(WeightkitError, match="power of two"):
        VPTQSpec(4, 12)
    with pytest.raises(WeightkitError, match="residual codebook of 64 codewords is larger than the 32"):
        vptq_quantize(w, h, VPTQSpec(4, 2, 64), name="fc")
    with pytest.raises(WeightkitError, match=r"fc: Hessian has shape \(4, 4\)"):
        vptq_quantize(w, torch.eye(4), VPTQSpec(4, 4), name="fc")
    with pytest.raises(WeightkitError, match="fc: weight has NaN"):
        vptq_quantize(w.index_fill(0, torch.tensor([0]), float("nan")), h, VPTQSpec(4, 4), name="fc")


# --- the vector length chosen per layer ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "bits", "residual_bits", "expected"),
    [
        # The docstring's examples at 2 bits: v = 6 (k = 4096) only where 6 divides the rows and the
        # codebook fits 1/128 of the weights; v = 8 (k = 65536) is never chosen (12-bit cap).
        ((384, 384), 2, 0, VPTQSpec(4, 256)),
        ((4096, 4096), 2, 0, VPTQSpec(4, 256)),
        ((3072, 8192), 2, 0, VPTQSpec(6, 4096)),
        ((384, 1536), 2, 0, VPTQSpec(4, 256)),  # 6 divides 384, but 4096 x 6 x 128 > 384 x 1536
        ((32, 64), 2, 0, VPTQSpec(1, 4)),
        ((128, 64), 2, 0, VPTQSpec(2, 16)),
        ((384, 384), 3, 0, VPTQSpec(2, 64)),  # v = 4, k = 4096 and v = 3, k = 512 exceed 384^2 / 128
        ((4096, 4096), 2.5, 0, VPTQSpec(4, 1024)),  # 2.5 bits: v in {4, 2} (v = 6 would be 15 bits)
        # 1 + 1 bits: v up to 12; 12 divides 3072 and two 4096-codebooks of 12 fit exactly (1/128).
        ((3072, 4096), 2, 1, VPTQSpec(12, 4096, 4096)),
        ((4096, 4096), 2, 1, VPTQSpec(8, 256, 256)),  # 12, 11, 10, 9 do not divide 4096
    ],
)
def test_vector_length_rule_picks_the_longest_that_fits(shape, bits, residual_bits, expected):
    spec = vptq.vptq_spec_for_layer(shape, bits, residual_bits=residual_bits, name="fc")
    assert spec == expected
    # The rule's promises: indices at ``bits``, codebooks under 16 / 128 bits per weight, rows divisible.
    assert spec.index_bits == bits * spec.vector_length and shape[0] % spec.vector_length == 0
    assert spec.effective_bits(shape) <= bits + 16 / 128
    # ... and the longest length that keeps them (every longer allowed one breaks one of the rules).
    for v in vptq.auto_vector_lengths(bits, residual_bits):
        if v > spec.vector_length:
            longer = vptq.vptq_codebooks(bits, vector_length=v, residual_bits=residual_bits)
            codewords = longer.centroids + longer.residual_centroids
            assert shape[0] % v or codewords * v * 128 > shape[0] * shape[1]


def test_a_given_vector_length_is_used_as_it_is():
    assert vptq.vptq_spec_for_layer((4096, 4096), 2, vector_length=8) == VPTQSpec(8, 65536)


def test_a_layer_no_vector_length_fits_is_refused_by_name():
    with pytest.raises(
        WeightkitError, match=r"fc: no vector length fits 2 index bits per weight in this 8x8"
    ):
        vptq.vptq_spec_for_layer((8, 8), 2, name="fc")
    with pytest.raises(WeightkitError, match=r"fc: no vector length fits 4 index bits .* \(3, 2, 1\)"):
        vptq.vptq_spec_for_layer((32, 32), 4, name="fc")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 2.3}, "bits 2.3: no vector length gives each codebook a whole number"),
        ({"bits": 1.5, "vector_length": 3}, "bits 1.5 x vector length 3 = 4.5 index bits"),
        ({"bits": 3, "vector_length": 8}, "24 index bits per vector"),
        ({"bits": 2, "residual_bits": 2}, r"residual_bits must lie in \[0, bits=2\)"),
        ({"bits": 2, "vector_length": 0}, "vector_length must be a positive integer or None, got 0"),
        ({"bits": 0}, "bits must be in"),
        ({"kmeans_iterations": 0}, "kmeans_iterations must be at least 1"),
    ],
)
def test_config_refuses_bits_that_give_no_whole_index_width(kwargs, message):
    with pytest.raises(WeightkitError, match=message):
        vptq.VPTQConfig(**kwargs)


def test_config_round_trips_through_a_recipe(tmp_path):
    from weightkit.recipe import dump_config, load_config

    config = vptq.VPTQConfig(bits=2.5, vector_length=4, residual_bits=1, kmeans_iterations=7, act_order=False)
    (tmp_path / "recipe.yaml").write_text(dump_config(config))
    assert "method: vptq" in dump_config(config)
    assert load_config(tmp_path / "recipe.yaml") == config
    assert load_config(tmp_path / "recipe.yaml") != vptq.VPTQConfig(
        bits=2.5, vector_length=4, residual_bits=1
    )
    (tmp_path / "auto.yaml").write_text("method: vptq\nbits: 2\n")  # a YAML integer for a float field
    assert load_config(tmp_path / "auto.yaml") == vptq.VPTQConfig(bits=2.0)


# --- a whole model ---------------------------------------------------------------------------------------


def _model_and_text():
    from sample_texts import TEXTS

    from weightkit.testing import tiny_llama, tiny_tokenizer

    # Hidden size 64: layers of 64x64, 32x64, 128x64 and 64x128 (vector lengths 2, 1, 2 and 2 at 2 bits).
    return tiny_llama(seed=1, hidden_size=64, intermediate_size=128), tiny_tokenizer(128), TEXTS


def _relative_logit_error(reference, model, batches):
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            ref, out = reference(**batch).logits, model(**batch).logits
            mask = batch["attention_mask"].bool()
            num += float((ref - out)[mask].square().sum())
            den += float(ref[mask].square().sum())
    return (num / den) ** 0.5


def test_compress_replaces_exactly_the_selected_layers_and_beats_rtn_at_2_bits():
    import copy

    from weightkit.compress import RTNConfig, compress
    from weightkit.data import tokenize_batches
    from weightkit.quantized.linear import VPTQLinear

    model, tokenizer, texts = _model_and_text()
    ignore = [*DEFAULT_IGNORE, "model.layers.1.self_attn.o_proj"]
    config = vptq.VPTQConfig(bits=2, calib_max_length=64, ignore=ignore)
    quantized = compress(copy.deepcopy(model), config, data=texts[:8], tokenizer=tokenizer, progress=False)

    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, VPTQLinear)}
    linears = {n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {"lm_head", "model.layers.1.self_attn.o_proj"}
    assert len(layers) == 13
    index_bits = codebook_bits = 0
    for name, layer in layers.items():
        shape = tuple(model.get_submodule(name).weight.shape)
        spec = layer.quantized.spec
        assert spec == vptq.vptq_spec_for_layer(shape, 2)  # the documented rule, layer by layer
        index, codebook = spec.storage_bits(shape)
        index_bits, codebook_bits = index_bits + index, codebook_bits + codebook
    weights = sum(model.get_submodule(n).weight.numel() for n in layers)
    assert index_bits == 2 * weights
    vptq_bits = (index_bits + codebook_bits) / weights  # 2.07: the codebooks add 0.07 bits per weight

    # RTN at 2 bits with one fp16 scale per row spends 2 + 16/64 (2 + 16/128 on down_proj) bits per weight.
    rtn = compress(copy.deepcopy(model), RTNConfig(bits=2, group_size=None, ignore=ignore), progress=False)
    rtn_layers = [m for n, m in rtn.named_modules() if n in layers]
    rtn_bits = sum(2 * m.qweight.numel() + 16 * m.weight_scale.numel() for m in rtn_layers)
    assert vptq_bits < rtn_bits / weights

    held_out = tokenize_batches(tokenizer, texts[8:16], max_length=64, batch_size=8)
    vptq_error = _relative_logit_error(model, quantized, held_out)
    rtn_error = _relative_logit_error(model, rtn, held_out)
    assert vptq_error < 0.6 * rtn_error, (vptq_error, rtn_error)  # measured: 0.20 vs 0.52


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vector_length": 3}, "q_proj.weight: vector length 3 does not divide its 64 output rows"),
        ({"vector_length": 8}, "q_proj.weight: a codebook of 65536 codewords is larger than the 512 vectors"),
        ({"bits": 6}, r"q_proj.weight: no vector length fits 6 index bits per weight in this 64x64"),
    ],
)
def test_a_layer_the_codebooks_cannot_take_is_refused_by_name_before_any_work(kwargs, message):
    from weightkit.compress import compress

    model, tokenizer, texts = _model_and_text()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ran = []
    model.model.embed_tokens.register_forward_pre_hook(lambda *_: ran.append(True))
    with pytest.raises(WeightkitError, match=f"model.layers.0.self_attn.{message}"):
        compress(model, vptq.VPTQConfig(**kwargs), data=texts[:8], tokenizer=tokenizer, progress=False)
    assert not ran  # refused before calibration started
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


class _Seen(Exception):
    """Stops a run once a hook has recorded where things are."""


def test_calibration_runs_one_block_at_a_time_on_the_device_and_leaves_the_model_where_it_was(monkeypatch):
    # meta records placement without a GPU: the block being calibrated and its inputs go there, the next
    # block and the embeddings stay on the CPU, and after the run the model holds its own tensors again.
    # The first block's inputs are captured on the CPU (as they are kept when computing on a GPU; the
    # masks of padded text cannot be inspected on meta).
    import copy

    from weightkit.compress import compress
    from weightkit.compress.quant import calibrated

    model, tokenizer, texts = _model_and_text()
    twin, capture = copy.deepcopy(model), calibrated.capture_block_inputs
    monkeypatch.setattr(
        calibrated,
        "capture_block_inputs",
        lambda _model, _block, batches, _device: capture(
            twin, twin.model.layers[0], batches, torch.device("cpu")
        ),
    )
    before, seen = {name: t.clone() for name, t in model.state_dict().items()}, {}

    def record(module, args):
        seen["layer"], seen["input"] = module.weight.device.type, args[0].device.type
        seen["next block"] = {p.device.type for p in model.model.layers[1].parameters()}
        seen["embeddings"] = model.model.embed_tokens.weight.device.type
        raise _Seen

    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(record)
    with pytest.raises(_Seen):
        compress(model, vptq.VPTQConfig(), data=texts[:8], tokenizer=tokenizer, progress=False, device="meta")
    assert seen == {"layer": "meta", "input": "meta", "next block": {"cpu"}, "embeddings": "cpu"}
    after = model.state_dict()
    assert all(after[name].device.type == "cpu" and torch.equal(after[name], t) for name, t in before.items())
