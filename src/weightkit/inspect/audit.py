"""Quantization-consistency audit: does a quantized model behave the way its quantization error predicts?

Paper: "Exploiting LLM Quantization", Kazuki Egashira, Mark Vero, Robin Staab, Jingxuan He, Martin Vechev
(NeurIPS 2024, arXiv 2405.18137). The attack it describes makes a model that is benign in full precision and
malicious once quantized: (1) fine-tune the model to be malicious; (2) quantize it and compute, for every
weight, the interval of full-precision values that round to the same stored value (the scale kept fixed);
(3) fine-tune back to benign with projected gradient descent inside those intervals. The full-precision
model then passes any behavioural check, its quantization is bit for bit the malicious model's, and the
quantization error is no larger than an honest rounding's: it is *aimed*, not *big*. Weight-space checks
(SQNR, :mod:`.quant_error`) cannot see it; behaviour can.

What :func:`audit` measures, on probe texts run through FULL and QUANTIZED:

- :func:`token_kl`: ``KL(p_full || p_quantized)`` of the next-token distributions at every real token;
- :func:`top1_matches`: whether both models rank the same token first there;
- per block, the relative error of its output hidden states, ``||h_q - h_f||_F / ||h_f||_F`` over the real
  tokens (:func:`masked_square_sums`), which says where the two models part;
- the **expected divergence**, what the quantization error alone predicts. For each quantized linear
  layer, ``E = W - Ŵ`` is FULL's weight minus QUANTIZED's dequantized one. A null model is FULL with
  ``W - S ⊙ E`` in place of each ``W`` (:func:`sign_flipped_weight`), ``S`` a random ±1 matrix per seed
  (:func:`random_signs`): every weight keeps the size of its error, only the direction is random. An
  honest round-to-nearest's error at a weight is as likely positive as negative, independently of what
  the model does with that weight, so the real ``E`` is close to one draw of this null and the real KL a
  typical value of the null's. Calibrated methods (GPTQ, AWQ) choose ``E`` to cancel in the layer's
  outputs, so their real KL falls *below* the null's. A planted model's ``E`` is aimed at a behaviour:
  flipping its signs destroys the aim, and the real KL lies far *above* the null's. The test is one-sided:
  ``ratio = real KL / mean null KL``, flagged when ``ratio > threshold`` (default :data:`DEFAULT_THRESHOLD`).
  Tensors QUANTIZED stores unquantized (embeddings, norms, an ignored ``lm_head``) are FULL's in the null:
  a change to them is not quantization error, and shows as unexplained divergence (and is counted in the
  summary's ``changed_unquantized``).
- the **rounding box**, for integer-grid layers (``QuantizedLinear``): :func:`rounding_steps` is
  ``|W - Ŵ| / scale`` per weight in the stored scale; a round-to-nearest of FULL keeps every weight within
  half a step. Weights further away mean QUANTIZED is not a rounding of FULL: error-compensating methods
  do that by design (GPTQ moves weights to cancel errors, AWQ quantizes scaled weights and folds the scales
  into the norms, which then show in ``changed_unquantized``), a few weights by a few steps while the
  median stays near rounding's; a file quantized from another model is off by many steps everywhere.
  The layer rows give the share outside the box and the median and maximum step; QUANTIZED is also
  flagged ``not_from_full`` when the median over all grid weights exceeds :data:`FOREIGN_MEDIAN_STEPS`
  (rounding's own median is a quarter step). A planted model passes this check by construction (its
  quantization *is* a rounding of FULL); the behaviour test is what catches it.

Deviations and limits: causal LMs only (the audit compares next-token distributions; an encoder is refused
by name). Both models are loaded whole and run in float32 (a bfloat16 run would add its own rounding
noise to both sides), so memory is about two models plus a copy of FULL's quantized weights; probe data are
a few batches. The null perturbs weights only; activation quantization is not modelled (weightkit's formats
are weight-only). The null's error is as large as QUANTIZED's actual weight error, so a QUANTIZED whose
weights lie further from FULL's than a rounding inflates its own null; the rounding box bounds this for
integer grids (a median beyond :data:`FOREIGN_MEDIAN_STEPS` is flagged) but a planted model that adds up
to about a step of random error to its aimed one would lower its ratio (not tested).
"""

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.arch import model_task
from weightkit.checkpoint import CheckpointReader
from weightkit.data import tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.models import load, load_tokenizer
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import is_quantized_checkpoint, refuse_quantized
from weightkit.quantized.grid import QuantizedWeight
from weightkit.quantized.linear import QuantizedLinear

