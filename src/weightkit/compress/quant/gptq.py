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

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantizedWeight, QuantScheme, compute_qparams

__all__ = ["gptq_quantize", "shrink_hessian", "factor_inverse_hessian", "sweep_inputs"]

_CHOLESKY_RETRIES = 4


@contextlib.contextmanager
def _one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factor_inverse_hessian(h: Tensor, damp: float, name: str) -> Tensor:
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


def shrink_hessian(h: Tensor, tokens: int) -> Tensor:
    """``(n H + p diag(H)) / (n + p)``: the Hessian of ``n`` calibration tokens with its off-diagonal part
    shrunk toward zero by ``n / (n + p)``, with ``p = d`` pseudo-tokens while ``n <= d`` (``d``: its size,
    the layer's input features) and ``p = d^2 / n`` beyond, so the prior fades as data grows.

    Why: ``H`` estimates the second moment of the layer's inputs from ``n`` tokens, and GPTQ moves
    each column's rounding error into the directions ``H`` says carry little input. With fewer tokens
    than features, ``H`` has rank at most ``n`` and calls whole directions empty that held-out inputs do
    use, so the error lands there: on the bundled MiniLM with 36 calibration tokens the paper's GPTQ
    gives held-out embedding cosine 0.881 where round-to-nearest gives 0.934. The diagonal is the
    target because GPTQ with a diagonal Hessian *is* round-to-nearest (no error is moved). While
    ``n <= d`` the diagonal counts as ``d`` pseudo-tokens (the posterior mean of an inverse-Wishart prior
    centred on the diagonal): a full-rank estimate at any ``n``, half prior at ``n = d``. Beyond, a prior
    of ``d`` tokens would still take 6% of the weight at 65k tokens for a 4096-wide layer (14% for an
    11008-wide ``down_proj``) and moved results away from the paper's where data is ample (small Llama,
    3-bit, 32k tokens: perplexity 76.04 against the paper's 75.86); ``d^2 / n`` pseudo-tokens meet ``d`` at
    ``n = d`` and leave 0.4% (2.7%) there.

    Measured (4-bit g128 MiniLM: cosine on 128 held-out docstrings, round-to-nearest 0.934; 3-bit g128
    small Llama: perplexity on 128 held-out passages, round-to-nearest 76.12; this / the paper):
    MiniLM with 36 / 826 / 3 153 tokens 0.930 / 0.971 / 0.976 against 0.881 / 0.965 / 0.975, and at 3 bits
    with 16 215 tokens 0.920 against 0.917; small Llama with 2 025 / 8 026 / 32 336 tokens 76.04 / 75.89 /
    75.83 against 75.89 / 75.93 / 75.86. The paper's damping (``damp``) is applied on top, as before.

    Args:
        h: ``[d, d]`` Hessian from :class:`~weightkit.compress.quant.hessian.Hessian`.
        tokens: how many input rows (tokens) it was accumulated from.
    """
    if tokens < 1:
        raise WeightkitError(f"a Hessian needs at least one token, got {tokens}")
    d = h.shape[0]
    prior = d * min(1.0, d / tokens)
    keep = tokens / (tokens + prior)
    return h * keep + torch.diag_embed(h.diagonal() * (1 - keep))


def _params(w: Tensor, scheme: QuantScheme, clip: Tensor | None, store_dtype: torch.dtype, name: str):
    """Scales/zero points of ``w`` with the scale rounded to the dtype it will be stored in.

    Rounding first makes the sweep's error feedback use exactly the grid the export will dequantize with.
    """
    scale, zero = compute_qparams(w, scheme, clip_ratio=clip, name=name)
    scale = scale.to(store_dtype).clamp_min(torch.finfo(store_dtype).tiny).to(w.dtype)
    zero = None if zero is None else zero.to(w.dtype)
    return scale, zero


def _set_grid(grid: Tensor, groups: slice, scale: Tensor, zero: Tensor | None) -> None:
    """Store the scales and zero points ``[rows, len(groups)]`` of ``groups`` in the sweep's table."""
    grid[0, groups] = scale.T
    if zero is not None:
        grid[1, groups] = zero.T
        grid[2, groups] = (zero * scale).T


