"""NuSLERP: spherical interpolation of two models, of their task vectors, or of each row or column.

NuSLERP is mergekit's own method (Arcee; no paper, no arXiv id), a reworked SLERP (see
:mod:`weightkit.merge.slerp` for SLERP's origin). This module implements mergekit 0.1.5's ``nuslerp``:

- Two models, each with a ``weight``; the interpolation factor is ``t = w_2 / (w_1 + w_2)`` (0.5 when
  ``|w_1 + w_2| < 1e-6``), so ``t = 0`` gives the first model.
- With a base model, the two task vectors (model minus base) are interpolated and the result is added to
  the base; without one, the models' weights themselves.
- ``nuslerp_flatten: true`` (the default) interpolates each tensor as one vector; ``false`` interpolates
  each vector along the last dimension (each row of a matrix) on its own, or, with
  ``nuslerp_row_wise: true``, each vector along the first dimension (each column). A 1-D tensor is one
  vector either way, and ``nuslerp_row_wise`` has no effect while ``nuslerp_flatten`` is true.
- For each pair of vectors ``a, b``: ``cos = <a, b> / (max(|a|, 1e-7) max(|b|, 1e-7))`` clamped to
  ``[-1, 1]`` (a zero vector has ``cos = 0``). Only when ``1 - cos^2 <= 1e-16`` (colinear up to rounding)
  is the result ``(1 - t) a + t b``; otherwise, with ``theta = acos(cos)``,
  ``(sin((1 - t) theta) a + sin(t theta) b) / sin(theta)``.

Unlike ``slerp``, nearly colinear vectors are interpolated along the sphere too (``slerp`` falls back to
linear interpolation beyond ``|cos| > 0.9995``), and a vector with a tiny norm is still normalised. The one
difference from mergekit is numerical: the cosines are taken in double precision (the whole-tensor one
from :func:`weightkit.merge.gram.gram`) and each vector pair's two coefficients are computed in double and
applied to the float32 vectors, where mergekit computes everything in float32; the results agree to
float32 rounding.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.gram import gram
from weightkit.merge.params import Spec, check_bool, check_spec
from weightkit.registry import register

__all__ = ["nuslerp", "nuslerp_factor", "NuSlerpConfig"]

# mergekit's floor on a norm before dividing by it, and its colinearity test 1 - cos^2 <= _EPS^2.
_NORM_FLOOR = 1e-7
_EPS = 1e-8


def nuslerp(a: Tensor, b: Tensor, t: float, *, dim: int | None = None) -> Tensor:
    """Spherical interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``), of whole tensors or of vectors.

    Args:
        a: the tensor at ``t = 0``; not modified.
        b: the tensor at ``t = 1``, same shape; not modified.
        t: interpolation factor, usually in ``[0, 1]``.
        dim: None interpolates the flattened tensors as one vector each; an int interpolates each vector
            along that dimension (-1: each row of a matrix; 0: each column) with its own angle.

    Returns:
        A new tensor of ``a``'s shape and dtype.

    Raises:
        WeightkitError: ``a`` and ``b`` have different shapes, or ``dim`` is not a dimension of them.
    """
    if a.shape != b.shape:
        raise WeightkitError(
            f"nuslerp needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    t = float(t)
    if dim is None or a.dim() <= 1:
        g = gram([a, b]).cpu()
        products = torch.stack([g[0, 1], g[0, 0], g[1, 1]])[None]
        coef_a, coef_b = _coefficients(products, t)
        return torch.mul(a, float(coef_a[0])).add_(b, alpha=float(coef_b[0]))
    if not -a.dim() <= dim < a.dim():
        raise WeightkitError(f"nuslerp: dim {dim} is not a dimension of a {a.dim()}-D tensor")
    # Vectors along ``dim`` become the rows of a [vectors, length] view.
    rows_a, rows_b = a.movedim(dim, -1), b.movedim(dim, -1)
    moved_shape = rows_a.shape
    rows_a, rows_b = rows_a.reshape(-1, a.shape[dim]), rows_b.reshape(-1, a.shape[dim])
    products = torch.stack(
        [
            torch.linalg.vecdot(rows_a, rows_b),
            torch.linalg.vecdot(rows_a, rows_a),
            torch.linalg.vecdot(rows_b, rows_b),
        ],
        dim=1,
    ).double()
    coef_a, coef_b = _coefficients(products, t)
    out = rows_a * coef_a.to(a.dtype)[:, None]
    out.addcmul_(rows_b, coef_b.to(a.dtype)[:, None])
    return out.reshape(moved_shape).movedim(-1, dim).contiguous()


def _coefficients(products: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Each vector pair's coefficients of ``a`` and ``b``, from float64 rows ``[<a, b>, <a, a>, <b, b>]``."""
    ab, aa, bb = products.unbind(1)
    cos = ab / (aa.sqrt().clamp(min=_NORM_FLOOR) * bb.sqrt().clamp(min=_NORM_FLOOR))
    cos = cos.clamp(-1.0, 1.0)  # NaN stays NaN (a non-finite input), and so does every coefficient then
    colinear = (1 - cos.square()) <= _EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp_factor(weights: list[float]) -> float:
    """mergekit's interpolation factor from the two models' weights: ``w_2 / (w_1 + w_2)`` (0.5 at a zero
    sum)."""
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


@dataclass
class NuSlerpConfig:
    """NuSLERP of two models, with or without a base model (``merge_method: nuslerp``).

    Attributes:
        weight: each model's weight (a model entry's ``weight`` overrides it); only the ratio matters:
            ``t = w_2 / (w_1 + w_2)``. A number, a gradient over layers or filter entries. mergekit requires
            one per model; here the default 1.0 gives ``t = 0.5``.
        nuslerp_flatten: interpolate each tensor as one vector (default) rather than vector by vector.
        nuslerp_row_wise: with ``nuslerp_flatten: false``, interpolate the vectors along the first dimension
            (the columns of a matrix) instead of the last (its rows).
    """

    weight: Spec = 1.0
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False

    per_model: ClassVar[tuple[str, ...]] = ("weight",)
    per_tensor: ClassVar[tuple[str, ...]] = ()
    base_optional: ClassVar[bool] = True
    model_count: ClassVar[tuple[int, int | None]] = (2, 2)
    # A NaN/Inf makes its vector's angle NaN, and every entry of that vector with it (or, colinear, the
    # entry itself is carried through): the engine checks only the result.
    propagates_non_finite: ClassVar[bool] = True

    def __post_init__(self):
        check_spec(self.weight, "nuslerp: weight")
        check_bool(self.nuslerp_flatten, "nuslerp: nuslerp_flatten")
        check_bool(self.nuslerp_row_wise, "nuslerp: nuslerp_row_wise")


def _nuslerp_merger(config: NuSlerpConfig, plan, model_params):
    dim = None if config.nuslerp_flatten else (0 if config.nuslerp_row_wise else -1)

    def merge_tensor(inputs):
        t = nuslerp_factor([p["weight"] for p in inputs.params])
        first, second = inputs.tensors
        if inputs.base is None:
            return nuslerp(first, second, t, dim=dim)
        # The inputs are ours to modify: each becomes its task vector.
        merged = nuslerp(first.sub_(inputs.base), second.sub_(inputs.base), t, dim=dim)
        return merged.add_(inputs.base)

    return merge_tensor


register("merge", "nuslerp", NuSlerpConfig, _nuslerp_merger)
