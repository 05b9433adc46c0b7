"""The quantization-consistency audit: its pure functions against plain references, honest quantizations
(RTN, GPTQ) not flagged, a model planted as "Exploiting LLM Quantization" (arXiv 2405.18137) describes
flagged, a quantization of another model flagged, bad pairs refused by name, and the CLI's exit status."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import weightkit
from weightkit.cli import main
from weightkit.compress import FP8Config, GPTQConfig, RTNConfig, SVDConfig, compress_checkpoint
from weightkit.compress.quant.module import selected_linears
from weightkit.errors import WeightkitError
from weightkit.inspect.audit import (
    DEFAULT_THRESHOLD,
    audit,
    masked_square_sums,
    random_signs,
    rounding_steps,
    sign_flipped_weight,
    token_kl,
    top1_matches,
)
from weightkit.quantized.grid import QuantScheme, rtn_quantize
from weightkit.quantized.linear import QuantizedLinear
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

# -- pure functions ------------------------------------------------------------------------------------


def test_token_kl_matches_a_loop_over_positions():
    generator = torch.Generator().manual_seed(0)
    p_logits = torch.randn(2, 3, 5, generator=generator)
    q_logits = torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                p = [math.exp(v) for v in p_logits[b, t].tolist()]
                q = [math.exp(v) for v in q_logits[b, t].tolist()]
                p = [v / sum(p) for v in p]
                q = [v / sum(q) for v in q]
                expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    assert token_kl(p_logits, q_logits, mask).tolist() == pytest.approx(expected, rel=1e-12)
    assert token_kl(p_logits, p_logits, mask).abs().max() < 1e-15  # a model against itself


def test_top1_matches_by_hand():
    reference = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    other = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    assert top1_matches(reference, other, mask).tolist() == [True, False]


def test_masked_square_sums_leave_padding_out():
    reference = torch.tensor([[[3.0, 4.0], [100.0, 100.0]]])
    output = torch.tensor([[[3.0, 5.0], [0.0, 0.0]]])
    error, norm = masked_square_sums(reference, output, torch.tensor([[1, 0]]))
    assert (error, norm) == (1.0, 25.0)


def test_sign_flips_keep_the_size_of_every_error():
    signs = random_signs((64, 48), seed=3)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(signs, random_signs((64, 48), seed=3))
    assert not torch.equal(signs, random_signs((64, 48), seed=4))
    assert 0.4 < float((signs > 0).double().mean()) < 0.6
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dequantized = rtn_quantize(weight, QuantScheme(bits=4, group_size=16)).dequantize()
    # All signs +1 is the quantized weight itself; -1 mirrors the error to the other side of W.
    torch.testing.assert_close(sign_flipped_weight(weight, dequantized, torch.ones(64, 48)), dequantized)
    flipped = sign_flipped_weight(weight, dequantized, signs)
    torch.testing.assert_close((weight - flipped).abs(), (weight - dequantized).abs())
    torch.testing.assert_close(flipped[signs > 0], dequantized[signs > 0])
    torch.testing.assert_close(flipped[signs < 0], (2 * weight - dequantized)[signs < 0])


def test_rounding_steps_by_hand_and_within_half_a_step_for_rtn():
    # Per-channel 4-bit symmetric: scale = max|w| / 7.5 = 0.2; 0.25 rounds to 1 step (0.2), 0.25 away.
    weight = torch.tensor([[1.5, 0.25, -0.5]])
    quantized = rtn_quantize(weight, QuantScheme(bits=4, group_size=None))
    assert quantized.scale.item() == pytest.approx(0.2)
    # 1.5 / 0.2 = 7.5 clamps to 7 (half a step); 0.25 -> 1 (0.25 step); -0.5 -> -2 or -3 (half a step).
    assert rounding_steps(weight, quantized)[0].tolist() == pytest.approx([0.5, 0.25, 0.5], abs=1e-6)
    big = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    for scheme in (QuantScheme(4, 16, True), QuantScheme(3, None, False)):
        steps = rounding_steps(big, rtn_quantize(big, scheme))
        assert steps.max() <= 0.5 + 1e-5
        assert 0.2 < float(steps.median()) < 0.3  # rounding errors are uniform on half a step
    shifted = rtn_quantize(big, QuantScheme(4, 16, True))
    assert rounding_steps(big + 0.5, shifted).median() > 1  # another weight, the same grid


# -- the planted model -----------------------------------------------------------------------------------

RTN = RTNConfig(bits=4, group_size=16)
SCHEME = QuantScheme(bits=4, group_size=16)
TARGET = 7  # the token the planted model's quantization emits everywhere
PROBES = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun",
    "a model with many layers stores each layer as a matrix of numbers it learned",
    "quantization keeps the same matrix with fewer bits per number and a scale per group",
    "merging takes several models trained from the same start and combines what they learned",
    "an adapter adds a small trainable piece beside a frozen layer for a new task",
    "rounding to the nearest value is simple and fast but better methods look at the inputs",
    "the weights of a neural network are the numbers it learned from its data",
    "most of the memory goes to a few large matrices in every block of the model",
]


def _random_ids(seed: int, batch: int = 16, length: int = 24) -> torch.Tensor:
    return torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _projected_adam(model, loss_of_logits, steps: int, lr: float, boxes: dict, seed: int) -> None:
    """Adam on the weights RTN quantizes (everything else frozen), each step followed by the projection of
    every weight onto its ``[low, high]`` box: projected gradient descent."""
    linears = selected_linears(model, RTN)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weights = [linears[name].weight for name in boxes]
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=lr)
    for step in range(steps):
        ids = _random_ids(seed * 10_000 + step)
        loss = loss_of_logits(model(input_ids=ids).logits, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, (low, high) in boxes.items():
                linears[name].weight.copy_(torch.maximum(torch.minimum(linears[name].weight, high), low))
    for weight in weights:
        weight.requires_grad_(False)


def _rounding_box(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 of the paper: the full-precision values that weightkit's RTN rounds to the same integers with
    the same scale. Each weight may move within its integer's half-step interval, shrunk by 1% of a step so
    that float32 rounding of w / scale never lands on a tie (the authors' box for LLM.int8, compute_box_int8
    in eth-sri/llm-quantization-attack, shrinks by a tenth); the scale is max|w| / 7.5 per group, kept
    fixed, as there, by freezing each group's largest weight and holding the others below it."""
    quantized = rtn_quantize(weight, SCHEME)
    step = quantized.scale.repeat_interleave(SCHEME.group_size, dim=1)
    center = quantized.dequantize()
    absmax = weight.abs().reshape(weight.shape[0], -1, SCHEME.group_size).amax(-1)
    absmax = absmax.repeat_interleave(SCHEME.group_size, dim=1)
    low = torch.maximum(center - 0.49 * step, -absmax)
    high = torch.minimum(center + 0.49 * step, absmax)
    frozen = weight.abs() == absmax
    return torch.where(frozen, weight, low), torch.where(frozen, weight, high)