def sweep_inputs(
    w: Tensor, h: Tensor, *, damp: float, block_size: int, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """What a GPTQ-style column sweep (GPTQ's, VPTQ's) starts from: the weight ``[out, in]`` and its inputs'
    Hessian ``[in, in]`` checked, copied to the compute dtype (float64 if either is float64, else float32),
    and inputs that never fire (``H_jj == 0``) made harmless: their weights zeroed and ``H_jj`` set to 1 so
    the inverse exists.

    Returns:
        ``(W, H, diagonal)``: the copies, and the Hessian's diagonal before dead inputs were patched.

    Raises:
        WeightkitError: a Hessian of another shape, ``block_size < 1``, ``damp < 0``, or NaN/Inf in either.
    """
    cols = w.shape[1]
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
    diagonal = H.diagonal().clone()
    dead = diagonal == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, diagonal


def gptq_quantize(
    w: Tensor,
    h: Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratio: Tensor | float | None = None,
    keep_zeros: bool = False,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize ``w`` with GPTQ given the Hessian of its inputs.

    Args:
        w: weight ``[out, in]``.
        h: ``[in, in]`` Hessian from :class:`~weightkit.compress.quant.hessian.Hessian`.
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
            :func:`~weightkit.quantized.grid.compute_qparams`), e.g. from AWQ's clip search,
            or one float for all groups. Applied to each group's grid wherever it is computed.
        keep_zeros: weights that are exactly zero (a pruned model's) stay exactly zero: no column's error
            is moved onto them, so they round to the grid's zero (both grids hold 0 exactly: the symmetric
            one at code 0, the asymmetric one at its integer zero point, its range always spanning 0). The
            other weights compensate as usual, within the sparsity mask (the masked GPTQ of SparseGPT's
            joint sparsification and quantization, and of llm-compressor's sparsity-preserving GPTQ).
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
    W, H, _ = sweep_inputs(w, h, damp=damp, block_size=block_size, name=name)
    cdtype = W.dtype
    kept = (W != 0).to(cdtype) if keep_zeros else None  # 1 where a weight may take compensation

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
    # Per group, as rows of contiguous [rows] vectors: scale, zero point, zero * scale.
    grid = torch.zeros(3, n_groups, rows, dtype=cdtype, device=W.device)
    if static:
        _set_grid(grid, slice(None), *_params(W, scheme, clip_ratio, w.dtype, name))
    group_grid = [grid[:, g].unbind(0) for g in range(n_groups)]  # views: see later writes

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        if kept is not None:
            kept = kept[:, perm]
    else:
        perm = torch.arange(cols, device=W.device)
    col_group = (perm // group).tolist()  # group of each column in sweep order
    q_min, q_max = scheme.q_min, scheme.q_max

    U = factor_inverse_hessian(H, damp, name)
    # Errors are kept as ``w - q`` rather than the paper's ``(w - q) / U_ii``: U's rows are divided by
    # their diagonal once instead, one tensor op less per column.
    U = U / U.diagonal().unsqueeze(1)
    Q = torch.empty(rows, cols, dtype=torch.int8, device=W.device)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        # The block's columns as contiguous rows: each step below touches one row, not a strided column.
        WT = W[:, b0:b1].T.contiguous()
        kept_t = None if kept is None else kept[:, b0:b1].T.contiguous()
        QT, ET = torch.empty_like(WT), torch.empty_like(WT)
        w_cols, q_cols, e_cols, u_rows = WT.unbind(0), QT.unbind(0), ET.unbind(0), U[b0:b1, b0:b1].unbind(0)
        # The per-column steps are tiny; CPU threads only add synchronisation (30x slower when the
        # cores are busy), so they run on one thread. The lazy update below uses them all.
        with _one_cpu_thread():
            for i in range(b1 - b0):
                c = b0 + i
                g = col_group[c]
                if not static and c % group == 0:
                    end = c + group
                    current = WT[i : min(end, b1) - b0].T
                    if end > b1:  # the group runs past this block: add the block's pending updates
                        pending = W[:, b1:end] - ET[:i].T @ U[b0:c, b1:end]
                        if kept is not None:
                            pending = pending * kept[:, b1:end]
                        current = torch.cat([current, pending], dim=1)
                    clip = None if clip_ratio is None else clip_ratio[:, g : g + 1]
                    _set_grid(grid, slice(g, g + 1), *_params(current, col_scheme, clip, w.dtype, name))
                col_scale, col_zero, col_zs = group_grid[g]
                column, q, e = w_cols[i], q_cols[i], e_cols[i]
                torch.div(column, col_scale, out=q).round_()
                if not scheme.symmetric:
                    q.add_(col_zero)
                q.clamp_(q_min, q_max)
                torch.addcmul(column, q, col_scale, value=-1, out=e)  # w - q * s
                if not scheme.symmetric:
                    e.add_(col_zs)  # w - (q - z) * s
                if i + 1 < b1 - b0:
                    # The paper's update: spread this column's error over the block's remaining columns.
                    WT[i + 1 :].addr_(u_rows[i][i + 1 :], e, alpha=-1)
                    if kept_t is not None:
                        WT[i + 1 :].mul_(kept_t[i + 1 :])
        Q[:, b0:b1] = QT.T.to(torch.int8)
        # Lazy batch update: the rest of the matrix gets the whole block's error at once.
        W[:, b1:] -= ET.T @ U[b0:b1, b1:]
        if kept is not None:
            W[:, b1:].mul_(kept[:, b1:])

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    zero_point = None if scheme.symmetric else grid[1].T.to(torch.int8).contiguous()
    return QuantizedWeight(Q, grid[0].T.to(w.dtype).contiguous(), zero_point, scheme)
