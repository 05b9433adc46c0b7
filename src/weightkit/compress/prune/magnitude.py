"""Magnitude pruning: zero the weights of smallest absolute value.

The classic baseline (Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
Networks", arXiv:1506.02626) that the Wanda and SparseGPT papers compare against. Unstructured sparsity
zeroes the smallest ``floor(sparsity * numel)`` weights of each layer, compared across the whole layer, as
the baselines of the Wanda code and llm-compressor's ``MagnitudePruningModifier`` (mask structure
"unstructured") do; N:M zeroes the ``N`` smallest of every ``M`` consecutive input weights of a row.
One shot, no data, no weight update; llm-compressor's gradual schedule (``init_sparsity`` to
``final_sparsity`` over training steps) belongs to training and is not done here.
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from weightkit.compress.prune.core import PruneFields, prune_each_weight, prune_mask
from weightkit.registry import register

__all__ = ["MagnitudeConfig", "magnitude_prune"]


def magnitude_prune(weight: Tensor, config: PruneFields) -> Tensor:
    """``weight`` ``[out, in]`` with its smallest-magnitude entries (``config.sparsity``) zeroed."""
    return weight.masked_fill(prune_mask(weight.abs(), config, per_row=False), 0)


@dataclass
class MagnitudeConfig(PruneFields):
    """Magnitude pruning (see ``PruneFields`` for the fields): no data needed."""

    LABEL: ClassVar[str] = "magnitude"

    def prune_weight(self, weight: Tensor, module_name: str) -> Tensor:
        """``weight`` (of module ``module_name``) pruned."""
        return magnitude_prune(weight, self)


register("compress", "magnitude", MagnitudeConfig, prune_each_weight)
