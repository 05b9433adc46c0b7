"""Pruning: set weights to zero, unstructured (a fraction of each layer) or N:M semi-structured (N zeros in
every M consecutive input weights of a row). Magnitude and random pruning need no data; Wanda and
SparseGPT calibrate block by block on text, as GPTQ does. The output is an ordinary dense checkpoint that
holds zeros (see :mod:`weightkit.compress.stream`)."""

from weightkit.compress.prune.core import PruneFields
from weightkit.compress.prune.magnitude import MagnitudeConfig
from weightkit.compress.prune.random import RandomConfig
from weightkit.compress.prune.sparsegpt import SparseGPTConfig
from weightkit.compress.prune.wanda import WandaConfig

__all__ = ["PruneFields", "MagnitudeConfig", "RandomConfig", "SparseGPTConfig", "WandaConfig"]
