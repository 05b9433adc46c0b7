"""FP8 and FP4 weight quantization (ZeroQuant-FP, arXiv:2307.09782), calibration-free like RTN.

"ZeroQuant-FP: A Leap Forward in LLMs Post-Training W4A8 Quantization Using Floating-Point Formats"
(Wu, Yao, He) puts LLM weights on FP8 (E4M3/E5M2) and FP4 (E2M1) grids with absmax scales per channel or
per group, and proposes power-of-two scale constraints (M1, M2) so FP4 weights cast to FP8 by an exponent
shift. The grids, rounding and scales are :mod:`weightkit.quantized.float_grid`; its docstring lists the
deviations (round-to-nearest instead of GPTQ, no LoRC; FP4 as NVFP4, whose two-level scales take no
power-of-two constraint).

``FP8Config`` (method ``fp8``) and ``FP4Config`` (method ``fp4``) quantize each selected linear weight on
its own, so :func:`weightkit.compress.compress_checkpoint` streams them one tensor at a time, as RTN.
Saved checkpoints are compressed-tensors "float-quantized" (FP8 E4M3) and "nvfp4-pack-quantized" (FP4);
E5M2 has no compressed-tensors format and is refused when saving.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from weightkit.compress.quant.module import quantize_each_weight
from weightkit.errors import WeightkitError
from weightkit.quantized.float_grid import NVFP4_GROUP_SIZE, FloatQuantizedWeight, FloatScheme, float_quantize
from weightkit.registry import register
from weightkit.select import DEFAULT_IGNORE, resolve

__all__ = ["FP8Config", "FP4Config"]

_FP8_OVERRIDE_KEYS = ("group_size", "power_of_two")


@dataclass
class FP8Config:
    """FP8 weights: each group divided by ``max|w| / format max`` and rounded to the nearest FP8 number.

    Attributes:
        fp8_format: ``"e4m3"`` (3 mantissa bits, largest value 448: the finer grid, and the one
            compressed-tensors, transformers and vLLM store) or ``"e5m2"`` (2 mantissa bits, a wider range
            that weights with a per-group scale do not need; it can be used in memory but not saved).
        group_size: input columns sharing one scale; ``None`` for one scale per output channel.
        power_of_two: ``None`` for exact scales, or the paper's constraints: ``"m1"`` rounds each scale up
            to a power of two, ``"m2"`` keeps one real factor per output row (its largest scale) and rounds
            each group's ratio to it up to a power of two. Both cost a little accuracy and let a kernel
            rescale by shifting exponents.
        targets: module names or ``re:`` patterns to quantize; ``_default`` means every linear layer.
        ignore: names or patterns left in full precision (default: embeddings, lm_head, norms, pooler).
        overrides: per-module changes of ``group_size`` or ``power_of_two``, e.g.
            ``{"re:.*down_proj": {"group_size": None}}``.
    """

    fp8_format: str = "e4m3"
    group_size: int | None = None
    power_of_two: str | None = None
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: dict[str, dict] = field(default_factory=dict)

    LABEL: ClassVar[str] = "FP8"

    def __post_init__(self):
        if self.fp8_format not in ("e4m3", "e5m2"):
            raise WeightkitError(f"fp8_format must be 'e4m3' or 'e5m2', got {self.fp8_format!r}")
        self.scheme_for("")  # validates
        for pattern, change in self.overrides.items():
            unknown = set(change) - set(_FP8_OVERRIDE_KEYS)
            if unknown:
                raise WeightkitError(
                    f"overrides[{pattern!r}]: unknown key(s) {sorted(unknown)}; allowed: "
                    f"{', '.join(_FP8_OVERRIDE_KEYS)}"
                )
            self.scheme_for(pattern)

    def scheme_for(self, module_name: str) -> FloatScheme:
        """The float grid for ``module_name`` after applying any matching override."""
        base = {"group_size": self.group_size, "power_of_two": self.power_of_two}
        return FloatScheme(self.fp8_format, **{**base, **(resolve(module_name, self.overrides) or {})})

    def quantize_weight(self, weight: Tensor, module_name: str, name: str) -> FloatQuantizedWeight:
        """The FP8 grid of ``weight``, the weight of module ``module_name`` (``name`` in messages)."""
        return float_quantize(weight, self.scheme_for(module_name), name=name)


@dataclass
class FP4Config:
    """FP4 (E2M1) weights stored as NVFP4: groups of 16 columns, FP8 E4M3 group scales, a global scale.

    Attributes:
        group_size: columns per scale; NVFP4 fixes it at 16 (any other value is refused).
        targets: module names or ``re:`` patterns to quantize; ``_default`` means every linear layer.
        ignore: names or patterns left in full precision (default: embeddings, lm_head, norms, pooler).
    """

    group_size: int = NVFP4_GROUP_SIZE
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    LABEL: ClassVar[str] = "FP4"

    def __post_init__(self):
        self.scheme_for("")  # validates

    @property
    def overrides(self) -> dict[str, dict]:
        return {}  # NVFP4 has one layout: nothing to vary per module

    def scheme_for(self, module_name: str) -> FloatScheme:
        return FloatScheme("e2m1", self.group_size)

    def quantize_weight(self, weight: Tensor, module_name: str, name: str) -> FloatQuantizedWeight:
        """The NVFP4 grid of ``weight``, the weight of module ``module_name`` (``name`` in messages)."""
        return float_quantize(weight, self.scheme_for(module_name), name=name)


register("compress", "fp8", FP8Config, quantize_each_weight)
register("compress", "fp4", FP4Config, quantize_each_weight)
