"""AWQ: activation-aware weight quantization (scale search and clipping search).

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978.

A few input channels carry much larger activations than the rest, and the rounding error of their
weights dominates the output error. AWQ multiplies those weight columns by a per-channel scale ``s > 1``
before rounding (and divides the layer's input by ``s``, folded into the previous operation, so the
float model is unchanged): the salient weights then sit on a relatively finer grid. A grid search
picks ``s`` by the output error it leaves; a second search then shrinks each group's quantization
range (clipping outlier weights) where that lowers the output error.

As the reference code (mit-han-lab/llm-awq, AutoAWQ, llm-compressor's ``AWQModifier``) runs it:

- candidates: ``s = x^alpha`` (the paper), or with *duo scaling* ``s = x^alpha / w^(1 - alpha)``, ``x``
  the mean input magnitude per channel and ``w`` the mean per channel of the weights' magnitudes,
  each relative to its quantization group's largest (:func:`weight_magnitude`). Duo scaling is the
  default, as in llm-compressor and AutoAWQ; :func:`scale_candidates` gives the grid of both;
- the error of a candidate is measured at the output of the module the layers feed (the attention
  block for q/k/v, the MLP for gate/up, the layer itself when it is alone); for a single linear this
  is :func:`output_error` through its inputs' Hessian, for a module the driver runs it;
- clipping (:func:`awq_search_clip`) clamps each (row, group) of the weight to ``ratio * max|w|``
  for ``ratio`` in ``1, 1 - 1/n_grid, ...`` (``max_shrink * n_grid`` values, down to 0.55 by default)
  and keeps the ratio with the least output error on 512 sampled tokens; the driver skips the query
  and key projections, whose errors meet in the ``q . k`` product that a per-layer error cannot see.

These are the pure searches; hooking, folding ``1/s`` into the previous layer and quantizing belong to
the model-level driver (:mod:`weightkit.compress.quant.calibrated`).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, rtn_quantize

__all__ = [
    "CLIP_SAMPLE_TOKENS",
    "ScaleCandidate",
    "awq_scales",
    "awq_search_clip",
    "awq_search_scales",
    "clip_ratios",
    "clip_weight",
    "even_sample",
    "output_error",
    "scale_candidates",
    "scaled_rtn",
    "weight_magnitude",
]

# Tokens the clip search scores each candidate on (as the reference code); evenly spaced over the data.
CLIP_SAMPLE_TOKENS = 512

# Elements in one chunk of the clip search's [rows, groups, tokens] error tensor (~64 MB in float32).
_CLIP_CHUNK_ELEMENTS = 1 << 24


def weight_magnitude(weights: list[Tensor], schemes: list[QuantScheme]) -> Tensor:
    """Duo scaling's weight statistic: per input channel, the mean over every row of every weight of
    ``|w| / max|w|``, the maximum taken over the weight's quantization group (a row if per-channel).

    Args:
        weights: ``[out_k, in]`` weights reading the same input.
        schemes: each weight's grid (its group size sets the normalising groups).

    Returns:
        ``[in]`` float32, each in ``[0, 1]``.
    """
    rows, total = 0, None
    for w, scheme in zip(weights, schemes, strict=True):
        grouped = w.detach().float().abs().reshape(w.shape[0], -1, scheme.group_size or w.shape[1])
        relative = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
        part = relative.reshape(w.shape).sum(dim=0)
        total = part if total is None else total + part
        rows += w.shape[0]
    return total / rows


def awq_scales(x_magnitude: Tensor, alpha: float, w_magnitude: Tensor | None = None) -> Tensor:
    """One candidate of AWQ's per-input-channel scales, normalised so that ``max(s) * min(s) = 1``.

    ``s = x^alpha`` (the paper) or, given ``w_magnitude``, ``s = x^alpha / (w^(1 - alpha) + 1e-4)``
    (duo scaling); floored at 1e-4 so a channel that never fires gets no zero (then infinite inverse)
    scale; any non-finite entry becomes 1.

    Args:
        x_magnitude: mean absolute activation per input channel, ``[in]``.
        alpha: exponent in ``[0, 1]``; without ``w_magnitude``, 0 gives all-ones scales (plain RTN).
        w_magnitude: :func:`weight_magnitude` for duo scaling, else ``None``.

    Returns:
        Scales ``[in]`` in float32.
    """
    x = x_magnitude.float()
    s = x.pow(alpha)
    if w_magnitude is not None:
        s = s / (w_magnitude.float().pow(1 - alpha) + 1e-4)
    s = s.clamp_min(1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass(frozen=True)
class ScaleCandidate:
    """One point of the scale grid: its exponent, whether it is duo scaling, and the scales."""

    alpha: float
    duo: bool
    scales: Tensor


def scale_candidates(
    x_magnitude: Tensor, w_magnitude: Tensor | None, *, n_grid: int = 20
) -> list[ScaleCandidate]:
    """The scales AWQ's grid search tries, in order (llm-compressor's grid).

    Without ``w_magnitude``: ``alpha = i / (n_grid - 1)`` for ``i < n_grid`` (0 is the identity).
    With it (duo scaling): the identity first, then duo scales for ``alpha = i / (n_grid - 2)``,
    ``i < n_grid - 1`` (duo scaling at ``alpha = 0`` is not the identity). Either way ``n_grid``
    candidates from ``alpha = 0`` to 1; llm-awq's grid is ``i / n_grid``, so it stops at 0.95.
    """
    if n_grid < 3:
        raise WeightkitError(f"n_grid must be at least 3, got {n_grid}")
    if w_magnitude is None:
        alphas = [i / (n_grid - 1) for i in range(n_grid)]
        return [ScaleCandidate(a, False, awq_scales(x_magnitude, a)) for a in alphas]
    identity = ScaleCandidate(0.0, False, awq_scales(x_magnitude, 0.0))
    alphas = [i / (n_grid - 2) for i in range(n_grid - 1)]
    return [identity] + [ScaleCandidate(a, True, awq_scales(x_magnitude, a, w_magnitude)) for a in alphas]


def scaled_rtn(w: Tensor, s: Tensor, scheme: QuantScheme, name: str = "weight") -> Tensor:
    """``RTN(W * s) / s``: what a layer computes on its unscaled input once ``s`` is folded in and
    ``W * s`` is rounded (float32)."""
    return rtn_quantize(w.float() * s, scheme, name=name).dequantize() / s


def output_error(delta: Tensor, h: Tensor) -> Tensor:
    """``sum_rows delta H delta^T``: twice the mean over calibration tokens of ``||delta x_t||^2``."""
    return ((delta @ h) * delta).sum()


def awq_search_scales(
    h: Tensor,
    x_magnitude: Tensor,
    weights: list[Tensor],
    schemes: list[QuantScheme],
    *,
    n_grid: int = 20,
    duo_scaling: bool = True,
    name: str = "weights",
) -> ScaleCandidate:
    """AWQ's scale search for linear layers scored by their own outputs (a layer alone in its group).

    Each candidate of :func:`scale_candidates` gives weights ``RTN(W * s) / s`` (each with its own
    grid), scored by their output error on every calibration token, summed over the weights. The
    first candidate (the identity, plain round-to-nearest) wins ties, so the result is never worse
    than RTN on this objective.

    Deviation from the reference code, same objective: the error is computed from the inputs'
    Hessian (:func:`output_error`), which covers every calibration token at ``in x in`` cost per
    candidate instead of ``tokens x in``, and needs no stored activations.

    Args:
        h: ``[in, in]`` Hessian of the shared input, from
            :class:`~weightkit.compress.quant.hessian.Hessian`.
        x_magnitude: mean absolute input per channel, ``[in]``.
        weights: weights ``[out_k, in]`` reading that input.
        schemes: each weight's grid.
        n_grid: candidates tried.
        duo_scaling: use :func:`weight_magnitude` too (see :func:`awq_scales`).
        name: what the weights are, for error messages.

    Returns:
        The best candidate; the caller quantizes ``W * scales`` and divides the input by ``scales``.

    Raises:
        WeightkitError: empty or mismatched shapes, non-finite statistics, or a bad ``n_grid``.
    """
    if not weights or len(weights) != len(schemes):
        raise WeightkitError(f"{name}: need one scheme per weight and at least one weight")
    cols = x_magnitude.shape[0]
    if h.shape != (cols, cols):
        raise WeightkitError(f"{name}: Hessian has shape {tuple(h.shape)}, expected ({cols}, {cols})")
    for k, (w, scheme) in enumerate(zip(weights, schemes, strict=True)):
        if w.dim() != 2 or w.shape[1] != cols:
            raise WeightkitError(
                f"{name}[{k}]: weight of shape {tuple(w.shape)} does not read inputs with {cols} features"
            )
        scheme.check_shape(tuple(w.shape), f"{name}[{k}]")
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(x_magnitude).all())):
        raise WeightkitError(f"{name}: calibration statistics have NaN/Inf values")

    h = h.float()
    w_magnitude = weight_magnitude(weights, schemes) if duo_scaling else None
    candidates = scale_candidates(x_magnitude, w_magnitude, n_grid=n_grid)
    losses = []
    for candidate in candidates:
        loss = 0.0
        for k, (w, scheme) in enumerate(zip(weights, schemes, strict=True)):
            w = w.float()
            loss += float(output_error(w - scaled_rtn(w, candidate.scales, scheme, f"{name}[{k}]"), h))
        losses.append(loss)
    return candidates[int(torch.tensor(losses).argmin())]  # argmin: the first of equal minima


def even_sample(total: int, k: int, device=None) -> Tensor:
    """Indices of ``min(total, k)`` evenly spaced items of ``total``, first and last included.

    Deterministic without a seed, and spread over all calibration texts (tokens come text by text).
    """
    if total <= k:
        return torch.arange(total, device=device)
    return torch.linspace(0, total - 1, k, device=device).round().long()


def clip_ratios(n_grid: int, max_shrink: float) -> list[float]:
    """The clip ratios tried, as the reference: ``1 - i / n_grid`` for ``i < max_shrink * n_grid``
    (``1, 0.95, ..., 0.55`` for the defaults 20 and 0.5)."""
    return [1 - i / n_grid for i in range(max(1, int(round(max_shrink * n_grid))))]


def clip_weight(w: Tensor, ratio: Tensor, scheme: QuantScheme) -> Tensor:
    """``w`` with each (row, group) clamped to ``[-r, r]``, ``r = ratio * max|w|`` over the group.

    The reference code's clipping: the clamped weight is then rounded on its own min/max grid, so an
    asymmetric grid shrinks only the end(s) beyond ``r``.

    Args:
        w: ``[out, in]``.
        ratio: ``[out, groups]`` (or broadcastable), each in ``(0, 1]``.
        scheme: gives the group size.
    """
    group = scheme.group_size or w.shape[1]
    grouped = w.reshape(w.shape[0], -1, group)
    limit = (grouped.abs().amax(dim=-1) * ratio.to(w.dtype)).unsqueeze(-1)
    return torch.minimum(torch.maximum(grouped, -limit), limit).reshape(w.shape)


def awq_search_clip(
    w: Tensor,
    x: Tensor,
    scheme: QuantScheme,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = CLIP_SAMPLE_TOKENS,
    name: str = "weight",
) -> Tensor:
    """AWQ's clipping search: per output row and group, the clamp ratio that minimises output error.

    For every ratio in :func:`clip_ratios` the weight is clamped (:func:`clip_weight`) and rounded, and
    the error is ``mean_t (x_g,t . (w_g - Q(clip(w))_g))^2`` over the (sub-sampled) tokens, with ``x_g``
    the group's input columns. Ratio 1 (no clipping) comes first and only a strictly smaller error
    replaces it, so clipping never hurts a group on this objective.

    Args:
        w: weight ``[out, in]`` (already multiplied by AWQ's scales, if those are used).
        x: inputs ``[tokens, in]`` (more leading dims are flattened), divided by the same scales.
        scheme: bits, group size and symmetry of the final quantization.
        n_grid: ratio step is ``1 / n_grid``.
        max_shrink: ``max_shrink * n_grid`` ratios are tried; in ``[0, 1)``.
        n_sample_tokens: at most this many evenly spaced tokens are used.
        name: the tensor's name for error messages.

    Returns:
        Clip ratios ``[out, groups]`` (float32), for :func:`clip_weight`.

    Raises:
        WeightkitError: bad shapes or arguments, or non-finite inputs.
    """
    scheme.check_shape(tuple(w.shape), name)
    if n_grid < 1:
        raise WeightkitError(f"n_grid must be a positive integer, got {n_grid}")
    if not 0 <= max_shrink < 1:
        raise WeightkitError(f"max_shrink must lie in [0, 1), got {max_shrink}")
    if n_sample_tokens < 1:
        raise WeightkitError(f"n_sample_tokens must be a positive integer, got {n_sample_tokens}")
    rows, cols = w.shape
    x = x.reshape(-1, x.shape[-1])
    if x.shape[1] != cols:
        raise WeightkitError(
            f"{name}: weight has {cols} input columns but the inputs have {x.shape[1]} features"
        )
    if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
        raise WeightkitError(f"{name}: calibration inputs are empty or have NaN/Inf values")
    x = x[even_sample(x.shape[0], n_sample_tokens, device=x.device)]

    group = scheme.group_size or cols
    n_groups = cols // group
    xg = x.float().reshape(-1, n_groups, group)
    best_ratio = torch.ones(rows, n_groups, dtype=torch.float32, device=w.device)
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // (n_groups * xg.shape[0]))
    for r0 in range(0, rows, chunk):
        wc = w[r0 : r0 + chunk].float()
        best_err = torch.full((wc.shape[0], n_groups), float("inf"), device=w.device)
        chunk_ratio = best_ratio[r0 : r0 + chunk]
        for ratio in clip_ratios(n_grid, max_shrink):
            clipped = clip_weight(wc, torch.tensor(ratio, device=w.device), scheme)
            rounded = rtn_quantize(clipped, scheme, name=name).dequantize()
            diff = (wc - rounded).reshape(wc.shape[0], n_groups, group)
            # Output error of each (row, group): [rows, groups, tokens] -> mean over tokens.
            err = torch.einsum("tgk,rgk->rgt", xg, diff).pow(2).mean(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chunk_ratio[better] = ratio
    return best_ratio
