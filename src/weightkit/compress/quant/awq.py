"""AWQ: activation-aware weight quantization (scale search and clipping search).

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", arXiv:2306.00978.

A few input channels carry much larger activations than the rest, and the rounding error of their
weights dominates the output error. AWQ multiplies those weight columns by a per-channel scale ``s > 1``
before rounding (and divides the layer's input by ``s``, folded into the previous operation, so the
float model is unchanged): the salient weights then sit on a relatively finer grid. The scale is
``s = mean|x|^alpha`` with ``alpha`` found by a grid search on calibration data. A second search then
shrinks each group's quantization range (clipping outlier weights) where that lowers the output error.

These are the pure searches; hooking, folding ``1/s`` into the previous layer and quantizing belong to
the model-level driver.
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme, compute_qparams, dequantize, quantize_to_grid

__all__ = [
    "CLIP_SAMPLE_TOKENS",
    "awq_scales",
    "awq_search_clip",
    "awq_search_scales",
    "clip_ratios",
    "even_sample",
    "output_error",
]

# Tokens the clip search scores each candidate on (as the reference code); evenly spaced over the data.
CLIP_SAMPLE_TOKENS = 512

# Elements in one chunk of the clip search's [rows, groups, tokens] error tensor (~64 MB in float32).
_CLIP_CHUNK_ELEMENTS = 1 << 24


def awq_scales(x_magnitude: Tensor, alpha: float) -> Tensor:
    """AWQ's per-input-channel scales ``s = m^alpha``, normalised so that ``max(s) * min(s) = 1``.

    Args:
        x_magnitude: mean absolute activation per input channel, ``[in]``.
        alpha: exponent in ``[0, 1]``; 0 gives all-ones scales (plain round-to-nearest).

    Returns:
        Scales ``[in]`` (same dtype as ``x_magnitude``).
    """
    # The floor keeps channels that never fire from getting a zero (then infinite inverse) scale.
    s = x_magnitude.pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _rtn_dequantized(w: Tensor, scheme: QuantScheme, name: str) -> Tensor:
    scale, zero = compute_qparams(w, scheme, name=name)
    return dequantize(quantize_to_grid(w, scale, zero, scheme), scale, zero)


def output_error(delta: Tensor, h: Tensor) -> Tensor:
    """``sum_rows delta H delta^T``: twice the mean over calibration tokens of ``||delta x_t||^2``."""
    return ((delta @ h) * delta).sum()


def awq_search_scales(
    h: Tensor,
    x_magnitude: Tensor,
    weights: list[Tensor],
    scheme: QuantScheme,
    *,
    n_grid: int = 20,
    name: str = "weights",
) -> tuple[Tensor, float]:
    """Grid-search AWQ's per-input-channel scales for weights that share one input.

    For each ``alpha`` in ``{0, 1/n_grid, ..., (n_grid - 1)/n_grid}`` the candidate weights are
    ``RTN(W * s) / s`` with ``s = awq_scales(x_magnitude, alpha)``, scored by their output error on the
    calibration tokens summed over the weights (the paper's loss on the concatenated layer outputs).
    ``alpha = 0`` is plain round-to-nearest, so the result is never worse than RTN on this objective.

    Deviation from the reference code, same objective: the error is computed from the inputs'
    Hessian (:func:`output_error`), which covers every calibration token at ``in x in`` cost per
    candidate instead of ``tokens x in``, and needs no stored activations.

    Args:
        h: ``[in, in]`` Hessian of the shared input, from
            :class:`~weightkit.compress.quant.hessian.Hessian`.
        x_magnitude: mean absolute input per channel, ``[in]``.
        weights: weights ``[out_k, in]`` reading that input (e.g. the q, k and v projections).
        scheme: the quantization that will be applied to ``W * s``.
        n_grid: number of ``alpha`` values tried.
        name: what the weights are, for error messages.

    Returns:
        ``(scales, alpha)``: the best scales ``[in]`` (float32) and the ``alpha`` that produced them.
        The caller quantizes ``W * scales`` and divides the input by ``scales``.

    Raises:
        WeightkitError: empty or mismatched shapes, non-finite statistics, or a bad ``n_grid``.
    """
    if n_grid < 1:
        raise WeightkitError(f"n_grid must be a positive integer, got {n_grid}")
    if not weights:
        raise WeightkitError(f"{name}: no weights to search scales for")
    cols = x_magnitude.shape[0]
    if h.shape != (cols, cols):
        raise WeightkitError(f"{name}: Hessian has shape {tuple(h.shape)}, expected ({cols}, {cols})")
    for k, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != cols:
            raise WeightkitError(
                f"{name}[{k}]: weight of shape {tuple(w.shape)} does not read inputs with {cols} features"
            )
        scheme.check_shape(tuple(w.shape), f"{name}[{k}]")
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(x_magnitude).all())):
        raise WeightkitError(f"{name}: calibration statistics have NaN/Inf values")

    h = h.float()
    magnitude = x_magnitude.float()
    best_loss, best_alpha, best_scales = float("inf"), 0.0, torch.ones_like(magnitude)
    for step in range(n_grid):
        alpha = step / n_grid
        s = awq_scales(magnitude, alpha)
        loss = 0.0
        for k, w in enumerate(weights):
            w = w.float()
            loss += float(output_error(w - _rtn_dequantized(w * s, scheme, f"{name}[{k}]") / s, h))
        # Strict "<": ties keep the smaller alpha, so alpha = 0 (RTN) wins unless beaten.
        if loss < best_loss:
            best_loss, best_alpha, best_scales = loss, alpha, s
    return best_scales, best_alpha


def even_sample(total: int, k: int, device=None) -> Tensor:
    """Indices of ``min(total, k)`` evenly spaced items of ``total``, first and last included.

    Deterministic without a seed, and spread over all calibration texts (tokens come text by text).
    """
    if total <= k:
        return torch.arange(total, device=device)
    return torch.linspace(0, total - 1, k, device=device).round().long()


def clip_ratios(n_grid: int, max_shrink: float) -> list[float]:
    """The clip ratios tried: ``1, 1 - 1/n_grid, ...`` down to ``1 - max_shrink``."""
    return [1 - i / n_grid for i in range(int(round(max_shrink * n_grid)) + 1)]


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
    """AWQ's clipping search: per output row and group, the range shrink that minimises output error.

    For every ratio in :func:`clip_ratios` the group's grid is computed from the shrunk range (see
    :func:`~weightkit.quantized.grid.compute_qparams`: symmetric ``ratio * max|w|``, asymmetric
    ``[ratio * min, ratio * max]``) and the error is ``mean_t (x_g,t . (w_g - Q(w_g)))^2`` over the
    (sub-sampled) tokens, with ``x_g`` the group's input columns. Ratio 1 (no clipping) is the
    starting point and only a strictly smaller error replaces it, so clipping never hurts a group on
    this objective.

    Args:
        w: weight ``[out, in]`` (already multiplied by AWQ's scales, if those are used).
        x: inputs ``[tokens, in]`` (more leading dims are flattened), divided by the same scales.
        scheme: bits, group size and symmetry of the final quantization.
        n_grid: ratio step is ``1 / n_grid``.
        max_shrink: the smallest ratio tried is ``1 - max_shrink``; in ``[0, 1)``.
        n_sample_tokens: at most this many evenly spaced tokens are used.
        name: the tensor's name for error messages.

    Returns:
        Clip ratios ``[out, groups]`` (float32), to pass as ``clip_ratio`` to ``compute_qparams``,
        ``rtn_quantize`` or ``gptq_quantize``.

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
    ratios = clip_ratios(n_grid, max_shrink)
    best_ratio = torch.ones(rows, n_groups, dtype=torch.float32, device=w.device)
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // (n_groups * xg.shape[0]))
    for r0 in range(0, rows, chunk):
        wc = w[r0 : r0 + chunk].float()
        best_err = torch.full((wc.shape[0], n_groups), float("inf"), device=w.device)
        chunk_ratio = best_ratio[r0 : r0 + chunk]
        for ratio in ratios:
            scale, zero = compute_qparams(wc, scheme, clip_ratio=ratio, name=name)
            diff = (wc - dequantize(quantize_to_grid(wc, scale, zero, scheme), scale, zero)).reshape(
                wc.shape[0], n_groups, group
            )
            # Output error of each (row, group): [rows, groups, tokens] -> mean over tokens.
            err = torch.einsum("tgk,rgk->rgt", xg, diff).pow(2).mean(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chunk_ratio[better] = ratio
    return best_ratio
