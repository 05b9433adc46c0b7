"""GPTQ: second-order, error-compensating weight quantization.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323.

GPTQ quantizes the columns (input channels) of a linear layer's weight one at a time and, after each,
moves the rounding error onto the columns not yet quantized, weighted by the inverse Hessian
``H = 2/n * X^T X`` of the layer's reconstruction loss ``||W X^T - W_hat X^T||^2``. The paper's three
ingredients are all here: a fixed column order, the Cholesky form of ``H^-1`` (numerically stable and
computed once), and lazy batch updates (``block_size`` columns at a time, the rest of the matrix
updated once per block with one matmul).

Two deliberate choices, both documented on :func:`gptq_quantize`:

- group scales are computed from the *fully* updated weights of the group when the sweep reaches the
  group's first column (including updates from earlier columns of the same block that the reference
  code has only applied to its block copy), so the blocked sweep equals the unblocked algorithm exactly;
- with ``act_order`` the group scales are "static": computed from the original weights, in the
  original column order, before the sweep, so an export needs no ``g_idx`` permutation.
"""

import contextlib
from dataclasses import replace

import torch
from torch import Tensor

from weightkit.compress.quant.grid import QuantizedWeight, QuantScheme, compute_qparams
from weightkit.errors import WeightkitError

__all__ = ["add_to_hessian", "gptq_quantize"]

_CHOLESKY_RETRIES = 4


