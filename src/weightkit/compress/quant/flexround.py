"""FlexRound: learnable rounding by element-wise division, here on one linear layer.

Lee, Kim, Kwon, Lee, "FlexRound: Learnable Rounding based on Element-wise Division for Post-Training
Quantization", ICML 2023, arXiv:2306.00317.

FlexRound rounds ``W / (s1 * S2 * s3)`` instead of ``W / s1`` and dequantizes with the common grid size
alone, ``W_hat = s1 * round(W / (s1 * S2 * s3))``: ``s1`` is the grid size, ``S2`` (``[out, in]``) one
positive divisor per weight and ``s3`` (``[out, 1]``) one per output row (the paper's extra ``s4`` over
input channels belongs to convolutions only, so a linear layer has none). All three are learned in
log space (``s = exp(log s)``, so they stay positive), starting from ``S2 = s3 = 1`` and ``s1`` the
round-to-nearest grid, with Adam on the layer's output reconstruction error and the straight-through
estimator for ``round`` (the forward pass uses the hard-rounded weight, the backward pass treats
``round`` as the identity). Because the division only changes *which* integer a weight rounds to,
``W_hat`` is always ``s1`` times an integer on the grid: the learned divisors fold into the integer
codes, and the stored scale is ``s1``; a :class:`~weightkit.quantized.grid.QuantizedWeight` holds the
result exactly and every existing export stores it.

Deliberate deviations (each stated where it happens):

- the reconstruction target is one linear layer's output ``X W^T`` on its own calibration inputs,
  not a whole transformer block's output as in the paper; the block-wise driver is not built yet;
- ``s1`` has one value per group of the scheme (per row when ``group_size`` is None) rather than one
  per tensor, so FlexRound refines any weightkit grid; asymmetric grids keep RTN's integer zero points
  fixed (the paper's grids are symmetric);
- ``log s1`` is stored as ``log(rtn_scale) + d1`` with ``d1 = 0`` at the start (the same parameter up
  to a constant, so Adam follows the same path) because ``exp(log(scale))`` is not bit-identical to
  ``scale`` in floating point, and step 0 must reproduce RTN exactly (bit for bit for float32 and
  float64 weights; bfloat16/float16 weights get RTN's scales but codes rounded from the exact float32
  quotient, where RTN rounds the quotient already rounded to 16 bits, so a few ties land differently);
- every step uses all calibration rows (no mini-batches), so the result is deterministic without a
  seed; and the best iterate seen (step 0, i.e. RTN, included) is returned, not the last one, so the
  result's reconstruction error is never above RTN's.
"""

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantizedWeight, QuantScheme, compute_qparams

__all__ = ["flexround_quantize", "reconstruction_error"]


def reconstruction_error(x: Tensor, w: Tensor, w_hat: Tensor) -> Tensor:
    """Mean squared error between the layer outputs ``x @ w.T`` and ``x @ w_hat.T`` (a scalar)."""
    return (x @ (w - w_hat).T).square().mean()


