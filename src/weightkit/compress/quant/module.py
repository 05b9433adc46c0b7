"""Which linear layers a quantization config selects, and swapping them for ``QuantizedLinear``."""

from torch import nn
from transformers.pytorch_utils import Conv1D

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantizedWeight
from weightkit.quantized.linear import QuantizedLinear
from weightkit.select import select_modules

__all__ = ["selected_linears", "quantize_linear"]


def selected_linears(model: nn.Module, config: WeightQuantFields) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects, checked up front so bad input fails before any work.

    Raises:
        WeightkitError: nothing selected, or a weight whose shape the grid cannot take (naming it).
    """
    conv1d = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    if conv1d:
        raise WeightkitError(
            f"{conv1d[0]} (and {len(conv1d) - 1} more) is a transformers Conv1D layer (GPT-2 style), not a "
            "Linear: compressed-tensors, and so transformers' loader, quantizes Linear layers only, so a "
            "quantized Conv1D model could not be loaded back. weightkit does not quantize such models"
        )
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    if not linears:
        raise WeightkitError("no linear layer selected for quantization (check targets and ignore)")
    for name, linear in linears.items():
        config.scheme_for(name).check_shape(tuple(linear.weight.shape), f"{name}.weight")
    return linears


def quantize_linear(model: nn.Module, name: str, quantized: QuantizedWeight) -> QuantizedLinear:
    """Swap the ``nn.Linear`` called ``name`` for a ``QuantizedLinear`` holding ``quantized``."""
    layer = QuantizedLinear(quantized, model.get_submodule(name).bias)
    model.set_submodule(name, layer)
    return layer