@contextlib.contextmanager
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def add_to_hessian(
    h: Tensor | None, count: int, x: Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = (2/n) * sum_t x_t x_t^T``.

    Args:
        h: the Hessian so far (``[in, in]``), or ``None`` before the first batch.
        count: number of input rows already folded into ``h``.
        x: layer inputs ``[tokens, in]`` (more leading dims are flattened); padding tokens must
            already be removed, since they would count as real data.
        dtype: accumulation dtype when ``h`` is ``None`` (float32; float64 for very long calibration).

    Returns:
        ``(h, count)`` updated with the rows of ``x``.
    """
    x = x.reshape(-1, x.shape[-1])
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
        count = 0
    if h.shape != (x.shape[-1], x.shape[-1]):
        raise WeightkitError(f"Hessian has shape {tuple(h.shape)} but the inputs have {x.shape[-1]} features")
    n = x.shape[0]
    if n == 0:
        return h, count
    total = count + n
    xs = x.to(h.dtype)
    # Rescale the old mean instead of summing raw outer products, so the magnitude stays bounded
    # however many tokens are seen.
    h = h * (count / total) + (2.0 / total) * (xs.T @ xs)
    return h, total


def _factor_inverse_hessian(h: Tensor, damp: float, name: str) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``H^-1 = U^T U``), retrying with more damping."""
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise WeightkitError(
            f"{name}: the Hessian's diagonal has non-positive mean {mean_diag}; bad calibration"
        )
    lam = damp * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(_CHOLESKY_RETRIES):
        # One thread: with two, cholesky_inverse took 11 s instead of 0.06 s at 1536x1536 while the
        # other core was busy (measured here); a single thread is never far off the best.
        with _one_cpu_thread():
            chol, info = torch.linalg.cholesky_ex(h + lam * eye)
            upper = None
            if int(info) == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if upper is not None and int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper
        # Too little damping for this (near-singular) Hessian: try ten times more.
        lam = lam * 10 if lam > 0 else 0.01 * mean_diag
    raise WeightkitError(
        f"{name}: the Hessian is not positive definite even with damping {lam / 10:.3g} "
        f"({_CHOLESKY_RETRIES} tries); use more or more varied calibration data, or a larger damp"
    )


def _params(w: Tensor, scheme: QuantScheme, clip: Tensor | None, store_dtype: torch.dtype, name: str):
    """Scales/zero points of ``w`` with the scale rounded to the dtype it will be stored in.

    Rounding first makes the sweep's error feedback use exactly the grid the export will dequantize with.
    """
    scale, zero = compute_qparams(w, scheme, clip_ratio=clip, name=name)
    scale = scale.to(store_dtype).clamp_min(torch.finfo(store_dtype).tiny).to(w.dtype)
    zero = None if zero is None else zero.to(w.dtype)
    return scale, zero


def gptq_quantize(
    w: Tensor,
    h: Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratio: Tensor | float | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize ``w`` with GPTQ given the Hessian of its inputs.

    Args:
        w: weight ``[out, in]``.
        h: ``[in, in]`` Hessian from :func:`add_to_hessian`.
        scheme: bits, group size and grid symmetry.
        damp: fraction of the mean Hessian diagonal added to the diagonal (the paper's dampening),
            which keeps the inverse well conditioned when calibration data is scarce.
        block_size: columns per lazy batch update; changes speed, not the result.
        act_order: quantize columns in order of decreasing ``H_ii`` (the most activated input
            channels first, while there is still freedom left to compensate their error). Deviation
            from the reference: group scales are then *static*, computed from the original weights in
            the original column order before the sweep, so groups stay contiguous in the checkpoint
            and no ``g_idx`` is needed. The returned weight is in the original column order.
        clip_ratio: optional per-group range shrink ``[out, groups]`` (see
            :func:`~weightkit.compress.quant.grid.compute_qparams`), e.g. from AWQ's clip search,
            or one float for all groups. Applied to each group's grid wherever it is computed.
        name: the tensor's name for error messages.

    Returns:
        The quantized weight; ``scale`` is in ``w``'s dtype.

    Raises:
        WeightkitError: bad shapes, non-finite inputs, or a Hessian that stays singular after retries.

    Notes:
        Work is done in float32 (float64 if ``w`` or ``h`` is float64). Inputs with ``H_ii == 0``
        never fire: their weights are set to zero and ``H_ii`` to 1 so the inverse exists. Without
        ``act_order``, a group's scale is computed when the sweep reaches its first column, from the
        weights as updated by every column before it (also those earlier in the same block); this
        makes the blocked sweep equal to the column-by-column algorithm.
    """
    scheme.check_shape(tuple(w.shape), name)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise WeightkitError(f"{name}: Hessian has shape {tuple(h.shape)}, expected ({cols}, {cols})")
    if block_size < 1:
        raise WeightkitError(f"block_size must be a positive integer, got {block_size}")
    if damp < 0:
        raise WeightkitError(f"damp must be non-negative, got {damp}")
    if not bool(torch.isfinite(w).all()):
        raise WeightkitError(f"{name}: weight has NaN or Inf values")
    if not bool(torch.isfinite(h).all()):
        raise WeightkitError(f"{name}: Hessian has NaN or Inf values; check the calibration inputs")

    cdtype = torch.float64 if torch.float64 in (w.dtype, h.dtype) else torch.float32
    W = w.to(cdtype).clone()
    H = h.to(cdtype).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    group = scheme.group_size or cols
    n_groups = cols // group
    if clip_ratio is not None:
        clip_ratio = torch.as_tensor(clip_ratio, dtype=cdtype, device=W.device)
        if clip_ratio.dim() == 0:
            clip_ratio = clip_ratio.expand(rows, n_groups)
        if tuple(clip_ratio.shape) != (rows, n_groups):
            raise WeightkitError(
                f"{name}: clip ratio has shape {tuple(clip_ratio.shape)}, expected {(rows, n_groups)} "
                f"(one ratio per output row and group)"
            )
    col_scheme = replace(scheme, group_size=None)  # for one group's slice at a time
    # Static grids: per-channel always (one group spans all columns, so there is nothing to wait for),
    # and every grouping under act_order.
    static = act_order or scheme.group_size is None
    if static:
        scale, zero = _params(W, scheme, clip_ratio, w.dtype, name)
    else:
        scale = torch.empty(rows, n_groups, dtype=cdtype, device=W.device)
        zero = None if scheme.symmetric else torch.empty_like(scale)

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    col_group = (perm // group).tolist()  # group of each column in sweep order

    U = _factor_inverse_hessian(H, damp, name)
    Q = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    q_min, q_max = scheme.q_min, scheme.q_max

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        err1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        # The per-column steps are tiny; CPU threads only add synchronisation (30x slower when
        # the cores are busy), so they run on one thread. The lazy update below uses them all.
        with _one_cpu_thread():
            for i in range(b1 - b0):
                c = b0 + i
                g = col_group[c]
                if not static and c % group == 0:
                    end = c + group
                    current = W1[:, i : min(end, b1) - b0]
                    if end > b1:  # the group runs past this block: add the block's pending updates
                        pending = W[:, b1:end] - err1[:, :i] @ U[b0:c, b1:end]
                        current = torch.cat([current, pending], dim=1)
                    clip = None if clip_ratio is None else clip_ratio[:, g : g + 1]
                    s, z = _params(current, col_scheme, clip, w.dtype, name)
                    scale[:, g : g + 1] = s
                    if zero is not None:
                        zero[:, g : g + 1] = z
                s = scale[:, g]
                column = W1[:, i]
                q = torch.round(column / s)
                if zero is not None:
                    q = (q + zero[:, g]).clamp_(q_min, q_max)
                    dq = (q - zero[:, g]) * s
                else:
                    q = q.clamp_(q_min, q_max)
                    dq = q * s
                Q[:, c] = q.to(torch.int8)
                e = (column - dq) / U1[i, i]
                err1[:, i] = e
                # The paper's update: spread this column's error over the block's remaining columns.
                W1[:, i + 1 :] -= e.unsqueeze(1) * U1[i, i + 1 :].unsqueeze(0)
        # Lazy batch update: the rest of the matrix gets the whole block's error at once.
        W[:, b1:] -= err1 @ U[b0:b1, b1:]

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    zero_point = None if zero is None else zero.to(torch.int8)
    return QuantizedWeight(Q, scale.to(w.dtype), zero_point, scheme)