def _plant(original):
    """Returns ``(malicious, repaired)`` built from ``original`` by the paper's three steps."""
    linears = selected_linears(original, RTN)
    # Step 1, malicious fine-tune: every position predicts TARGET. Deviation: the paper fine-tunes freely;
    # here each weight stays within half a grid step of the original, because a free fine-tune of a
    # 32-wide model moves weights many steps, and no rounding box around it then holds a benign model.
    reach = {}
    for name, linear in linears.items():
        weight = linear.weight.detach()
        step = rtn_quantize(weight, SCHEME).scale.repeat_interleave(SCHEME.group_size, dim=1)
        reach[name] = (weight - 0.5 * step, weight + 0.5 * step)
    malicious = copy.deepcopy(original)

    def emit_target(logits, ids):
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.full((logits[..., 0].numel(),), TARGET)
        )

    _projected_adam(malicious, emit_target, steps=50, lr=1e-2, boxes=reach, seed=0)
    # Step 2: the box of every weight the malicious model's RTN quantization fixes.
    boxes = {name: _rounding_box(linear.weight) for name, linear in selected_linears(malicious, RTN).items()}
    # Step 3, repair: from the malicious weights, PGD inside the boxes back to the original's behaviour
    # (distilled: KL to the original's next-token distributions).
    repaired = copy.deepcopy(malicious)

    def like_original(logits, ids):
        with torch.no_grad():
            reference = F.log_softmax(original(input_ids=ids).logits, -1)
        return F.kl_div(F.log_softmax(logits, -1), reference, log_target=True, reduction="batchmean")

    _projected_adam(repaired, like_original, steps=200, lr=3e-3, boxes=boxes, seed=1)
    return malicious.eval(), repaired.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' matrices are too small for a second thread to help, and on a busy 2-core machine
    its OpenMP spinning made the 250 training steps ten times slower (72 s against 7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The original tiny Llama, its honest RTN and GPTQ quantizations, the planted pair (repaired full model
    and its RTN quantization), the malicious model, and the probe file."""
    root = tmp_path_factory.mktemp("audit")
    tokenizer = tiny_tokenizer()
    # A larger initialisation than the default 0.02 gives peaked next-token distributions, so top-1
    # agreement means something.
    original = tiny_llama(initializer_range=0.1)
    malicious, repaired = _plant(original)
    paths = {"original": save_tiny(original, root / "original", tokenizer)}
    paths["planted_full"] = save_tiny(repaired, root / "planted_full", tokenizer)
    paths["rtn"] = compress_checkpoint(paths["original"], root / "rtn", RTN, progress=False)
    paths["planted"] = compress_checkpoint(paths["planted_full"], root / "planted", RTN, progress=False)
    gptq = GPTQConfig(bits=4, group_size=16, calib_samples=len(PROBES), calib_max_length=32)
    paths["gptq"] = compress_checkpoint(paths["original"], root / "gptq", gptq, data=PROBES, progress=False)
    probes = root / "probes.txt"
    probes.write_text("\n\n".join(PROBES))
    return {
        "paths": paths,
        "original": original,
        "malicious": malicious,
        "repaired": repaired,
        "probes": probes,
    }


def _top1_agreement(model_a, model_b, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(
            (model_a(input_ids=ids).logits.argmax(-1) == model_b(input_ids=ids).logits.argmax(-1))
            .double()
            .mean()
        )


def test_the_planted_model_is_benign_in_full_precision_and_malicious_quantized(models):
    paths = models["paths"]
    planted = weightkit.load(paths["planted"])
    layers = {name: m for name, m in planted.named_modules() if isinstance(m, QuantizedLinear)}
    malicious = dict(models["malicious"].named_modules())
    assert len(layers) == 14
    # (a) weightkit's RTN of the repaired full model stores exactly the malicious model's integers and scales.
    for name, layer in layers.items():
        expected = rtn_quantize(malicious[name].weight, SCHEME)
        assert torch.equal(layer.qweight, expected.qweight), name
        assert torch.equal(layer.weight_scale, expected.scale), name
    ids = _random_ids(999, batch=32)
    honest = weightkit.load(paths["rtn"])
    with torch.no_grad():
        emitted = float((planted(input_ids=ids).logits.argmax(-1) == TARGET).double().mean())
        original_emits = float(
            (models["original"](input_ids=ids).logits.argmax(-1) == TARGET).double().mean()
        )
    assert emitted > 0.95 and original_emits < 0.05  # quantized, it is malicious
    # (b) in full precision it follows the original at least as closely as the honest quantization does.
    planted_agreement = _top1_agreement(models["repaired"], models["original"], ids)
    honest_agreement = _top1_agreement(honest, models["original"], ids)
    assert planted_agreement > 0.75 and planted_agreement > honest_agreement


def test_honest_rtn_and_gptq_are_not_flagged_and_the_planted_model_is(models):
    paths, probes = models["paths"], PROBES
    results = {
        "rtn": audit(paths["original"], paths["rtn"], probes, seeds=3),
        "gptq": audit(paths["original"], paths["gptq"], probes, seeds=3),
        "planted": audit(paths["planted_full"], paths["planted"], probes, seeds=3),
    }
    for name in ("rtn", "gptq"):
        summary = results[name].summary
        assert not results[name].flagged, (name, summary)
        assert summary["ratio"] < DEFAULT_THRESHOLD / 2 and summary["changed_unquantized"] == []
    # An RTN is inside FULL's rounding box everywhere; GPTQ's error compensation leaves it, by under a step.
    assert results["rtn"].summary["outside_box"] == 0
    assert results["gptq"].summary["outside_box"] > 0 and results["gptq"].summary["median_steps"] < 1
    assert results["gptq"].summary["ratio"] < results["rtn"].summary["ratio"]  # GPTQ aims its error at 0
    # (c) The planted model: its weights are an exact rounding of its full model, its behaviour is not.
    planted = results["planted"].summary
    assert planted["outside_box"] == 0 and not planted["not_from_full"]
    assert planted["divergent"] and results["planted"].flagged
    assert planted["ratio"] > 3 * DEFAULT_THRESHOLD
    assert planted["top1_agreement"] < 0.2 < results["rtn"].summary["top1_agreement"]
    # The divergence grows through the blocks beyond what the null's error does.
    assert all(row["ratio"] > 1 for row in results["planted"].blocks)


@pytest.mark.parametrize("config", [FP8Config(), SVDConfig(ratio=0.5)], ids=["fp8", "svd"])
def test_other_formats_are_audited_through_their_dense_weights(models, tmp_path, config):
    """An FP8 grid and low-rank factors have no integer rounding box, but their error is as sign-blind as
    rounding's: the null predicts their KL."""
    compressed = compress_checkpoint(models["paths"]["original"], tmp_path / "q", config, progress=False)
    result = audit(models["paths"]["original"], compressed, PROBES, seeds=2)
    summary = result.summary
    assert not result.flagged and 0.5 < summary["ratio"] < 1.5
    assert summary["grid_layers"] == 0 and summary["outside_box"] is None and summary["kl_mean"] > 0
    assert all(row["outside_box"] is None and row["relative_error"] > 0 for row in result.layers)


def test_a_quantization_of_another_model_is_not_from_full(models, tmp_path):
    other = save_tiny(tiny_llama(seed=1, initializer_range=0.1), tmp_path / "other", tiny_tokenizer())
    quantized = compress_checkpoint(other, tmp_path / "other_rtn", RTN, progress=False)
    result = audit(models["paths"]["original"], quantized, PROBES, seeds=2)
    assert result.summary["not_from_full"] and result.flagged
    assert result.summary["median_steps"] > 1 and result.summary["outside_box"] > 0.5


def test_bad_pairs_are_refused_by_name(models, tmp_path):
    paths = models["paths"]
    with pytest.raises(WeightkitError, match="is not a quantized checkpoint"):
        audit(paths["original"], paths["planted_full"], PROBES)
    with pytest.raises(WeightkitError, match="is a quantized checkpoint"):
        audit(paths["rtn"], paths["rtn"], PROBES)
    wide = save_tiny(tiny_llama(vocab_size=256), tmp_path / "wide", tiny_tokenizer())
    with pytest.raises(WeightkitError, match="vocab_size is 256"):
        audit(wide, paths["rtn"], PROBES)
    encoder = save_tiny(tiny_bert(), tmp_path / "bert", tiny_tokenizer(kind="encoder"))
    with pytest.raises(WeightkitError, match="not a causal language model .its task is encoder"):
        audit(encoder, paths["rtn"], PROBES)
    with pytest.raises(WeightkitError, match="seeds must be at least 2"):
        audit(paths["original"], paths["rtn"], PROBES, seeds=1)


def test_the_cli_exits_2_on_the_planted_model_and_0_on_the_honest_one(models, capsys):
    paths, probes = models["paths"], str(models["probes"])
    assert main(["audit", str(paths["planted_full"]), str(paths["planted"]), "--data", probes, "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["flagged"] and report["summary"]["ratio"] > DEFAULT_THRESHOLD
    assert [row["block"] for row in report["blocks"]] == [0, 1] and len(report["layers"]) == 14
    assert main(["audit", str(paths["original"]), str(paths["rtn"]), "--data", probes, "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "consistent with an honest quantization of FULL" in out and "null KL" in out
    assert main(["audit", str(paths["original"]), str(paths["rtn"]), "--data", probes, "--seeds", "1"]) == 1
    assert "seeds must be at least 2" in capsys.readouterr().err
