"""Weight sharing: layers that hold one set of weights in common: recursive layer tying (with or without
per-layer LoRA relaxation), MASA dictionary sharing of the attention projections, and FoldGPT's block removal
with gated group sharing. The shared layer and its checkpoint format live in
:mod:`weightkit.quantized.shared`."""

from weightkit.compress.share.dictionary import DictionaryConfig, dictionary_share, fit_dictionary
from weightkit.compress.share.foldgpt import FoldGPTConfig, fold
from weightkit.compress.share.recursive import RecursiveConfig, recursive_share

__all__ = [
    "RecursiveConfig",
    "recursive_share",
    "DictionaryConfig",
    "dictionary_share",
    "fit_dictionary",
    "FoldGPTConfig",
    "fold",
]
