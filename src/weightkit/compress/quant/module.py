"""Which linear layers a quantization config selects, and swapping them for quantized layers."""

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from weightkit.compress.quant.config import WeightQuantFields
from weightkit.errors import WeightkitError
from weightkit.progress import track
from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.grid import QuantizedWeight
from weightkit.quantized.linear import quantized_layer
from weightkit.select import matches, select_modules

__all__ = ["refuse_conv1d", "selected_linears", "quantize_linear", "quantize_each_weight"]


def refuse_conv1d(model: nn.Module, why: str) -> None:
    """Refuse a model holding transformers ``Conv1D`` layers (GPT-2 style, weight stored ``[in, out]``),
    naming the first; ``why`` says why the method cannot take them."""
    conv1d = [name for name, m in model.named_modules() if isinstance(m, Conv1D)]
    if conv1d:
        raise WeightkitError(
            f"{conv1d[0]} (and {len(conv1d) - 1} more) is a transformers Conv1D layer (GPT-2 style, weight "
            f"stored [in, out]), not a Linear: {why}"
        )


def selected_linears(model: nn.Module, config: WeightQuantFields) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects, checked up front so bad input fails before any work. An
    override that no selected layer matches changes nothing: it is named in a warning (a typo, or a layer
    that ``targets``/``ignore`` leave out).

    Raises:
        WeightkitError: nothing selected, or a weight whose shape the grid cannot take (naming it).
    """
    refuse_conv1d(
        model,
        "compressed-tensors, and so transformers' loader, quantizes Linear layers only, so a quantized "
        "Conv1D model could not be loaded back. weightkit does not quantize such models",
    )
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    # transformers keeps these in float32 and its model code reads their .weight (T5's "wo"): quantized,
    # the model would not run.
    kept = getattr(model, "_keep_in_fp32_modules", None) or []
    fp32 = [name for name in linears if set(name.split(".")) & set(kept)]
    if fp32:
        warnings.warn(
            f"{type(model).__name__} keeps {', '.join(kept)} in float32 (transformers' "
            f"_keep_in_fp32_modules) and its code reads their weights: {len(fp32)} layer(s) such as "
            f"{fp32[0]} are not quantized",
            stacklevel=3,
        )
        linears = {name: m for name, m in linears.items() if name not in fp32}
    if not linears:
        raise WeightkitError("no linear layer selected for quantization (check targets and ignore)")
    for name, linear in linears.items():
        config.scheme_for(name).check_shape(tuple(linear.weight.shape), f"{name}.weight")
    # transformers 5 holds a mixture of experts' experts as 3-D parameters, not Linear layers.
    fused = [(n, p) for n, p in model.named_parameters() if p.dim() == 3]
    if fused:
        share = sum(p.numel() for _, p in fused) / sum(p.numel() for p in model.parameters())
        warnings.warn(
            f"{len(fused)} weights such as {fused[0][0]} are 3-D parameters (experts fused by transformers), "
            f"not Linear layers, which compressed-tensors cannot store quantized: they stay unquantized "
            f"({share:.0%} of the model's parameters)",
            stacklevel=3,
        )
    unused = [p for p in config.overrides if p != "_default" and not any(matches(n, p) for n in linears)]
    if unused:
        warnings.warn(
            f"overrides {', '.join(map(repr, unused))} match no quantized layer, so they change nothing "
            f"(layers are named like {next(iter(linears))}; 're:' patterns must match whole names)",
            stacklevel=2,
        )
    return linears


def quantize_linear(model: nn.Module, name: str, quantized: QuantizedWeight | VPTQWeight) -> nn.Module:
    """Swap the ``nn.Linear`` called ``name`` for the layer holding ``quantized`` (``QuantizedLinear``,
    ``VPTQLinear``: :func:`~weightkit.quantized.linear.quantized_layer`)."""
    layer = quantized_layer(quantized, model.get_submodule(name).bias)
    model.set_submodule(name, layer)
    return layer


def quantize_each_weight(
    model: nn.Module,
    config,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    **_unused,
) -> nn.Module:
    """The method of the configs that quantize each weight on its own, without data (RTN, FP8, FP4,
    ternary): each selected ``nn.Linear`` of ``model`` becomes the layer holding
    ``config.quantize_weight(weight, module_name, tensor_name)`` (``QuantizedLinear`` or
    ``FloatQuantizedLinear``).

    With a ``device``, each weight is quantized there, one at a time, and its layer moved back to where the
    weight was; without one, where the weight is. :func:`weightkit.compress.compress_checkpoint` streams
    the same ``quantize_weight`` tensor by tensor.
    """
    linears = selected_linears(model, config)
    for name, linear in track(linears.items(), config.LABEL, total=len(linears), enabled=progress):
        weight = linear.weight.detach()
        quantized = config.quantize_weight(weight.to(device or weight.device), name, f"{name}.weight")
        model.set_submodule(name, quantized_layer(quantized, linear.bias).to(weight.device))
    return model
