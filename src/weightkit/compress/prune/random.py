"""Random pruning: zero a uniformly random subset of each layer's weights.

Liu, Chen, Chen, Shen, Mocanu, Wang, Pechenizkiy, "The Unreasonable Effectiveness of Random Pruning: Return
of the Most Naive Baseline for Sparse Training", arXiv:2202.02643. The paper prunes at random *before*
sparse training and finds that, for wide enough networks, training the random subnetwork matches the dense
one. Here the mask is drawn one-shot on a trained model (the baseline every pruning criterion must beat, and
the start of a sparse training run): exactly ``floor(sparsity * numel)`` weights of each layer, uniformly
at random, or ``N`` at random in every ``M`` consecutive input weights of a row. Every layer gets the same
ratio: the paper's "uniform" layer-wise ratio; its ERK ratios (sparser large layers) are not offered.

Deterministic: layer ``name``'s mask comes from a generator seeded by ``crc32(f"{seed}:{name}")``, so the same
seed gives the same masks in any order and on any device (drawn on the CPU).
"""

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.compress.prune.core import PruneFields, prune_each_weight, prune_mask
from weightkit.registry import register

__all__ = ["RandomConfig", "random_prune"]


def random_prune(weight: Tensor, config: PruneFields, generator: torch.Generator) -> Tensor:
    """``weight`` ``[out, in]`` with a random subset (as ``config.sparsity`` selects) zeroed: the lowest of
    independent uniform scores drawn from ``generator`` (on the CPU)."""
    scores = torch.rand(weight.shape, generator=generator).to(weight.device)
    return weight.masked_fill(prune_mask(scores, config, per_row=False), 0)


@dataclass
class RandomConfig(PruneFields):
    """Random pruning (see ``PruneFields`` for the fields).

    Attributes:
        seed: seeds every layer's mask (with the layer's name), so a run is reproducible.
    """

    LABEL: ClassVar[str] = "random"

    seed: int = 0

    def prune_weight(self, weight: Tensor, module_name: str) -> Tensor:
        """``weight`` (of module ``module_name``) pruned with the mask of ``(seed, module_name)``."""
        # CPU generators keep 32 bits of a seed: hash the pair into them.
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{module_name}".encode()))
        return random_prune(weight, self, generator)


register("compress", "random", RandomConfig, prune_each_weight)
