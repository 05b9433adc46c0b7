"""Ternary weights, {-1, 0, +1} times one scale per group: the quantizer of Tequila, without its training.

"Tequila: Trapping-free Ternary Quantization for Large Language Models" (Huang, Wu, Cen, Yu, Li, Liu, Zhu,
Chen, Liu, Wu; arXiv:2509.23809) trains ternary LLMs with the absmean quantizer of BitNet b1.58 ("The Era
of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv:2402.17764): per group,
``alpha = mean|w|`` and ``q = RoundClip(w / alpha, -1, 1)``. A weight with ``|w| <= alpha / 2`` lands
in the *dead zone* (``q = 0``). The paper's finding is that during quantization-aware training many
weights stay trapped at the dead zone's edge, because the straight-through estimator gives them only
noisy gradients. Tequila's remedy, *dead-zone reactivation*, adds for each output channel a bias
``C(W) = lambda * sum of its dead-zone weights`` (``lambda = 1e-3``) to the layer's output during
training, so each dead-zone weight gets the direct gradient ``lambda * dL/dY``; after training the bias
is computed once and fused into the kernel.

What is implemented here is the data-free part: the absmean ternary quantizer, per group or per output
channel (:func:`ternary_quantize`). Deliberate differences and what is not done:

- **No reactivation.** Its whole purpose is a gradient path during quantization-aware training. In the
  authors' code (Tencent/AngelSlim, branch ``tequila``, ``TernaryQuant/models/utils_quant.py``,
  ``UltraQuantV2``, run by ``script/run_train_deepspeed_sample_uqv2_lrud.sh`` with ``--eps 1e-3`` on
  UltraFineWeb 10B tokens) ``lambda`` is a fixed hyper-parameter and only the full-precision weights are
  trained. Applied to a pretrained model without that training, ``C(W)`` is a constant
  ``1e-3 * sum`` of the small weights, fitted to nothing: ``W - W_hat`` is unchanged, and an
  input-independent constant cannot stand for ``x @ W_dead``, which averages to about 0 over inputs
  that are roughly symmetric (the paper's own argument for making it input-independent). Fitting it
  instead (a bias per channel from calibration data) is bias correction, and training the weights on
  calibration data is straight-through ternary training; neither is Tequila. Most models here (Llama,
  ``attention_bias=False``) also have no bias tensor in which transformers would load it. So it is left
  out.
- **Scales per group (or per output channel)**, where BitNet b1.58 uses one per tensor: the grids and
  the compressed-tensors export here have a scale per group or channel, and a finer scale fits better.
- **The dead-zone width is a parameter**, ``threshold * mean|w|`` with ``threshold = 0.5`` by default,
  which is exactly BitNet's round-clip (round half to even sends ``|w| = alpha / 2`` to 0 as well).

Ternary values are a subset of the signed 2-bit grid ``[-2, 1]``, and with no zero point
``(q - 0) * scale`` gives ``{-alpha, 0, +alpha}`` exactly, so a ternary weight is a 2-bit symmetric
:class:`~weightkit.quantized.grid.QuantizedWeight` and is exported as compressed-tensors'
pack-quantized int2, which transformers and :func:`weightkit.load` read back bit for bit. (``-2`` is
never used; a true 1.58-bit packing has no compressed-tensors format.)
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.compress.quant.module import quantize_each_weight
from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.registry import register
from weightkit.select import DEFAULT_IGNORE

__all__ = ["TernaryConfig", "ternary_quantize"]


@dataclass
class TernaryConfig:
    """Ternary weights: each weight becomes ``-s``, ``0`` or ``+s`` with ``s = mean|w|`` of its group.

    Attributes:
        group_size: input columns sharing one scale; ``None`` for one scale per output channel.
        threshold: width of the dead zone as a fraction of the group's mean ``|w|``: weights with
            ``|w| <= threshold * mean|w|`` become 0. The default 0.5 is BitNet b1.58's round-clip; larger
            values zero more weights.
        targets: module names or ``re:`` patterns to quantize; ``_default`` means every linear layer.
        ignore: names or patterns left in full precision (default: embeddings, lm_head, norms, pooler).
    """

    group_size: int | None = 128
    threshold: float = 0.5
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    LABEL: ClassVar[str] = "ternary"

    def __post_init__(self):
        if not self.threshold > 0:
            raise WeightkitError(f"threshold must be > 0 (a fraction of mean |w|), got {self.threshold}")
        self.scheme_for("")  # validates the group size

    @property
    def overrides(self) -> dict[str, dict]:
        return {}  # one grid for every layer: nothing to vary per module

    def scheme_for(self, module_name: str) -> QuantScheme:
        """The 2-bit symmetric grid that holds the ternary values (same for every module)."""
        return QuantScheme(bits=2, group_size=self.group_size, symmetric=True)

    def quantize_weight(self, weight: Tensor, module_name: str, name: str) -> QuantizedWeight:
        """The ternary grid of ``weight`` (``name`` in messages; every module gets the same grid)."""
        return ternary_quantize(weight, group_size=self.group_size, threshold=self.threshold, name=name)


def ternary_quantize(
    w: Tensor, *, group_size: int | None, threshold: float = 0.5, name: str = "weight"
) -> QuantizedWeight:
    """Absmean ternary quantization of ``w`` (``[out, in]``) per group of ``group_size`` columns.

    Per group, ``scale = mean|w|`` and ``q = sign(w)`` where ``|w| > threshold * scale``, else 0.

    Returns:
        a 2-bit symmetric ``QuantizedWeight`` with ``qweight`` in ``{-1, 0, 1}`` (``int8``) and ``scale``
        ``[out, groups]`` in ``w``'s dtype.

    Raises:
        WeightkitError: ``w`` is not 2-D, the group size does not divide its columns, it holds NaN/Inf,
            or ``threshold <= 0``.
    """
    if not threshold > 0:
        raise WeightkitError(f"{name}: threshold must be > 0, got {threshold}")
    scheme = QuantScheme(bits=2, group_size=group_size, symmetric=True)
    scheme.check_shape(tuple(w.shape), name)
    require_finite(w, name)  # sign(NaN) is NaN: it has no ternary value
    groups = w.to(torch.promote_types(w.dtype, torch.float32)).reshape(
        w.shape[0], -1, group_size or w.shape[1]
    )
    # An all-zero group gets the smallest positive scale (as the integer grids do): its q is all 0.
    scale = groups.abs().mean(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    q = torch.where(groups.abs() > threshold * scale, torch.sign(groups), torch.zeros_like(groups))
    return QuantizedWeight(q.to(torch.int8).reshape(w.shape), scale.squeeze(-1).to(w.dtype), None, scheme)


register("compress", "ternary", TernaryConfig, quantize_each_weight)
