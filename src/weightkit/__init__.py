"""weightkit: adapt, train, compress, merge and inspect the weights of neural networks.

import weightkit
model = weightkit.load("path/to/model")
weightkit.compress(model, weightkit.GPTQConfig(bits=4, group_size=128), data="calib.txt", tokenizer=tok)
weightkit.compress_checkpoint("path/to/model", "out", weightkit.AWQConfig(bits=4))  # streamed
weightkit.merge("base", ["ft-a", "ft-b"], config_from_dict("merge", {"method": "ties"}), "merged")
rows = weightkit.inspect("path/to/model").to_pandas()  # spectra, alpha, ranks: one row per weight matrix
"""

import sys
import types
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
    "FP8Config": "weightkit.compress",
    "FP4Config": "weightkit.compress",
    "TernaryConfig": "weightkit.compress",
    "save_quantized": "weightkit.compress.quant.export",
    "merge": "weightkit.merge",
    "adapt": "weightkit.adapt",
    "LoRAConfig": "weightkit.adapt",
    "inspect": "weightkit.inspect",
}

__all__ = ["WeightkitError", "load", *_API]
__version__ = "0.1.0"


def load(path, *, adapter=None, dtype=None, allow_pickle: bool = False, budget_mb: float | None = None):
    """Load the model of a Hugging Face directory, offline, in eval mode, with an adapter applied.

    The class is the one named in ``config.json``'s ``architectures`` (a ``BertForMaskedLM`` comes back
    as one); a quantized checkpoint comes back with weightkit's quantized layers (``QuantizedLinear`` /
    ``FloatQuantizedLinear`` for compressed-tensors, ``VPTQLinear`` / ``OutlierQuantizedLinear`` for
    weightkit's own VPTQ / GWQ format, which only this function reads). With a classifier's adapter
    (PEFT's ``SEQ_CLS``, what ``weightkit adapt`` trains on an encoder) the model is the sequence classifier
    it was trained as, with its head and ``config.id2label``.

    Args:
        path: the model directory.
        adapter: an adapter directory in PEFT's format (saved by weightkit or PEFT) to apply.
        dtype: dtype of the floating-point weights (and quantization scales); ``None`` keeps the stored one.
        allow_pickle: accept pickle weights (``pytorch_model.bin``), still read with ``weights_only``.
        budget_mb: a weightkit "bitstack" checkpoint only (without an adapter): load the residual blocks
            that fit this many MB (10^6 bytes) with the rest of the model (:func:`weightkit.models.load`).

    Raises:
        WeightkitError: no config.json, missing or corrupt weights, refused pickle, a quantized format
            weightkit cannot represent, or an adapter that does not fit the model.
    """
    if adapter is None:
        from weightkit.models import load as load_model

        return load_model(path, dtype=dtype, allow_pickle=allow_pickle, budget_mb=budget_mb)
    if budget_mb is not None:
        raise WeightkitError(
            "budget_mb cannot be combined with an adapter: load the bitstack model without one"
        )
    from weightkit.adapt.peft_format import load_adapter, load_base

    return load_adapter(load_base(path, adapter, dtype=dtype, allow_pickle=allow_pickle), adapter)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'weightkit' has no attribute {name!r}")


def _callable_package(package: str, function) -> None:
    """Make ``weightkit.<package>`` callable as ``function``.

    ``weightkit.merge`` names both a function and the package holding it. Importing the package (even
    ``import weightkit.merge.recipe``) binds ``weightkit.merge`` to the package, so the package itself
    calls through to the function, and ``weightkit.merge(...)`` works whatever was imported first.
    """

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallablePackage.__call__.__doc__ = function.__doc__
    sys.modules[package].__class__ = CallablePackage
