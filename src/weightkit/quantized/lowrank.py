"""A linear layer whose weight is stored as two low-rank factors, and its checkpoint form (weightkit format
"lowrank", :mod:`weightkit.quantized.weightkit_format`).

``LowRankLinear`` holds ``W = up @ down`` (``up`` ``[out, r]``, ``down`` ``[r, in]``) and never forms ``W``
in its forward pass: ``x @ down.T @ up.T + bias`` costs ``r (in + out)`` multiply-adds per token instead
of ``in out``. The SVD and WeLore compression methods (:mod:`weightkit.compress.lowrank`) write it;
:func:`weightkit.load` rebuilds it.

The stored tensors of a layer ``NAME``:

- ``NAME.weight``: ``int64 [2]``, the dense weight's shape ``[out, in]``. 1-D on purpose: transformers
  would otherwise load the checkpoint with a randomly initialised ``NAME.weight`` (it warns about an
  unknown ``quant_method`` and goes on); a 1-D tensor where it expects ``[out, in]`` is a size-mismatch
  error (tested).
- ``NAME.weight_up`` ``[out, r]`` and ``NAME.weight_down`` ``[r, in]``, in the model's floating-point dtype;
- ``NAME.bias`` if the layer has one.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.errors import WeightkitError, require_finite

__all__ = [
    "LOWRANK_SUFFIXES",
    "LowRankWeight",
    "LowRankLinear",
    "lowrank_tensors",
    "lowrank_weight_from_stored",
]

# The tensors one low-rank layer NAME stores, as NAME.<suffix>.
LOWRANK_SUFFIXES = ("weight", "weight_up", "weight_down", "bias")


@dataclass(frozen=True)
class LowRankWeight:
    """A weight ``up @ down`` stored as its two factors.

    Attributes:
        up: ``[out, rank]``.
        down: ``[rank, in]``, the same floating-point dtype as ``up``.
    """

    up: Tensor
    down: Tensor

    def __post_init__(self):
        if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
            raise WeightkitError(
                f"low-rank factors are up [out, r] and down [r, in]; got {tuple(self.up.shape)} and "
                f"{tuple(self.down.shape)}"
            )
        if not self.up.is_floating_point() or self.up.dtype != self.down.dtype:
            raise WeightkitError(
                f"low-rank factors are of one floating-point dtype, got {self.up.dtype} and {self.down.dtype}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's ``(out, in)``."""
        return self.up.shape[0], self.down.shape[1]

    @property
    def rank(self) -> int:
        return self.up.shape[1]


class LowRankLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose weight is ``weight_up @ weight_down``.

    Parameters: ``weight_up`` ``[out, r]``, ``weight_down`` ``[r, in]`` and ``bias`` if any, frozen
    (``requires_grad=False``) like every compressed layer's tensors; fine-tuning the factors (WeLore's
    LRCs) turns their gradients on.
    """

    def __init__(self, weight: LowRankWeight, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_up = nn.Parameter(weight.up.detach(), requires_grad=False)
        self.weight_down = nn.Parameter(weight.down.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def rank(self) -> int:
        return self.weight_up.shape[1]

    @property
    def quantized(self) -> LowRankWeight:
        """The stored form, under the name every weightkit layer gives it
        (:func:`weightkit.quantized.formats.export_tensors` reads it)."""
        return LowRankWeight(self.weight_up, self.weight_down)

    def dense_weight(self) -> Tensor:
        """The ``[out, in]`` weight the factors stand for."""
        return self.weight_up @ self.weight_down

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.weight_down), self.weight_up, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_tensors(weight: LowRankWeight, bias: Tensor | None) -> dict[str, Tensor]:
    """One low-rank weight (and its layer's bias) as the "lowrank" format stores it (module docstring)."""
    out = {
        "weight": torch.tensor(weight.shape, dtype=torch.int64),
        "weight_up": weight.up.detach().cpu(),
        "weight_down": weight.down.detach().cpu(),
    }
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return out


def lowrank_weight_from_stored(
    stored: Mapping[str, Tensor], shape: tuple[int, int], name: str
) -> LowRankWeight:
    """The :class:`LowRankWeight` of the layer ``name`` from its stored tensors, checked against ``shape``.

    Args:
        stored: suffix (``"weight"``, ``"weight_up"``, ``"weight_down"``) -> tensor.
        shape: the model layer's ``[out, in]``.
        name: the layer's name in the checkpoint, for errors.

    Raises:
        WeightkitError: a tensor is missing; ``weight`` is not ``int64 [2]`` equal to ``shape``; the factors
            are not finite floating-point matrices of one dtype, ``[out, r]`` and ``[r, in]`` with
            ``1 <= r <= min(out, in)``.
    """
    for key in ("weight", "weight_up", "weight_down"):
        if key not in stored:
            raise WeightkitError(f"{name}.{key} is missing: the checkpoint's format is weightkit lowrank")
    dense_shape = stored["weight"]
    if dense_shape.dtype != torch.int64 or tuple(dense_shape.shape) != (2,):
        raise WeightkitError(
            f"{name}.weight is {dense_shape.dtype} of shape {tuple(dense_shape.shape)}, expected the layer's "
            "shape as int64 of shape (2,)"
        )
    if dense_shape.tolist() != list(shape):
        raise WeightkitError(
            f"{name}.weight is {dense_shape.tolist()} but the model's layer is {list(shape)}"
        )
    up, down = stored["weight_up"], stored["weight_down"]
    out_features, in_features = shape
    rank = up.shape[1] if up.dim() == 2 else -1
    if (
        up.dim() != 2
        or down.dim() != 2
        or up.shape[0] != out_features
        or tuple(down.shape) != (rank, in_features)
        or not 1 <= rank <= min(shape)
    ):
        raise WeightkitError(
            f"{name}.weight_up is {tuple(up.shape)} and {name}.weight_down {tuple(down.shape)}; a rank-r "
            f"factorisation of the [{out_features}, {in_features}] layer is [{out_features}, r] and "
            f"[r, {in_features}] with 1 <= r <= {min(shape)}"
        )
    for key, tensor in (("weight_up", up), ("weight_down", down)):
        if not tensor.is_floating_point():
            raise WeightkitError(f"{name}.{key} is {tensor.dtype}, expected the model's floating-point dtype")
        require_finite(tensor, f"{name}.{key}")
    if up.dtype != down.dtype:
        raise WeightkitError(f"{name}.weight_up is {up.dtype} but {name}.weight_down is {down.dtype}")
    return LowRankWeight(up, down)
