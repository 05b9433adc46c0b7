"""VPTQ: vector post-training quantization with Hessian-weighted k-means codebooks.

"VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models", arXiv:2409.17066
(Microsoft; reference code: github.com/microsoft/VPTQ, whose ``algorithm.md`` gives the settings used).

A weight ``[out, in]`` is cut into vectors of ``v`` consecutive *output* rows within one input column
(the reference's layout, ``enable_transpose``, which its quantizer always turns on: every vector lies
in a single column, so every weight of a vector multiplies the same input feature and shares one
Hessian row). Each vector is stored as the
index of its nearest codeword in a codebook of ``k`` vectors (``log2(k) / v`` bits per weight); the
codebook itself is stored in fp16. The algorithm, as in the paper and its reference code:

1. **Hessian-weighted k-means** on the layer's vectors trains the codebook (the reference's
   ``kmeans_mode="hessian"``). A vector in column ``j`` weighs ``H_jj``: the output error of changing
   column ``j`` alone by ``dw`` is ``H_jj ||dw||^2`` (``tr(dW H dW^T)`` with the off-diagonal terms,
   which the sweep below compensates, left out). The diagonal of ``H`` itself, not of its inverse: the
   weight is the cost of an error, not GPTQ's post-compensation cost ``1 / [H^-1]_jj``. As every
   coordinate of a vector has the same weight, the weighting changes only the centroid update (a
   weighted mean), not which centroid is nearest.
2. **A GPTQ column sweep** assigns the vectors: column by column, each vector of the column takes its
   nearest codeword, and the column's error moves onto the columns not yet quantized through the upper
   Cholesky factor of ``H^-1``, exactly GPTQ's update (the reference runs its sweep with a step of
   one column in this layout). Lazy block updates as in GPTQ; optionally the columns go
   in order of decreasing ``H_jj`` (the reference's ``enable_perm``, GPTQ's ``act_order``).
3. **Residual codebook** (optional): a second Hessian-weighted k-means on the residual the first sweep
   left (``updated weight - its codeword``), then the sweep runs again from the original weight, each
   vector taking its nearest main codeword and then the residual codeword nearest to what is left.

Deliberate deviations and what is not done:

- k-means starts from ``k`` distinct vectors of the layer drawn with a seeded generator (the reference
  draws random vectors too, with cuML) and keeps a centroid that loses all its vectors where it is
  (the reference leaves that to cuML); it stops after ``kmeans_iterations`` Lloyd steps or as soon as no
  assignment changes (the reference: 100 steps or a relative tolerance of 1e-5).
- Centroids are rounded to fp16 *before* the sweep, so the error feedback uses exactly the values the
  codebook will be stored with.
- The weight's rows must be a multiple of ``v`` (the reference pads the column); anything else is refused.
- The vector length and codebook size for a number of bits per weight are chosen per layer by a rule of
  weightkit's (:func:`vptq_spec_for_layer`) unless given: the paper and the reference take them as
  settings for the whole model (``v8-k65536`` ...), tuned on GPUs for 7B-405B models.
- Not done (there is no option for them, so nothing is silently approximated): the reference's outlier
  codebook (``npercent``: its own codebook and vector length for the first ``N%`` of the columns; the
  settings in ``algorithm.md`` use ``npercent 0``), several codebooks per layer (``group_num > 1``), the
  per-column weight normalisation the reference's examples turn on (``enable_norm``: each column
  standardised by its mean and standard deviation before quantization, both stored), and the
  layer-wise and end-to-end fine-tuning of the codebooks.

The stored form (:class:`~weightkit.quantized.codebook.VPTQWeight`) is :mod:`weightkit.quantized.codebook`.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

from weightkit.compress.quant.config import CalibrationFields
from weightkit.compress.quant.gptq import factor_inverse_hessian, sweep_inputs
from weightkit.errors import WeightkitError
from weightkit.quantized.codebook import CODEBOOK_DTYPE, MAX_INDEX_BITS, VPTQSpec, VPTQWeight
from weightkit.select import DEFAULT_IGNORE

__all__ = [
    "AUTO_MAX_INDEX_BITS",
    "WEIGHTS_PER_CODEBOOK_ENTRY",
    "VPTQConfig",
    "VPTQScheme",
    "auto_vector_lengths",
    "hessian_weighted_kmeans",
    "nearest_codeword",
    "vectors_to_weight",
    "vptq_codebooks",
    "vptq_quantize",
    "vptq_spec_for_bits",
    "vptq_spec_for_layer",
    "weight_to_vectors",
]

# Distances are computed for this many (vector, codeword) pairs at a time (8 MB in float64). Small chunks
# are also faster: k-means on 36 864 vectors, k = 256, 20 steps took 1.5 s with 2^25 pairs a chunk and
# 0.4 s with 2^20 (float64, one thread; the large buffers were page-faulted in afresh on every step).
_DISTANCE_CHUNK = 2**20


# The automatic choice of vector length (``vector_length=None``, see :func:`vptq_spec_for_layer`):
# at most this many index bits per codebook (4096 codewords), which bounds the k-means cost ...
AUTO_MAX_INDEX_BITS = 12
# ... and at least this many weights per fp16 codebook entry (codebooks cost at most 16/128 = 0.125 bits per
# weight, what one fp16 scale per group of 128 costs an integer grid; every codeword has >= 128 vectors).
WEIGHTS_PER_CODEBOOK_ENTRY = 128


def vptq_codebooks(
    bits: float, *, vector_length: int, residual_bits: float = 0, name: str = "weight"
) -> VPTQSpec:
    """The codebooks giving ``bits`` index bits per weight with vectors of ``vector_length``, whatever the
    weight's shape (:func:`vptq_spec_for_bits` checks a shape too).

    Raises:
        WeightkitError: ``bits * vector_length`` or ``residual_bits * vector_length`` is not a whole
            number of index bits, or a codebook would need more than 16 index bits.
    """
    if not 0 <= residual_bits < bits:
        raise WeightkitError(f"residual bits must lie in [0, bits={bits}), got {residual_bits}")
    per_vector = []
    for what, b in (("bits", bits), ("residual bits", residual_bits)):
        # A product of two floats (0.3 * 10): whole within rounding error counts as whole.
        exact = b * vector_length
        if abs(exact - round(exact)) > 1e-9:
            raise WeightkitError(
                f"{name}: {what} {b} x vector length {vector_length} = {exact:g} index bits per vector; "
                f"it must be a whole number"
            )
        per_vector.append(round(exact))
    main_index, residual_index = per_vector[0] - per_vector[1], per_vector[1]
    if main_index > MAX_INDEX_BITS or residual_index > MAX_INDEX_BITS:
        raise WeightkitError(
            f"{name}: {main_index} index bits per vector for the codebook and {residual_index} for the "
            f"residual codebook; each can have at most {MAX_INDEX_BITS} (2^{MAX_INDEX_BITS} codewords): "
            f"use a shorter vector length or give more bits to the residual codebook"
        )
    return VPTQSpec(vector_length, 2**main_index, 2**residual_index if residual_index else 0)


def vptq_spec_for_bits(
    shape: tuple[int, int],
    bits: float,
    *,
    vector_length: int = 8,
    residual_bits: float = 0,
    name: str = "weight",
) -> VPTQSpec:
    """The codebooks giving ``bits`` index bits per weight with vectors of ``vector_length``.

    ``bits`` counts the indices only, as the paper's and the reference's model names do
    (``v8-k65536`` is 2 bits); :meth:`VPTQSpec.effective_bits` adds the fp16 codebooks. ``residual_bits``
    of them go to a residual codebook: ``bits=2, vector_length=8`` gives ``k = 2^16``, and with
    ``residual_bits=1`` ``k = 2^8`` plus a residual ``k = 2^8``.

    Raises:
        WeightkitError: ``bits * vector_length`` or ``residual_bits * vector_length`` is not a whole
            number of index bits, a codebook would need more than 16 index bits, or a codebook has more
            codewords than the layer has vectors.
    """
    spec = vptq_codebooks(bits, vector_length=vector_length, residual_bits=residual_bits, name=name)
    spec.check_shape(tuple(shape), name)
    return spec


def auto_vector_lengths(bits: float, residual_bits: float = 0) -> list[int]:
    """The vector lengths :func:`vptq_spec_for_layer` chooses from, longest first: those giving each
    codebook a whole number of index bits per vector, at most :data:`AUTO_MAX_INDEX_BITS`."""
    if not 0 <= residual_bits < bits:
        return []
    lengths = []
    # The main codebook has (bits - residual_bits) * v index bits: no longer vector can stay under the cap.
    for v in range(int(AUTO_MAX_INDEX_BITS / (bits - residual_bits) + 1e-9), 0, -1):
        try:
            spec = vptq_codebooks(bits, vector_length=v, residual_bits=residual_bits)
        except WeightkitError:  # not a whole number of index bits
            continue
        if max(spec.centroids, spec.residual_centroids) <= 2**AUTO_MAX_INDEX_BITS:
            lengths.append(v)
    return lengths


def vptq_spec_for_layer(
    shape: tuple[int, int],
    bits: float,
    *,
    vector_length: int | None = None,
    residual_bits: float = 0,
    name: str = "weight",
) -> VPTQSpec:
    """The codebooks of one ``[out, in]`` layer: :func:`vptq_spec_for_bits` for a given ``vector_length``;
    for ``None``, the longest vector length ``v`` (of :func:`auto_vector_lengths`) such that

    1. ``v`` divides the ``out`` rows (vectors run along the rows, the paper's layout), and
    2. the fp16 codebooks have at most one entry per :data:`WEIGHTS_PER_CODEBOOK_ENTRY` (128) weights:
       ``(k + k_residual) * v * 128 <= out * in``.

    Why: at equal index bits a longer vector quantizes better (a codebook in more dimensions fits the
    joint distribution of the weights; the reference's published 2-bit models use ``v = 8, k = 65536``, and
    ``v = 12`` or 16 with a residual codebook), but the codebook grows as ``2^(bits * v)``. Rule 2 keeps the
    codebooks to 0.125 bits per weight (what an integer grid's fp16 scale per group of 128 costs, so "2
    bits" means about the same size for both) and gives every codeword at least 128 vectors to be trained
    on. :data:`AUTO_MAX_INDEX_BITS` (4096 codewords) bounds the time: a k-means step, and the sweep,
    compare every vector with every codeword, ``out * in * k / v`` pairs, at 0.07e9-0.25e9 pairs per second
    measured on 2 CPU cores (the lower for short vectors). A 4096x4096 layer at 2 bits with ``v = 4,
    k = 256`` is 1.1e9 pairs, several seconds per step (up to 100 steps); with ``v = 8, k = 65536`` (0.5
    bits of codebook per weight there) 1.4e11 pairs, over ten minutes per step. Examples at 2 bits:
    384x384 (MiniLM) and 4096x4096 get ``v = 4, k = 256`` (0.11 and 0.001 bits of codebook per weight);
    3072x8192 gets ``v = 6, k = 4096`` (0.016 bits); 32x64 gets ``v = 1, k = 4``. Ask for a
    ``vector_length`` to go beyond (up to 16 index bits per codebook).

    Raises:
        WeightkitError: the weight is not 2-D, or no vector length satisfies the rules (a layer too small
            for ``bits`` or with a row count no allowed length divides), naming the layer.
    """
    if vector_length is not None:
        return vptq_spec_for_bits(
            shape, bits, vector_length=vector_length, residual_bits=residual_bits, name=name
        )
    if len(shape) != 2:
        raise WeightkitError(f"{name}: only 2-D weights can be vector-quantized, got shape {tuple(shape)}")
    rows, cols = shape
    lengths = auto_vector_lengths(bits, residual_bits)
    for v in lengths:
        spec = vptq_codebooks(bits, vector_length=v, residual_bits=residual_bits, name=name)
        codewords = spec.centroids + spec.residual_centroids
        if rows % v == 0 and codewords * v * WEIGHTS_PER_CODEBOOK_ENTRY <= rows * cols:
            return spec
    raise WeightkitError(
        f"{name}: no vector length fits {bits:g} index bits per weight in this {rows}x{cols} weight: the "
        f"lengths giving whole index bits ({', '.join(map(str, lengths))}) either do not divide its {rows} "
        f"rows or need codebooks of more than one fp16 entry per {WEIGHTS_PER_CODEBOOK_ENTRY} weights; give "
        f"a vector length, fewer bits, or leave the layer out (ignore)"
    )


@dataclass(frozen=True)
class VPTQScheme:
    """How one layer is vector-quantized: ``bits`` index bits per weight (``residual_bits`` of them in a
    residual codebook) with vectors of ``vector_length``, or of a length chosen from the layer's shape
    (``None``, :func:`vptq_spec_for_layer`). What ``VPTQConfig.scheme_for`` gives, as a grid config's
    ``QuantScheme``: the codebooks themselves depend on the shape."""

    bits: float
    vector_length: int | None = None
    residual_bits: float = 0

    def spec_for(self, shape: tuple[int, int], name: str) -> VPTQSpec:
        """The codebooks of a weight of ``shape`` (``name`` in messages)."""
        return vptq_spec_for_layer(
            shape, self.bits, vector_length=self.vector_length, residual_bits=self.residual_bits, name=name
        )

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Refuse a weight this scheme cannot quantize, naming the tensor."""
        self.spec_for(shape, name)


@dataclass
class VPTQConfig(CalibrationFields):
    """VPTQ (arXiv:2409.17066): vectors of weights replaced by the nearest codeword of a k-means codebook
    trained per layer, assigned column by column with GPTQ's error feedback (see the module docstring).

    Attributes (besides the calibration fields; ``seed`` also seeds k-means):
        bits: index bits per weight, the indices only (the fp16 codebooks add a little, counted in the
            saved size): ``log2(k) / v``, so it may be fractional (2.5 with vectors of 2, 4, 6 ...).
        vector_length: ``v``, output rows per vector; ``None`` chooses it per layer from the layer's shape
            (:func:`vptq_spec_for_layer`: the longest whose codebooks stay under 0.125 bits per weight
            with at most 4096 codewords). Longer vectors quantize better and cost exponentially larger
            codebooks.
        residual_bits: of ``bits``, the index bits per weight of a second, residual codebook fitted to
            what the first leaves (0: none). ``bits=2, vector_length=8, residual_bits=1`` is two
            codebooks of 256.
        damp: fraction of the mean Hessian diagonal added to its diagonal before inverting (GPTQ's).
        act_order: sweep the input columns from the most activated (the reference's ``enable_perm``,
            on in its published settings).
        kmeans_iterations: most Lloyd steps per codebook (the reference's ``kiter``: 100). The time of
            VPTQ is mostly k-means: each step compares every vector with every codeword (2 bits on the
            bundled MiniLM, 36 layers with ``v = 4, k = 256``, 64 calibration texts: 444 s in
            ``bench/compress.py`` on a CPU core shared with another job, against 55 s for GPTQ).
        block_size: columns per lazy batch update (speed only, the result is the same).
        targets: module names or ``re:`` patterns to quantize; ``_default`` means every linear layer.
        ignore: names or patterns left in full precision (default: embeddings, lm_head, norms, pooler).
    """

    bits: float = 2.0
    vector_length: int | None = None
    residual_bits: float = 0
    damp: float = 0.01
    act_order: bool = True
    kmeans_iterations: int = 100
    block_size: int = 128
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self):
        CalibrationFields.__post_init__(self)
        if not 0 < self.bits <= MAX_INDEX_BITS:
            raise WeightkitError(f"bits must be in (0, {MAX_INDEX_BITS}], got {self.bits}")
        if not 0 <= self.residual_bits < self.bits:
            raise WeightkitError(
                f"residual_bits must lie in [0, bits={self.bits:g}), got {self.residual_bits}"
            )
        self.bits, self.residual_bits = float(self.bits), float(self.residual_bits)
        if self.vector_length is not None:
            if isinstance(self.vector_length, bool) or not isinstance(self.vector_length, int):
                raise WeightkitError(
                    f"vector_length must be a positive integer or None, got {self.vector_length!r}"
                )
            if self.vector_length < 1:
                raise WeightkitError(
                    f"vector_length must be a positive integer or None, got {self.vector_length}"
                )
            vptq_codebooks(
                self.bits, vector_length=self.vector_length, residual_bits=self.residual_bits, name="vptq"
            )
        elif not auto_vector_lengths(self.bits, self.residual_bits):
            split = f" with residual_bits {self.residual_bits:g}" if self.residual_bits else ""
            raise WeightkitError(
                f"bits {self.bits:g}{split}: no vector length gives each codebook a whole number of index "
                f"bits per vector, at most {AUTO_MAX_INDEX_BITS}; use a multiple of 1/v for a short vector "
                f"length v (2, 2.5, 1.75 ...), or give vector_length"
            )
        if not 0 <= self.damp < 1:
            raise WeightkitError(f"damp must be in [0, 1), got {self.damp}")
        if self.kmeans_iterations < 1:
            raise WeightkitError(f"kmeans_iterations must be at least 1, got {self.kmeans_iterations}")
        if self.block_size < 1:
            raise WeightkitError(f"block_size must be at least 1, got {self.block_size}")

    @property
    def overrides(self) -> dict[str, dict]:
        return {}  # one rule for every layer: nothing to vary per module

    def scheme_for(self, module_name: str) -> VPTQScheme:
        """How ``module_name`` is quantized (the same rule for every module)."""
        return VPTQScheme(self.bits, self.vector_length, self.residual_bits)


def weight_to_vectors(w: Tensor, vector_length: int) -> Tensor:
    """``[out, in] -> [out // v * in, v]``; vector ``r * in + j`` is rows ``r*v`` to ``r*v+v-1`` of column j.

    The paper's layout: a vector never spans two input columns, so the column sweep quantizes whole
    vectors and every entry of a vector shares one Hessian diagonal ``H_jj``.
    """
    rows, cols = w.shape
    return w.reshape(rows // vector_length, vector_length, cols).transpose(1, 2).reshape(-1, vector_length)


def vectors_to_weight(vectors: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`weight_to_vectors` for a weight with ``cols`` input columns."""
    v = vectors.shape[1]
    return vectors.reshape(-1, cols, v).transpose(1, 2).reshape(-1, cols)


def nearest_codeword(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index (``int64``, ``[n]``) of the codeword nearest (Euclidean) to each of ``vectors`` ``[n, v]``."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term is the same for every codeword.
    sq_norms = codebook.square().sum(1)
    chunk = max(1, _DISTANCE_CHUNK // codebook.shape[0])
    return torch.cat(
        [torch.addmm(sq_norms, part, codebook.T, alpha=-2).argmin(1) for part in vectors.split(chunk)]
    )


def hessian_weighted_kmeans(
    vectors: Tensor, sample_weight: Tensor, k: int, *, iterations: int = 100, seed: int = 0
) -> Tensor:
    """Codebook ``[k, v]`` of weighted k-means (Lloyd) on ``vectors`` ``[n, v]``, in ``vectors``' dtype.

    Each centroid is the ``sample_weight``-weighted mean of the vectors nearest to it; VPTQ weighs a
    vector by the Hessian diagonal ``H_jj`` of its column. Starts from ``k`` distinct vectors drawn with
    ``seed`` (all of them, repeated to ``k`` rows, if there are fewer than ``k``); stops after
    ``iterations`` steps or when no vector changes centroid. A centroid left without vectors stays put.
    """
    if k > vectors.shape[0]:
        raise WeightkitError(f"k-means with {k} centroids needs at least {k} vectors, got {vectors.shape[0]}")
    if sample_weight.shape != vectors.shape[:1] or bool((sample_weight < 0).any()):
        raise WeightkitError("k-means sample weights must be one non-negative number per vector")
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    distinct = torch.unique(vectors, dim=0)
    draw = torch.randperm(distinct.shape[0], generator=generator, device=vectors.device)
    if distinct.shape[0] < k:  # every distinct vector is a centroid; the copies never win a vector
        draw = draw.repeat(-(-k // distinct.shape[0]))
    centroids = distinct[draw[:k]].clone()
    assignment = None
    for _ in range(iterations):
        new_assignment = nearest_codeword(vectors, centroids)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        mass = torch.zeros(k, dtype=vectors.dtype, device=vectors.device).index_add_(
            0, assignment, sample_weight
        )
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors * sample_weight.unsqueeze(1))
        filled = mass > 0
        centroids[filled] = sums[filled] / mass[filled].unsqueeze(1)
    return centroids


def _sweep(
    W: Tensor, U: Tensor, codebook: Tensor, residual_codebook: Tensor | None, block_size: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """GPTQ's column sweep with vector codewords; ``W`` is updated in place.

    ``U`` is the upper Cholesky factor of ``H^-1`` with rows divided by their diagonal. Returns the
    indices ``[out // v, in]``, residual indices or None, and ``W - Q`` with ``W`` as updated by the
    sweep (what is left for a residual codebook to fit).
    """
    rows, cols = W.shape
    v = codebook.shape[1]
    indices = torch.empty(rows // v, cols, dtype=torch.int64, device=W.device)
    residual_indices = None if residual_codebook is None else torch.empty_like(indices)
    left = torch.empty_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        WT = W[:, b0:b1].T.contiguous()  # the block's columns as contiguous rows
        ET = torch.empty_like(WT)
        for i in range(b1 - b0):
            column = WT[i].reshape(-1, v)
            idx = nearest_codeword(column, codebook)
            q = codebook[idx]
            indices[:, b0 + i] = idx
            if residual_codebook is not None:
                ridx = nearest_codeword(column - q, residual_codebook)
                q = q + residual_codebook[ridx]
                residual_indices[:, b0 + i] = ridx
            torch.sub(WT[i], q.reshape(-1), out=ET[i])
            # GPTQ's update: this column's error moves onto the block's remaining columns.
            WT[i + 1 :].addr_(U[b0 + i, b0 + i + 1 : b1], ET[i], alpha=-1)
        left[:, b0:b1] = ET.T
        # Lazy batch update: the rest of the matrix gets the whole block's error at once.
        W[:, b1:] -= ET.T @ U[b0:b1, b1:]
    return indices, residual_indices, left


def vptq_quantize(
    w: Tensor,
    h: Tensor,
    spec: VPTQSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    kmeans_iterations: int = 100,
    seed: int = 0,
    name: str = "weight",
) -> VPTQWeight:
    """Vector-quantize ``w`` with VPTQ given the Hessian of its inputs.

    Args:
        w: weight ``[out, in]``; ``out`` must be a multiple of ``spec.vector_length``.
        h: ``[in, in]`` Hessian from :class:`~weightkit.compress.quant.hessian.Hessian`.
        spec: vector length and codebook sizes (see :func:`vptq_spec_for_bits`).
        damp: fraction of the mean Hessian diagonal added to its diagonal before inverting (GPTQ's).
        block_size: columns per lazy batch update; changes speed, not the result.
        act_order: sweep the columns in order of decreasing ``H_jj`` (the most activated input channels
            first, while there is still freedom left to compensate their error). The main codebook does
            not depend on it; the indices come back in the original column order.
        kmeans_iterations: most Lloyd steps per codebook.
        seed: seeds the k-means starting centroids.
        name: the tensor's name for error messages.

    Returns:
        Indices and fp16 codebooks; :meth:`VPTQWeight.dequantize` gives the quantized weight.

    Raises:
        WeightkitError: bad shapes, non-finite inputs, a codebook larger than the layer's vectors, or a
            Hessian that stays singular after retries.

    Notes:
        Work is done in float32 (float64 if ``w`` or ``h`` is float64). Inputs with ``H_jj == 0`` never
        fire: their weights are set to zero, weigh nothing in k-means, and ``H_jj`` becomes 1 so the
        inverse exists.
    """
    spec.check_shape(tuple(w.shape), name)
    if kmeans_iterations < 1:
        raise WeightkitError(f"kmeans_iterations must be a positive integer, got {kmeans_iterations}")
    rows = w.shape[0]
    W, H, diagonal = sweep_inputs(w, h, damp=damp, block_size=block_size, name=name)
    cdtype = W.dtype
    v = spec.vector_length
    # The k-means weight of vector ``r * in + j`` is its column's H_jj, taken before dead columns are patched.
    vector_weight = diagonal.repeat(rows // v)

    def kmeans(vectors: Tensor, k: int) -> Tensor:
        """A codebook in fp16, trained on vectors in the original column order (as ``vector_weight``)."""
        centroids = hessian_weighted_kmeans(
            vectors, vector_weight, k, iterations=kmeans_iterations, seed=seed
        )
        return centroids.to(CODEBOOK_DTYPE)

    codebook = kmeans(weight_to_vectors(W, v), spec.centroids)

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Indices and residuals come back to the original column order through this.
    unpermute = torch.argsort(perm) if act_order else slice(None)
    U = factor_inverse_hessian(H, damp, name)
    # Errors are kept as ``w - q`` rather than GPTQ's ``(w - q) / U_jj``: U's rows are divided once.
    U = U / U.diagonal().unsqueeze(1)

    indices, _, left = _sweep(W.clone(), U, codebook.to(cdtype), None, block_size)
    if not spec.residual_centroids:
        return VPTQWeight(indices[:, unpermute].to(torch.int32), codebook)

    residual_codebook = kmeans(weight_to_vectors(left[:, unpermute], v), spec.residual_centroids)
    indices, residual_indices, _ = _sweep(W, U, codebook.to(cdtype), residual_codebook.to(cdtype), block_size)
    return VPTQWeight(
        indices[:, unpermute].to(torch.int32),
        codebook,
        residual_indices[:, unpermute].to(torch.int32),
        residual_codebook,
    )
