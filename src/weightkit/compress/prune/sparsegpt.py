"""SparseGPT: prune by the inverse Hessian and update the remaining weights to make up for it.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774.

For a linear layer with inputs ``X``, SparseGPT minimises ``||W X^T - W_hat X^T||^2`` under the sparsity
constraint the way GPTQ quantizes: column by column, with the Cholesky factor ``U`` of ``H^-1``
(``H = 2/n X^T X``, dampened), each pruned weight's error ``w / U_jj`` is moved onto the columns not yet
visited (the optimal brain surgeon update restricted to them). Its three ingredients are all here:

- *adaptive mask selection*: the mask is chosen per block of ``block_size`` columns, as the sweep reaches
  the block, by the OBS saliency ``w^2 / U_jj^2`` of the weights *as updated so far* (for N:M, per group
  of M columns as the sweep reaches the group's first column);
- the column sweep with the row-shared ``U`` (all rows use one inverse Hessian);
- lazy batch updates: the columns after a block get the block's errors with one matmul.

Choices, and the differences from llm-compressor 0.14's ``SparseGPTModifier`` (whose defaults are kept:
``block_size`` 128, ``dampening_frac`` 0.01, no Hessian shrinkage):

- Unstructured masks zero exactly ``floor(sparsity * rows * block columns)`` weights of each block, the
  lowest saliencies compared across the layer's rows (the reference code's comparison group); the
  reference thresholds at the score of that index with ``<=``, one more weight (more with ties).
- Layers that read the same input (q/k/v, gate/up) are stacked by rows into one sweep, their masks still
  chosen per layer (the rows of one layer form one comparison group): SparseGPT's rows are independent
  given ``H``, so the result is that of one sweep per layer, in fewer Python steps.
- Each block of the model is calibrated in one pass on the outputs of the previous, already pruned, block
  (all its layers' Hessians from that one pass, as the paper's code and llm-compressor's sequential
  pipeline do; weightkit's GPTQ instead re-runs the block for each group).
- A Hessian that stays singular gets ten times more damping up to four times, then a clear error;
  llm-compressor falls back to the identity (magnitude pruning) with a warning.
- N:M requires ``block_size`` to be a multiple of M, so no group straddles two blocks.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.compress.prune.core import PruneFields, layer_mask, nm_mask, selected_prunable
from weightkit.compress.quant.blockwise import run_batches
from weightkit.compress.quant.calibrated import BlockStore, _first_layers, _no_tokens, _walk_blocks
from weightkit.compress.quant.config import CalibrationFields
from weightkit.compress.quant.gptq import _one_cpu_thread, factor_inverse_hessian, sweep_inputs
from weightkit.compress.quant.hessian import Hessian
from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = ["SparseGPTConfig", "sparsegpt_prune", "prune_sparsegpt"]


def sparsegpt_prune(
    w: Tensor,
    h: Tensor,
    *,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    row_groups: list[int] | None = None,
    name: str = "weight",
) -> Tensor:
    """``w`` pruned by SparseGPT given the Hessian ``h`` of its inputs.

    Args:
        w: weight ``[out, in]``.
        h: ``[in, in]`` Hessian (:class:`~weightkit.compress.quant.hessian.Hessian`).
        sparsity: fraction of each block's weights zeroed (unstructured); ignored with ``n_m``.
        n_m: ``(N, M)``: N zeros in every M consecutive columns of each row.
        damp: fraction of the mean Hessian diagonal added to its diagonal.
        block_size: columns per mask selection and lazy batch update (a multiple of M with ``n_m``).
        row_groups: sizes of consecutive row ranges that choose their unstructured masks apart (the
            layers stacked in ``w``); default: all rows together.
        name: the tensor's name for error messages.

    Returns:
        The pruned weight, in ``w``'s dtype. Inputs that never fire (``H_jj == 0``) get zero weights.
    """
    W, H, _ = sweep_inputs(w, h, damp=damp, block_size=block_size, name=name)
    rows, cols = W.shape
    if n_m is not None and (block_size % n_m[1] or cols % n_m[1]):
        raise WeightkitError(
            f"{name}: {n_m[0]}:{n_m[1]} sparsity needs block size ({block_size}) and columns ({cols}) "
            f"to be multiples of {n_m[1]}"
        )
    row_groups = row_groups or [rows]
    if sum(row_groups) != rows:
        raise WeightkitError(f"{name}: row groups {row_groups} do not add up to the {rows} rows")
    U = factor_inverse_hessian(H, damp, name)
    d = U.diagonal()
    # As in GPTQ's sweep, U's rows are divided by their diagonal once, so each step moves ``w - q``.
    U = U / d.unsqueeze(1)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        # The block's columns as contiguous rows, so each step reads and writes one row.
        WT = W[:, b0:b1].T.contiguous()
        if n_m is None:
            saliency = (W[:, b0:b1] / d[b0:b1]).square()
            pruned = torch.cat([layer_mask(s, sparsity) for s in saliency.split(row_groups)]).T.contiguous()
        else:
            pruned = torch.empty_like(WT, dtype=torch.bool)
        ET = torch.zeros_like(WT)
        u_rows = U[b0:b1, b0:b1].unbind(0)
        with _one_cpu_thread():  # tiny per-column steps: threads only add synchronisation
            for i in range(b1 - b0):
                if n_m is not None and i % n_m[1] == 0:
                    group = slice(i, i + n_m[1])
                    saliency = (WT[group] / d[b0 + i : b0 + i + n_m[1]].unsqueeze(1)).square()
                    pruned[group] = nm_mask(saliency.T, *n_m).T
                e = ET[i]
                torch.mul(WT[i], pruned[i], out=e)  # the error of zeroing the pruned weights: w - 0
                WT[i].sub_(e)
                if i + 1 < b1 - b0:
                    WT[i + 1 :].addr_(u_rows[i][i + 1 :], e, alpha=-1)
        W[:, b0:b1] = WT.T
        W[:, b1:] -= ET.T @ U[b0:b1, b1:]
    return W.to(w.dtype)


@dataclass
class SparseGPTConfig(PruneFields, CalibrationFields):
    """SparseGPT (arXiv 2301.00774): prune by the inverse Hessian of each layer's inputs, updating the
    weights kept so the layer's outputs change least. Needs calibration text, like GPTQ.

    Attributes (besides the sparsity, selection and calibration fields):
        damp: fraction of the mean Hessian diagonal added to its diagonal (the paper's 0.01).
        block_size: columns per mask choice and lazy update (the paper's 128); smaller blocks adapt the
            mask more often. A multiple of M for N:M sparsity.
    """

    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        PruneFields.__post_init__(self)
        CalibrationFields.__post_init__(self)
        if not 0 <= self.damp < 1:
            raise WeightkitError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise WeightkitError(f"block_size must be at least 1, got {self.block_size}")
        n_m = self.n_m
        if n_m is not None and self.block_size % n_m[1]:
            raise WeightkitError(
                f"block_size ({self.block_size}) must be a multiple of {n_m[1]} for {self.structure} sparsity"
            )


def group_hessians(block: nn.Module, groups: list[dict[str, nn.Module]], inputs, here) -> list[Hessian]:
    """The Hessian of each group's shared input, from one pass of every calibration batch through the
    block as it is now (up to the last group's first layer)."""
    firsts = _first_layers(groups)
    hessians = [Hessian() for _ in groups]
    run_batches(
        block, inputs, here, modules=firsts, on_input=lambda i, x: hessians[i].add(x), until=firsts[-1]
    )
    if not hessians[0].count:
        raise _no_tokens()
    return hessians


@torch.no_grad()
def prune_sparsegpt(
    model: nn.Module,
    config: SparseGPTConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    store: BlockStore | None = None,
    device: torch.device | None = None,
):
    """Prune ``model`` in place with SparseGPT on calibration ``data`` (see
    :func:`~weightkit.compress.quant.calibrated.calibration_batches`), block by block: each block's
    Hessians from one pass on the previous pruned block's outputs, its layers pruned (those sharing an
    input in one stacked sweep), then its outputs computed for the next block."""
    linears = selected_prunable(model, config)

    def prune_block(prefix, block, groups, inputs, here, last):
        if groups:
            for group, hessian in zip(groups, group_hessians(block, groups, inputs, here), strict=True):
                weights = [m.weight for m in group.values()]
                pruned = sparsegpt_prune(
                    torch.cat([w.detach() for w in weights]),
                    hessian.value(),
                    sparsity=config.fraction,
                    n_m=config.n_m,
                    damp=config.damp,
                    block_size=config.block_size,
                    row_groups=[w.shape[0] for w in weights],
                    name=" + ".join(f"{prefix}.{rel}.weight" for rel in group),
                )
                for w, p in zip(weights, pruned.split([w.shape[0] for w in weights]), strict=True):
                    w.copy_(p)
        return {}, None if last else run_batches(block, inputs, here)

    return _walk_blocks(
        model, config, data, tokenizer, progress, "SparseGPT", prune_block, store, device, linears
    )


register("compress", "sparsegpt", SparseGPTConfig, prune_sparsegpt)
