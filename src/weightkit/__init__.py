"""weightkit: adapt, train, compress, merge and inspect the weights of neural networks.

import weightkit
model = weightkit.load("path/to/model")
weightkit.compress(model, weightkit.GPTQConfig(bits=4, group_size=128), data="calib.txt", tokenizer=tok)
weightkit.compress_checkpoint("path/to/model", "out", weightkit.AWQConfig(bits=4))  # streamed
"""

from importlib import import_module

from weightkit.errors import WeightkitError

# The public API, imported on first use so that ``import weightkit`` (and the CLI's start) stays fast:
# the modules behind it import torch and transformers.
_API = {
    "compress": "weightkit.compress",
    "compress_checkpoint": "weightkit.compress",
    "RTNConfig": "weightkit.compress",
    "GPTQConfig": "weightkit.compress",
    "AWQConfig": "weightkit.compress",
    "save_quantized": "weightkit.compress.quant.export",
    "load": "weightkit.loading",
}

__all__ = ["WeightkitError", *_API]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'weightkit' has no attribute {name!r}")
