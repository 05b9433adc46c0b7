"""Per-tensor parameter values, as mergekit recipes write them.

A parameter (a model's ``weight``, ``density`` ...) is one of:

- a number: the same value for every tensor;
- a list of numbers: a *gradient* over the transformer layers. Layer ``i`` of ``n`` sits at
  ``t = i / (n - 1)`` (``t = 1`` when there is one layer), the values are spread evenly over ``t`` in
  [0, 1] and interpolated linearly in between (``[0, 1]`` gives 0 at layer 0, 1 at the last layer and
  0.5 half way). Every tensor outside the layers (embeddings, final norm, ``lm_head``) is at ``t = 0``
  and takes the first value, as in mergekit (which plans them with ``t = 0`` before and after the
  layers). In a recipe's ``slices``, the gradient runs over each slice's own layers;
- a list of ``{"filter": text, "value": v}`` entries: the first entry whose ``filter`` occurs in the
  tensor's name gives the value (itself a number or a gradient); an entry without ``filter``, with
  ``filter: null`` or with mergekit's wildcard ``filter: "*"`` matches every tensor.
"""

import re

from weightkit.errors import WeightkitError

__all__ = [
    "Spec",
    "check_spec",
    "check_range",
    "check_bool",
    "value_for",
    "value_at",
    "gradient_position",
    "fall_back",
    "layer_index",
    "layer_stack",
    "with_layer_index",
]

Spec = float | int | list

_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    found = _LAYER.search(tensor_name)
    return int(found.group(1)) if found else None


def layer_stack(tensor_name: str) -> str | None:
    """The name of the stack of layers a tensor belongs to (``model.layers.3.mlp...`` -> ``model.layers.``),
    or None outside the layers."""
    found = _LAYER.search(tensor_name)
    return tensor_name[: found.start(1)] if found else None


def with_layer_index(tensor_name: str, index: int) -> str:
    """``tensor_name`` moved to layer ``index`` (``model.layers.3.mlp...``, 0: ``model.layers.0...``)."""
    found = _LAYER.search(tensor_name)
    if found is None:
        raise WeightkitError(f"{tensor_name} belongs to no layer")
    return f"{tensor_name[: found.start(1)]}{index}{tensor_name[found.end(1) :]}"


def _is_filter_list(spec: object) -> bool:
    return isinstance(spec, list) and bool(spec) and isinstance(spec[0], dict)


def fall_back(spec: Spec, fallback: Spec | None) -> Spec:
    """``spec``, with ``fallback`` for the tensors that none of its filter entries matches.

    mergekit reads a parameter from the most specific place that gives it (a slice's source, then the
    slice, then the recipe); a filter list whose entries all miss a tensor falls through to the next
    place. Appending the next place's entries to the list gives the same value for every tensor.
    """
    if not _is_filter_list(spec) or fallback is None:
        return spec
    return [*spec, *(fallback if _is_filter_list(fallback) else [{"value": fallback}])]


def check_spec(spec: Spec, what: str) -> None:
    """Raise a clear error if ``spec`` is not a number, a gradient or a list of filter entries."""
    if isinstance(spec, bool) or not isinstance(spec, int | float | list):
        raise WeightkitError(f"{what}: expected a number, a list of numbers or filter entries, got {spec!r}")
    if not isinstance(spec, list):
        return
    if not spec:
        raise WeightkitError(f"{what}: an empty list gives no value")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
        return
    for entry in spec:
        if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise WeightkitError(
                f"{what}: a list must hold only numbers (a gradient) or only {{filter, value}} entries, "
                f"got {entry!r}"
            )
        check_spec(entry["value"], what)


def check_bool(value, what: str) -> None:
    """Raise a clear error unless ``value`` is True or False: a switch takes one value for every tensor
    (mergekit would also take a per-layer list or filter entries; those are refused, not read as true)."""
    if not isinstance(value, bool):
        raise WeightkitError(f"{what} must be true or false (one value for every tensor), got {value!r}")


def _numbers(spec: Spec) -> list[float]:
    if not isinstance(spec, list):
        return [float(spec)]
    if spec and isinstance(spec[0], dict):
        return [v for entry in spec for v in _numbers(entry["value"])]
    return [float(v) for v in spec]


def check_range(spec: Spec, what: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Check ``spec`` (see :func:`check_spec`) and that every number in it lies in [low, high].

    ``low_open`` excludes ``low`` itself: (low, high].
    """
    check_spec(spec, what)
    for v in _numbers(spec):
        if not (low < v if low_open else low <= v) or not v <= high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise WeightkitError(f"{what} must be in {interval}, got {v:g}")


def gradient_position(tensor_name: str, num_layers: int) -> float:
    """Where a gradient over ``num_layers`` layers puts a tensor: ``t`` in [0, 1] (see the module)."""
    layer = layer_index(tensor_name)
    # Outside the layers (embeddings, final norm, lm_head): t = 0. One layer: t = 1 (mergekit's rule).
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _gradient(values: list, t: float) -> float:
    # mergekit's interpolation, operation for operation, so both give the same float.
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * float(values[i0]) + frac * float(values[i1]))


def value_at(spec: Spec, tensor_name: str, t: float) -> float | None:
    """The value ``spec`` gives tensor ``tensor_name`` at gradient position ``t`` (None when no filter
    entry matches). ``t`` is the tensor's place in the layers it is merged over, e.g. the layers of one
    mergekit slice (see :func:`gradient_position`)."""
    if not isinstance(spec, list):
        return float(spec)
    if isinstance(spec[0], dict):
        for entry in spec:
            if entry.get("filter") in (None, "*") or str(entry["filter"]) in tensor_name:
                return value_at(entry["value"], tensor_name, t)
        return None
    return _gradient(spec, t)


def value_for(spec: Spec, tensor_name: str, num_layers: int) -> float | None:
    """The value ``spec`` gives tensor ``tensor_name`` of a model with ``num_layers`` layers (None when no
    filter entry matches)."""
    return value_at(spec, tensor_name, gradient_position(tensor_name, num_layers))