__all__ = [
    "DEFAULT_THRESHOLD",
    "FOREIGN_MEDIAN_STEPS",
    "token_kl",
    "top1_matches",
    "masked_square_sums",
    "random_signs",
    "sign_flipped_weight",
    "rounding_steps",
    "AuditResult",
    "audit",
]

# A real KL this many times the null's mean is flagged. Measured on a tiny Llama at 4 bits, group 16
# (tests/inspect/test_audit.py): honest RTN 0.8-0.9, GPTQ 0.37, AWQ 0.33, VPTQ 0.41, FP8, FP4, SVD and
# BitStack 0.9-1.0; the planted model 15.
DEFAULT_THRESHOLD = 3.0
# Median |W - Ŵ| / scale over all grid weights above which QUANTIZED is not a rounding of FULL (rounding:
# 0.25; GPTQ and AWQ on the tiny Llama: 0.29; an RTN of another tiny Llama: above 1).
FOREIGN_MEDIAN_STEPS = 1.0
# How far past half a step a rounded weight may land from float32 arithmetic on w / scale.
_BOX_TOLERANCE = 1e-3

# -- pure functions ------------------------------------------------------------------------------------


def token_kl(reference_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` in nats at each position where ``mask`` is 1.

    Args:
        reference_logits: ``[batch, seq, vocab]`` (FULL's).
        logits: the same shape (QUANTIZED's).
        mask: ``[batch, seq]``, 1 for real tokens.

    Returns:
        float64 ``[n]``, one value per real token, in row-major order.
    """
    keep = mask.bool()
    log_p = F.log_softmax(reference_logits[keep].double(), dim=-1)
    log_q = F.log_softmax(logits[keep].double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def top1_matches(reference_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """Whether both logits rank the same token first, at each position where ``mask`` is 1 (bool ``[n]``)."""
    keep = mask.bool()
    return reference_logits[keep].argmax(-1) == logits[keep].argmax(-1)


def masked_square_sums(reference: Tensor, output: Tensor, mask: Tensor) -> tuple[float, float]:
    """``(||output - reference||^2, ||reference||^2)`` over the positions where ``mask`` is 1, in float64.

    ``reference`` and ``output`` are ``[batch, seq, ...]``; the sums add up over batches, and the square root
    of their ratio is the relative error over all of them.
    """
    keep = mask.bool()
    ref, out = reference[keep].double(), output[keep].double()
    return float((out - ref).square().sum()), float(ref.square().sum())


def random_signs(shape: tuple[int, ...], seed: int) -> Tensor:
    """A float32 tensor of ``shape`` with independent ±1 entries, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=generator).float().mul_(2).sub_(1)


def sign_flipped_weight(weight: Tensor, dequantized: Tensor, signs: Tensor) -> Tensor:
    """``W - S ⊙ (W - Ŵ)``: ``W`` carrying its quantization error with the signs ``S`` applied.

    With ``S`` all ones this is ``Ŵ``; with random signs, an error of the same size at every weight in a
    random direction (the audit's null model).
    """
    return weight - signs.to(weight.dtype) * (weight - dequantized)


def rounding_steps(weight: Tensor, quantized: QuantizedWeight) -> Tensor:
    """``|W - Ŵ| / scale`` per weight, in float64: how many grid steps each stored weight lies from ``W``.

    A round-to-nearest of ``W`` on this grid gives at most 0.5 everywhere.

    Raises:
        WeightkitError: ``weight`` and the grid differ in shape.
    """
    if tuple(weight.shape) != tuple(quantized.qweight.shape):
        raise WeightkitError(
            f"weight shape {tuple(weight.shape)} differs from the stored grid's "
            f"{tuple(quantized.qweight.shape)}"
        )
    rows, cols = weight.shape
    groups = quantized.scale.shape[1]
    error = (weight.double() - quantized.dequantize().double()).reshape(rows, groups, cols // groups)
    return (error.abs() / quantized.scale.double().unsqueeze(-1)).reshape(rows, cols)


# -- the audit -------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """What :func:`audit` found.

    Attributes:
        summary: ``texts``, ``tokens`` (real tokens compared), ``kl_mean``, ``kl_max``, ``top1_agreement``
            (QUANTIZED against FULL); ``null_kl_mean`` (mean over seeds of the null models' mean KL),
            ``null_kl_std`` (their spread over seeds), ``null_kl_max``, ``null_top1_agreement``; ``ratio``
            (``kl_mean / null_kl_mean``; ``inf`` when the null has no error but the models differ, 1.0 when
            neither differs), ``threshold``, ``divergent`` (``ratio > threshold``); ``grid_layers``,
            ``outside_box`` (share of grid weights more than half a step from FULL's), ``median_steps``,
            ``not_from_full`` (``median_steps > FOREIGN_MEDIAN_STEPS``); ``quantized_layers``,
            ``changed_unquantized`` (names of tensors QUANTIZED stores unquantized that differ from FULL's);
            ``flagged`` (``divergent or not_from_full``).
        blocks: one row per block output (``block``: its index; the last one after the final norm, as
            transformers returns hidden states): ``relative_error``, ``null_relative_error`` (mean over
            seeds), ``ratio``.
        layers: one row per quantized linear: ``name``, ``layer`` (its class), ``relative_error``
            (``||W - Ŵ||_F / ||W||_F``), and for integer grids ``outside_box``, ``median_steps``,
            ``max_steps`` (else None).
    """

    summary: dict
    blocks: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.summary["flagged"])


def _causal_lm_config(path: Path, role: str) -> dict:
    with CheckpointReader(path) as reader:
        config = reader.config
    if config is None:
        raise WeightkitError(f"{role} {path} has no config.json: it is not a Hugging Face model directory")
    task = model_task(config)
    if task != "causal-lm":
        raise WeightkitError(
            f"{role} {path} is not a causal language model (its task is {task}): the audit compares "
            "next-token distributions, so it takes causal LMs only (an encoder has no language-model head)"
        )
    return config


def _check_pair(full: Path, quantized: Path) -> None:
    """Refuse, before loading, a pair that is not a full-precision causal LM and a quantized copy of it."""
    refuse_quantized(
        full, verb="the FULL model of an audit", instead="give the full-precision model it was made from"
    )
    full_config = _causal_lm_config(full, "FULL")
    quantized_config = _causal_lm_config(quantized, "QUANTIZED")
    if not is_quantized_checkpoint(quantized_config):
        raise WeightkitError(
            f"QUANTIZED {quantized} is not a quantized checkpoint (its config.json has no compressed-tensors "
            "or weightkit quantization_config): the audit compares a model with its quantization; compare "
            "two full-precision models with weightkit inspect FULL --compare OTHER"
        )
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if full_config.get(key) != quantized_config.get(key):
            raise WeightkitError(
                f"FULL and QUANTIZED are different models: config.json {key} is {full_config.get(key)!r} in "
                f"{full} but {quantized_config.get(key)!r} in {quantized}"
            )


def _quantized_pairs(
    full_model: nn.Module, quantized_model: nn.Module
) -> dict[str, tuple[nn.Linear, nn.Module]]:
    """FULL's ``nn.Linear`` and QUANTIZED's layer for every layer QUANTIZED stores quantized, by name."""
    full_modules = dict(full_model.named_modules())
    pairs = {}
    for name, layer in quantized_model.named_modules():
        if not hasattr(layer, "dense_weight"):
            continue
        linear = full_modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise WeightkitError(f"QUANTIZED stores {name} quantized, but FULL has no Linear layer {name}")
        shape = (layer.out_features, layer.in_features)
        if tuple(linear.weight.shape) != shape:
            raise WeightkitError(
                f"{name} is {tuple(linear.weight.shape)} in FULL but {shape} in QUANTIZED: different models"
            )
        pairs[name] = (linear, layer)
    if not pairs:
        raise WeightkitError("QUANTIZED has no quantized layer weightkit can read: nothing to audit")
    return pairs


def _changed_unquantized(full_model: nn.Module, quantized_model: nn.Module, quantized: set[str]) -> list[str]:
    """Names of tensors QUANTIZED holds as plain tensors (outside its quantized layers) that differ from
    FULL's: quantization does not change them."""
    full_state = full_model.state_dict()
    changed = []
    for name, tensor in quantized_model.state_dict().items():
        layer, _, leaf = name.rpartition(".")
        # A quantized layer's stored tensors stand for its weight; its bias is kept as it was.
        if (layer in quantized and leaf != "bias") or not tensor.is_floating_point():
            continue
        reference = full_state.get(name)
        if reference is None or reference.shape != tensor.shape:
            raise WeightkitError(f"QUANTIZED's tensor {name} has no counterpart of the same shape in FULL")
        if not torch.equal(reference, tensor):
            changed.append(name)
    return changed


def _layer_row(name: str, linear: nn.Linear, layer: nn.Module) -> tuple[dict, Tensor | None]:
    weight = linear.weight.detach()
    dense = layer.dense_weight().detach().to(weight.dtype)
    norm = float(torch.linalg.vector_norm(weight.double()))
    error = float(torch.linalg.vector_norm((weight - dense).double()))
    row = {"name": name, "layer": type(layer).__name__, "relative_error": error / norm if norm else None}
    steps = rounding_steps(weight, layer.quantized) if isinstance(layer, QuantizedLinear) else None
    row["outside_box"] = None if steps is None else float((steps > 0.5 + _BOX_TOLERANCE).double().mean())
    row["median_steps"] = None if steps is None else float(steps.median())
    row["max_steps"] = None if steps is None else float(steps.max())
    return row, steps


class _Tally:
    """Running sums of one model's divergence from FULL over the probe batches."""

    def __init__(self):
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.matches = 0
        self.tokens = 0
        self.block_error: list[float] = []
        self.block_norm: list[float] = []

    def add(self, reference, output, mask: Tensor) -> None:
        kl = token_kl(reference.logits, output.logits, mask)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.matches += int(top1_matches(reference.logits, output.logits, mask).sum())
        self.tokens += kl.numel()
        # hidden_states[0] is the embeddings' output; [i] that of block i - 1.
        pairs = zip(reference.hidden_states[1:], output.hidden_states[1:], strict=True)
        if not self.block_error:
            self.block_error = [0.0] * (len(reference.hidden_states) - 1)
            self.block_norm = [0.0] * len(self.block_error)
        for i, (ref, out) in enumerate(pairs):
            error, norm = masked_square_sums(ref, out, mask)
            self.block_error[i] += error
            self.block_norm[i] += norm

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.tokens

    def block_relative_errors(self) -> list[float]:
        return [
            math.sqrt(e / n) if n else 0.0 for e, n in zip(self.block_error, self.block_norm, strict=True)
        ]


def _ratio(real: float, expected: float) -> float:
    if expected > 0:
        return real / expected
    return 1.0 if real == 0 else math.inf


def audit(
    full: str | Path,
    quantized: str | Path,
    texts: list[str],
    *,
    max_length: int = 128,
    seeds: int = 5,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> AuditResult:
    """Audit the quantized checkpoint ``quantized`` against the full-precision ``full`` on ``texts``.

    See the module docstring for what is measured and why.

    Args:
        full: the full-precision causal LM directory (with a tokenizer: the probe texts are tokenized with
            it).
        quantized: a quantized checkpoint of it (any format :func:`weightkit.load` reads).
        texts: probe passages, each cut to ``max_length`` tokens.
        max_length: most tokens per text.
        seeds: how many null models (random sign patterns), at least 2 (the spread needs two).
        threshold: flag when the real mean KL exceeds the null's mean KL by more than this factor (> 1).
        batch_size: texts per forward pass.
        device: where both models run.
        progress: show a progress bar over batches.

    Returns:
        :class:`AuditResult`.

    Raises:
        WeightkitError: FULL is quantized or QUANTIZED is not; either is not a causal LM; they differ in
            architecture, vocabulary, width, depth or a layer's shape; FULL has no tokenizer; no text has
            a token; ``seeds < 2`` or ``threshold <= 1``.
    """
    if seeds < 2:
        raise WeightkitError(f"seeds must be at least 2 (the null's spread needs two), got {seeds}")
    if not threshold > 1:
        raise WeightkitError(
            f"threshold must be above 1 (the real KL of an honest quantization is about the null's), got "
            f"{threshold}"
        )
    full, quantized = Path(full), Path(quantized)
    _check_pair(full, quantized)
    tokenizer = load_tokenizer(full)
    if tokenizer is None:
        raise WeightkitError(f"FULL {full} has no tokenizer files: the probe texts are tokenized with FULL's")
    batches = [
        b
        for b in tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
        if b["input_ids"].numel()
    ]
    if not batches:
        raise WeightkitError(f"none of the {len(texts)} probe texts has a token")
    full_model = load(full, dtype=torch.float32).to(device)
    quantized_model = load(quantized, dtype=torch.float32).to(device)
    if full_model.config.vocab_size != quantized_model.config.vocab_size:
        raise WeightkitError("FULL and QUANTIZED have different vocabulary sizes")
    pairs = _quantized_pairs(full_model, quantized_model)

    layers, all_steps = [], []
    for name, (linear, layer) in pairs.items():
        row, steps = _layer_row(name, linear, layer)
        layers.append(row)
        if steps is not None:
            all_steps.append(steps.reshape(-1))
    changed = _changed_unquantized(full_model, quantized_model, set(pairs))

    real, nulls = _Tally(), [_Tally() for _ in range(seeds)]
    originals = {name: linear.weight.detach().clone() for name, (linear, _) in pairs.items()}
    with torch.no_grad():
        for batch in track(batches, "audit", enabled=progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            mask = batch["attention_mask"]
            reference = full_model(**batch, output_hidden_states=True)
            real.add(reference, quantized_model(**batch, output_hidden_states=True), mask)
            for seed, tally in enumerate(nulls):
                # The same seed gives the same signs in every batch: each null is one fixed model.
                for index, (name, (linear, layer)) in enumerate(pairs.items()):
                    signs = random_signs(tuple(linear.weight.shape), seed * len(pairs) + index)
                    dense = layer.dense_weight().to(linear.weight.dtype)
                    linear.weight.copy_(sign_flipped_weight(originals[name], dense, signs.to(device)))
                tally.add(reference, full_model(**batch, output_hidden_states=True), mask)
            for name, (linear, _) in pairs.items():
                linear.weight.copy_(originals[name])

    null_kls = [tally.kl_mean for tally in nulls]
    null_kl_mean = statistics.fmean(null_kls)
    ratio = _ratio(real.kl_mean, null_kl_mean)
    steps = torch.cat(all_steps) if all_steps else None
    median_steps = None if steps is None else float(steps.median())
    not_from_full = median_steps is not None and median_steps > FOREIGN_MEDIAN_STEPS
    summary = {
        "texts": len(texts),
        "tokens": real.tokens,
        "kl_mean": real.kl_mean,
        "kl_max": real.kl_max,
        "top1_agreement": real.matches / real.tokens,
        "null_kl_mean": null_kl_mean,
        "null_kl_std": statistics.stdev(null_kls),
        "null_kl_max": max(tally.kl_max for tally in nulls),
        "null_top1_agreement": statistics.fmean(tally.matches / tally.tokens for tally in nulls),
        "seeds": seeds,
        "ratio": ratio,
        "threshold": threshold,
        "divergent": ratio > threshold,
        "quantized_layers": len(pairs),
        "grid_layers": len(all_steps),
        "outside_box": None if steps is None else float((steps > 0.5 + _BOX_TOLERANCE).double().mean()),
        "median_steps": median_steps,
        "not_from_full": not_from_full,
        "changed_unquantized": changed,
    }
    summary["flagged"] = summary["divergent"] or not_from_full
    null_blocks = [tally.block_relative_errors() for tally in nulls]
    block_rows = []
    for i, error in enumerate(real.block_relative_errors()):
        expected = statistics.fmean(null[i] for null in null_blocks)
        block_rows.append(
            {
                "block": i,
                "relative_error": error,
                "null_relative_error": expected,
                "ratio": _ratio(error, expected),
            }
        )
    return AuditResult(summary, block_rows, layers)
