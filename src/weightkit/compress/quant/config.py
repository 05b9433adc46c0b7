"""Configuration shared by the weight-quantization methods (RTN, GPTQ, AWQ)."""

from dataclasses import dataclass, field

from weightkit.errors import WeightkitError
from weightkit.quantized.grid import QuantScheme
from weightkit.select import DEFAULT_IGNORE, resolve

__all__ = ["WeightQuantFields", "CalibrationFields"]

_SCHEME_KEYS = ("bits", "group_size", "symmetric")


@dataclass
class WeightQuantFields:
    """Which linear layers are quantized, and to which grid.

    Attributes:
        bits: bits per weight (2, 3, 4 or 8 are typical; 2 to 8 allowed).
        group_size: input columns that share one scale (32, 64 or 128); ``None`` for one scale per
            output channel. Smaller groups fit better and cost a little more storage.
        symmetric: a zero-centred grid (True) or an affine grid with a zero point (False), which fits
            rows whose values are skewed better at the same bits.
        targets: module names or ``re:`` patterns to quantize; ``_default`` means every linear layer.
        ignore: names or patterns left in full precision (default: embeddings, lm_head, norms, pooler).
        overrides: per-module grid changes, e.g. ``{"re:.*down_proj": {"bits": 8}}``; a module takes
            its exact-name entry, else the first matching ``re:`` entry, else the defaults above.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        QuantScheme(self.bits, self.group_size, self.symmetric)  # validates
        for pattern, change in self.overrides.items():
            unknown = set(change) - set(_SCHEME_KEYS)
            if unknown:
                allowed = ", ".join(_SCHEME_KEYS)
                raise WeightkitError(
                    f"overrides[{pattern!r}]: unknown key(s) {sorted(unknown)}; allowed: {allowed}"
                )
            self.scheme_for(pattern)  # validates the merged values

    def scheme_for(self, module_name: str) -> QuantScheme:
        """The grid for ``module_name`` after applying any matching override."""
        base = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        return QuantScheme(**{**base, **(resolve(module_name, self.overrides) or {})})


@dataclass
class CalibrationFields:
    """How calibration text is fed to methods that look at activations (GPTQ, AWQ).

    Attributes:
        calib_samples: number of calibration texts (passages) used.
        calib_max_length: tokens per text at most (longer texts are truncated).
        calib_batch_size: texts per forward pass. Batches run through a block one at a time, so the
            activation memory grows with this, not with ``calib_samples``.
        seed: picks and orders the calibration texts.
    """

    calib_samples: int = 128
    calib_max_length: int = 512
    calib_batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("calib_samples", "calib_max_length", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise WeightkitError(f"{name} must be at least 1, got {getattr(self, name)}")