def _round_ste(t: Tensor) -> Tensor:
    """``round(t)`` forward, identity backward (the straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def _check_inputs(w: Tensor, x: Tensor, scheme: QuantScheme, steps: int, lr: float, name: str) -> None:
    scheme.check_shape(tuple(w.shape), name)
    if not w.is_floating_point() or not x.is_floating_point():
        raise WeightkitError(f"{name}: FlexRound needs floating-point weights and inputs")
    if x.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
        raise WeightkitError(
            f"{name}: calibration inputs must be [n >= 1, {w.shape[1]}] for a weight of shape "
            f"{tuple(w.shape)}, got {tuple(x.shape)}"
        )
    if x.device != w.device:
        raise WeightkitError(f"{name}: calibration inputs are on {x.device} but the weight is on {w.device}")
    for label, t in (("weight", w), ("calibration inputs", x)):
        if not bool(torch.isfinite(t).all()):
            raise WeightkitError(f"{name}: the {label} hold NaN or infinite values")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise WeightkitError(f"{name}: FlexRound steps must be a non-negative integer, got {steps!r}")
    if not lr > 0 or lr == float("inf"):
        raise WeightkitError(f"{name}: FlexRound learning rate must be a positive number, got {lr!r}")


def flexround_quantize(
    w: Tensor, x: Tensor, scheme: QuantScheme, *, steps: int, lr: float = 1e-3, name: str = "weight"
) -> QuantizedWeight:
    """Learn FlexRound's ``s1``, ``S2``, ``s3`` for one linear weight and return its integer grid.

    Args:
        w: the weight, ``[out, in]``.
        x: the layer's calibration inputs, ``[n, in]`` (rows of every sequence, flattened).
        scheme: bits, group size and grid symmetry; the starting grid is RTN's min/max grid.
        steps: Adam steps; 0 returns RTN's grid unchanged.
        lr: Adam's learning rate for the log-factors ``log s1``, ``log S2``, ``log s3``.
        name: the tensor's name, used in error messages.

    Returns:
        A :class:`QuantizedWeight` whose codes are ``clamp(round(W / (s1 S2 s3)) + zp)`` and whose scale
        is ``s1`` (``[out, groups]``, cast to ``w``'s dtype as RTN's is), from the step with the lowest
        :func:`reconstruction_error` on ``x``. The optimisation runs in float32 (float64 inputs stay
        float64).

    Raises:
        WeightkitError: bad shapes or dtypes, NaN or infinite values, ``steps < 0`` or ``lr <= 0``.
    """
    _check_inputs(w, x, scheme, steps, lr, name)
    work_dtype = torch.promote_types(w.dtype, torch.float32)
    w32, x32 = w.detach().to(work_dtype), x.detach().to(work_dtype)
    # RTN's scale exactly as rtn_quantize computes it (in w's dtype), so step 0 stores the same scale.
    rtn_scale, zero_point = compute_qparams(w.detach(), scheme, name=name)
    rtn_scale = rtn_scale.to(work_dtype)
    out_features, in_features = w32.shape
    group = scheme.group_size or in_features
    grouped_w = w32.reshape(out_features, -1, group)
    zp = 0.0 if zero_point is None else zero_point.to(work_dtype).unsqueeze(-1)

    log_s1_offset = torch.zeros_like(rtn_scale, requires_grad=True)  # log s1 = log(rtn_scale) + this
    log_s2 = torch.zeros_like(grouped_w, requires_grad=True)
    log_s3 = torch.zeros(out_features, 1, 1, dtype=work_dtype, device=w.device, requires_grad=True)

    def codes_and_scale(round_fn) -> tuple[Tensor, Tensor]:
        s1 = rtn_scale * log_s1_offset.exp()
        divisor = s1.unsqueeze(-1) * (log_s2 + log_s3).exp()
        codes = (round_fn(grouped_w / divisor) + zp).clamp(scheme.q_min, scheme.q_max)
        return codes, s1

    optimizer = torch.optim.Adam([log_s1_offset, log_s2, log_s3], lr=lr)
    best_error, best_params = None, None
    with torch.enable_grad():
        for step in range(steps + 1):
            codes, s1 = codes_and_scale(_round_ste)
            w_hat = ((codes - zp) * s1.unsqueeze(-1)).reshape(out_features, in_features)
            error = reconstruction_error(x32, w32, w_hat)
            if best_error is None or error.item() < best_error:
                best_error = error.item()
                best_params = [p.detach().clone() for p in (log_s1_offset, log_s2, log_s3)]
            if step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            error.backward()
            optimizer.step()

    with torch.no_grad():
        for param, best in zip((log_s1_offset, log_s2, log_s3), best_params, strict=True):
            param.copy_(best)
        codes, s1 = codes_and_scale(torch.round)
    qweight = codes.to(torch.int8).reshape(out_features, in_features)
    return QuantizedWeight(qweight, s1.to(w.dtype), zero_point, scheme)
