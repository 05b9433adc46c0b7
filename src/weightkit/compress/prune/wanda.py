"""Wanda: prune by weight magnitude times input activation norm, per output row.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695.

A weight ``W_ij``'s score is ``|W_ij| * ||X_j||_2``, the norm of input feature ``j`` over every calibration
token: large-magnitude input features (the outliers of LLM activations) protect the weights that read
them. Each output row keeps its highest-scored weights (the paper's per-output comparison group, which it
finds better than per-layer for LLMs); N:M zeroes the ``N`` lowest of every ``M`` consecutive weights of a
row. No weight update, no retraining.

As the paper's code and llm-compressor's ``WandaModifier``: each block is calibrated in one pass on the
outputs of the previous, already pruned, block, and a row zeroes exactly ``floor(sparsity * in)`` weights
(ties broken by column order). Layers sharing one input share its norms (one accumulator per input).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.compress.prune.core import PruneFields, prune_mask, selected_prunable
from weightkit.compress.quant.blockwise import run_batches
from weightkit.compress.quant.calibrated import BlockStore, _first_layers, _no_tokens, _walk_blocks
from weightkit.compress.quant.config import CalibrationFields
from weightkit.registry import register

__all__ = ["WandaConfig", "wanda_scores", "wanda_prune", "prune_wanda"]


def wanda_scores(weight: Tensor, input_sq_sum: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2`` for ``weight`` ``[out, in]`` and the per-feature sums of squared inputs
    ``[in]`` (``sum_t x_tj^2``), in float32 or wider."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(wide).abs() * input_sq_sum.to(wide).sqrt()


def wanda_prune(weight: Tensor, input_sq_sum: Tensor, config: PruneFields) -> Tensor:
    """``weight`` with the weights of lowest Wanda score zeroed, per output row (or per N:M group)."""
    return weight.masked_fill(prune_mask(wanda_scores(weight, input_sq_sum), config, per_row=True), 0)


@dataclass
class WandaConfig(PruneFields, CalibrationFields):
    """Wanda (arXiv 2306.11695): prune the weights of smallest ``|weight| x input norm`` in each output row.
    Needs calibration text (only the norms of each layer's inputs), no weight update; see ``PruneFields``
    and ``CalibrationFields`` for the fields."""

    def __post_init__(self):
        PruneFields.__post_init__(self)
        CalibrationFields.__post_init__(self)


@torch.no_grad()
def prune_wanda(
    model: nn.Module,
    config: WandaConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    store: BlockStore | None = None,
    device: torch.device | None = None,
):
    """Prune ``model`` in place with Wanda on calibration ``data`` (see
    :func:`~weightkit.compress.quant.calibrated.calibration_batches`), block by block."""
    linears = selected_prunable(model, config)

    def prune_block(prefix, block, groups, inputs, here, last):
        if groups:
            firsts = _first_layers(groups)
            sums = [torch.zeros(m.in_features, dtype=torch.float64, device=here) for m in firsts]
            counts = [0]

            def add(i: int, x: Tensor) -> None:
                sums[i] += x.to(torch.float64).square().sum(dim=0)
                counts[0] += x.shape[0] if i == 0 else 0

            run_batches(block, inputs, here, modules=firsts, on_input=add, until=firsts[-1])
            if not counts[0]:
                raise _no_tokens()
            for group, sq_sum in zip(groups, sums, strict=True):
                for linear in group.values():
                    linear.weight.copy_(wanda_prune(linear.weight, sq_sum, config))
        return {}, None if last else run_batches(block, inputs, here)

    return _walk_blocks(
        model, config, data, tokenizer, progress, "Wanda", prune_block, store, device, linears
    )


register("compress", "wanda", WandaConfig, prune_wanda)
