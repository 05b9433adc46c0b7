"""Which linear layers a quantization config selects, and swapping them for ``QuantizedLinear``."""

import warnings

from torch import nn

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantizedWeight
from weightkit.quantized.linear import QuantizedLinear
from weightkit.select import matches, select_modules

__all__ = ["selected_linears", "quantize_linear"]


def selected_linears(model: nn.Module, config: WeightQuantFields) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects, checked up front so bad input fails before any work. An
    override that no selected layer matches changes nothing: it is named in a warning (a typo, or a layer
    that ``targets``/``ignore`` leave out).

    Raises:
        WeightkitError: nothing selected, or a weight whose shape the grid cannot take (naming it).
    """
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    if not linears:
        raise WeightkitError("no linear layer selected for quantization (check targets and ignore)")
    for name, linear in linears.items():
        config.scheme_for(name).check_shape(tuple(linear.weight.shape), f"{name}.weight")
    unused = [p for p in config.overrides if p != "_default" and not any(matches(n, p) for n in linears)]
    if unused:
        warnings.warn(
            f"overrides {', '.join(map(repr, unused))} match no quantized layer, so they change nothing "
            f"(layers are named like {next(iter(linears))}; 're:' patterns must match whole names)",
            stacklevel=2,
        )
    return linears


def quantize_linear(model: nn.Module, name: str, quantized: QuantizedWeight) -> QuantizedLinear:
    """Swap the ``nn.Linear`` called ``name`` for a ``QuantizedLinear`` holding ``quantized``."""
    layer = QuantizedLinear(quantized, model.get_submodule(name).bias)
    model.set_submodule(name, layer)
    return layer
