"""Weight sharing across transformer blocks: MASA dictionary sharing of the attention projections and
FoldGPT's block removal with gated group sharing. The shared layer and its checkpoint format live in
:mod:`weightkit.quantized.shared`."""

from weightkit.compress.share.dictionary import DictionaryConfig, dictionary_share, fit_dictionary
from weightkit.compress.share.foldgpt import FoldGPTConfig, fold

__all__ = [
    "DictionaryConfig",
    "dictionary_share",
    "fit_dictionary",
    "FoldGPTConfig",
    "fold",
]
