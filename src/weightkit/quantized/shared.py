"""Linear layers that share their weights: :class:`SharedLinear` and weightkit's checkpoint format "shared".

A ``SharedLinear`` computes its weight from a set of *atoms* ``[S, out, in]`` that several layers hold as
the same ``nn.Parameter`` (one copy in memory; training updates it once), its own coefficients and,
optionally, its own low-rank correction::

    W = sum_j coefficients[j] * atoms[j]  (+ lora_b @ lora_a)

``coefficients`` is ``[S]`` (one scalar per atom: dictionary sharing, recursive layer tying with ``S = 1``
and coefficient 1) or ``[S, out]`` (a gate per output channel and atom: FoldGPT's gates).

The checkpoint format "shared" (``quant_method`` "weightkit", read only by :func:`weightkit.load`) stores
each atom set once, under the first layer (in module order) that uses it, and each shared layer ``NAME``
as:

- ``NAME.weight``: its coefficients flattened to 1-D (``[S]`` or ``[S * out]``, the atoms' dtype). Being
  1-D it makes transformers, which skips an unknown ``quant_method`` with a mere warning, fail loudly on the
  size mismatch instead of running a randomly initialised layer (tested);
- ``NAME.weight_atom_set``: ``int64 [1]``, the index of its atom set in the config's ``atom_sets``;
- ``NAME.weight_lora_a`` ``[r, in]`` and ``NAME.weight_lora_b`` ``[out, r]`` when it has a correction;
- ``NAME.bias`` if any;
- and, for the first layer of each atom set, ``NAME.weight_atoms``: the atoms ``[S, out, in]``.

``config.json``'s ``quantization_config``::

    {"quant_method": "weightkit", "format": "shared", "weightkit_version": "...",
     "atom_sets": ["<name of the layer storing set 0's atoms>", ...]}

Writing: :func:`shared_tensors` (with :func:`atom_set_indices` when writing a part at a time),
:func:`shared_quantization_config`. Reading: :func:`shared_layer_reader`
rebuilds the layers with every atom set as one ``nn.Parameter`` (tied again), checking every dtype and
shape against the model's layer and naming the tensor that is wrong. :func:`share_linears` turns chosen
``nn.Linear`` layers of a model into ``SharedLinear`` ones.
"""

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.weightkit_format import QUANT_METHOD, weightkit_quantization_config

__all__ = [
    "SharedLinear",
    "SHARED_SUFFIXES",
    "share_linears",
    "atom_set_indices",
    "shared_tensors",
    "shared_quantization_config",
    "shared_layer_reader",
]

# The tensors one shared layer NAME may store, as NAME.<suffix>.
SHARED_SUFFIXES = ("weight", "weight_atom_set", "weight_atoms", "weight_lora_a", "weight_lora_b", "bias")


class SharedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose weight is a combination of atoms shared with other layers.

    Parameters: ``atoms`` (``[S, out, in]``, the very ``nn.Parameter`` passed in, not a copy), and this
    layer's own ``coefficients`` (``[S]`` or ``[S, out]``), ``lora_a`` / ``lora_b`` (``[r, in]`` /
    ``[out, r]``, or ``None``) and ``bias``. ``model.parameters()`` lists a shared ``atoms`` once.

    Args:
        atoms: the shared atoms; pass the same ``nn.Parameter`` object to every layer that shares them.
        coefficients: ``[S]``, one weight per atom, or ``[S, out]``, one per atom and output channel.
        bias: ``[out]`` or ``None``.
        lora_a: ``[r, in]`` down projection of the layer's own low-rank correction (with ``lora_b``).
        lora_b: ``[out, r]`` up projection.

    Raises:
        WeightkitError: atoms that are not a 3-D ``nn.Parameter``, or a tensor whose shape does not fit
            them (named).
    """

    def __init__(
        self,
        atoms: nn.Parameter,
        coefficients: Tensor,
        bias: Tensor | None,
        *,
        lora_a: Tensor | None = None,
        lora_b: Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(atoms, nn.Parameter) or atoms.dim() != 3:
            raise WeightkitError(
                "SharedLinear's atoms must be one nn.Parameter [S, out, in] that the sharing layers hold in "
                f"common, got a {type(atoms).__name__} of shape {tuple(atoms.shape)}"
            )
        count, out_features, in_features = atoms.shape
        if tuple(coefficients.shape) not in ((count,), (count, out_features)):
            raise WeightkitError(
                f"SharedLinear's coefficients have shape {tuple(coefficients.shape)}, expected ({count},) or "
                f"({count}, {out_features}) for atoms of shape {tuple(atoms.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise WeightkitError(
                f"SharedLinear's bias has shape {tuple(bias.shape)}, expected ({out_features},)"
            )
        _check_lora(lora_a, lora_b, out_features, in_features)
        self.out_features, self.in_features = out_features, in_features
        self.atoms = atoms
        self.coefficients = _own(coefficients)
        self.bias = None if bias is None else _own(bias)
        self.lora_a = None if lora_a is None else _own(lora_a)
        self.lora_b = None if lora_b is None else _own(lora_b)

    @property
    def rank(self) -> int:
        """The rank of the layer's own low-rank correction (0 without one)."""
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def dense_weight(self) -> Tensor:
        """The layer's weight ``[out, in]`` in the atoms' dtype."""
        # [S] -> [S, 1, 1] scales whole atoms; [S, out] -> [S, out, 1] scales each atom's rows.
        coefficients = self.coefficients.reshape(self.atoms.shape[0], -1, 1)
        weight = (coefficients * self.atoms).sum(0)
        if self.lora_a is not None:
            weight = weight + self.lora_b @ self.lora_a
        return weight

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        lora = f", lora rank {self.rank}" if self.lora_a is not None else ""
        gates = "per channel" if self.coefficients.dim() == 2 else "scalar"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.atoms.shape[0]} shared atoms ({gates} coefficients){lora}"
        )


def _own(tensor: Tensor) -> nn.Parameter:
    """A parameter holding a copy of ``tensor``, so the layer never aliases the caller's tensor."""
    return nn.Parameter(tensor.detach().clone())


def _check_lora(lora_a: Tensor | None, lora_b: Tensor | None, out_features: int, in_features: int) -> None:
    if (lora_a is None) != (lora_b is None):
        raise WeightkitError("SharedLinear's lora_a and lora_b go together; got only one of them")
    if lora_a is None:
        return
    rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features or tuple(lora_b.shape) != (out_features, rank):
        raise WeightkitError(
            f"SharedLinear's lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not fit a "
            f"[{out_features}, {in_features}] layer: expected [r, {in_features}] and [{out_features}, r]"
        )


def share_linears(
    model: nn.Module,
    atoms: nn.Parameter,
    coefficients: Mapping[str, Tensor],
    *,
    loras: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, SharedLinear]:
    """Replace the ``nn.Linear`` layers of ``model`` named in ``coefficients`` by ``SharedLinear`` layers
    that all hold ``atoms``; each keeps its own bias.

    Args:
        model: the model, changed in place.
        atoms: ``[S, out, in]``, shared by every replaced layer (the same ``nn.Parameter`` object).
        coefficients: module name -> its coefficients (``[S]`` or ``[S, out]``).
        loras: module name -> ``(lora_a [r, in], lora_b [out, r])`` for the layers with a correction.

    Returns:
        module name -> its new ``SharedLinear``.

    Raises:
        WeightkitError: a name that is not an ``nn.Linear`` of ``model`` (e.g. GPT-2's ``Conv1D``), a layer of
            another shape than the atoms' ``[out, in]``, a LoRA for a layer not being shared, or tensors
            that do not fit (named).
    """
    loras = dict(loras or {})
    strays = sorted(set(loras) - set(coefficients))
    if strays:
        raise WeightkitError(f"a LoRA is given for {strays[0]}, which is not among the layers to share")
    shape = tuple(atoms.shape[1:])
    shared = {}
    for name, layer_coefficients in coefficients.items():
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise WeightkitError(
                f"{name} is a {type(linear).__name__}, not an nn.Linear: it cannot be shared"
            )
        if tuple(linear.weight.shape) != shape:
            raise WeightkitError(
                f"{name} is [{linear.out_features}, {linear.in_features}] but the atoms are {list(shape)}"
            )
        lora_a, lora_b = loras.get(name, (None, None))
        try:
            layer = SharedLinear(atoms, layer_coefficients, linear.bias, lora_a=lora_a, lora_b=lora_b)
        except WeightkitError as err:
            raise WeightkitError(f"{name}: {err}") from None
        model.set_submodule(name, layer)
        shared[name] = layer
    return shared


def _atom_owners(layers: Mapping[str, SharedLinear]) -> dict[int, str]:
    """``id(atoms)`` -> the name of the first layer (in ``layers``' order) holding them."""
    owners: dict[int, str] = {}
    for name, layer in layers.items():
        owners.setdefault(id(layer.atoms), name)
    return owners


def atom_set_indices(layers: Mapping[str, SharedLinear]) -> dict[int, int]:
    """``id(atoms)`` -> the index of the atom set in a checkpoint of ``layers`` (module order): sets are
    numbered in the order of their first layer, as :func:`shared_quantization_config` lists them."""
    return {atoms_id: index for index, atoms_id in enumerate(_atom_owners(layers))}


def shared_tensors(
    layers: Mapping[str, SharedLinear], prefix: str = "", *, set_index: Mapping[int, int] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs of the shared layers as the "shared" format stores them (module docstring):
    each layer's own tensors, and each atom set once, under the first layer (in ``layers``' order) holding
    it. Names get ``prefix``.

    Args:
        layers: the shared layers by name, in module order.
        prefix: put before every name.
        set_index: ``id(atoms)`` -> the set's index in the checkpoint, for ``layers`` that are only part of
            the model (written a part at a time); default: :func:`atom_set_indices` of ``layers``.
    """
    owners = _atom_owners(layers)
    set_index = atom_set_indices(layers) if set_index is None else set_index
    for name, layer in layers.items():
        head = f"{prefix}{name}."
        atoms_id = id(layer.atoms)
        if owners[atoms_id] == name:
            yield head + "weight_atoms", layer.atoms.detach()
        yield head + "weight", layer.coefficients.detach().reshape(-1)
        yield head + "weight_atom_set", torch.tensor([set_index[atoms_id]], dtype=torch.int64)
        if layer.lora_a is not None:
            yield head + "weight_lora_a", layer.lora_a.detach()
            yield head + "weight_lora_b", layer.lora_b.detach()
        if layer.bias is not None:
            yield head + "bias", layer.bias.detach()


def shared_quantization_config(layers: Mapping[str, SharedLinear], ignore: list[str]) -> dict:
    """The ``quantization_config`` of a "shared" checkpoint of ``layers`` (module order): the owner of each
    atom set, in the order :func:`shared_tensors` numbers them, and the linear layers left plain."""
    config = weightkit_quantization_config("shared", {}, ignore)
    config["atom_sets"] = list(_atom_owners(layers).values())
    config["ignore"] = ignore
    return config


def _tensor(reader, name: str, dims: int, dtype: torch.dtype | None = None) -> Tensor:
    """A stored tensor, refused by name unless present, finite, ``dims``-D and floating (or ``dtype``)."""
    if name not in reader:
        raise WeightkitError(f"{name} is missing: the checkpoint's format is weightkit shared")
    tensor = reader.get(name)
    floating_ok = dtype is None and tensor.is_floating_point()
    if tensor.dim() != dims or not (floating_ok or tensor.dtype == dtype):
        kind = "floating-point" if dtype is None else str(dtype)
        raise WeightkitError(
            f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected a {dims}-D {kind} tensor"
        )
    require_finite(tensor, name)
    return tensor


def shared_layer_reader(qc: dict, where: str) -> Callable[..., SharedLinear]:
    """The function that rebuilds one shared layer of a "shared" checkpoint whose ``quantization_config`` is
    ``qc``: ``(reader, the layer's checkpoint name, the model's nn.Linear, dtype) -> SharedLinear``.

    Layers of one atom set get one ``nn.Parameter`` (read once, on first use). ``dtype`` casts every stored
    float tensor; ``None`` keeps them as stored.

    Raises:
        WeightkitError: (``where`` names the checkpoint) ``atom_sets`` is not a list of names; when reading
            a layer, an atom set index out of range, a missing tensor, or a dtype or shape that does not fit
            the model's layer (named).
    """
    owners = qc.get("atom_sets")
    if qc.get("quant_method") != QUANT_METHOD or not (
        isinstance(owners, list) and owners and all(isinstance(o, str) for o in owners)
    ):
        raise WeightkitError(
            f"{where}: a weightkit shared quantization_config needs atom_sets, a non-empty list of layer "
            f"names, got {owners!r}"
        )
    atom_sets: dict[int, nn.Parameter] = {}

    def read(reader, ckpt_name: str, linear: nn.Linear, dtype: torch.dtype | None) -> SharedLinear:
        def cast(tensor: Tensor) -> Tensor:
            return tensor if dtype is None else tensor.to(dtype)

        index_name = f"{ckpt_name}.weight_atom_set"
        index_tensor = _tensor(reader, index_name, 1, torch.int64)
        if index_tensor.numel() != 1 or not 0 <= int(index_tensor[0]) < len(owners):
            raise WeightkitError(
                f"{index_name} is {index_tensor.tolist()}, expected one index into the {len(owners)} atom "
                f"sets of {where}"
            )
        index = int(index_tensor[0])
        shape = (linear.out_features, linear.in_features)
        if index not in atom_sets:
            atom_sets[index] = nn.Parameter(cast(_tensor(reader, f"{owners[index]}.weight_atoms", 3)))
        atoms = atom_sets[index]
        if tuple(atoms.shape[1:]) != shape:
            raise WeightkitError(
                f"{ckpt_name} is [{shape[0]}, {shape[1]}] in the model but its atom set, "
                f"{owners[index]}.weight_atoms, holds atoms of shape {tuple(atoms.shape)}"
            )
        count = atoms.shape[0]
        flat = _tensor(reader, f"{ckpt_name}.weight", 1)
        if flat.numel() not in (count, count * shape[0]):
            raise WeightkitError(
                f"{ckpt_name}.weight holds {flat.numel()} coefficients, expected {count} (one per atom) or "
                f"{count * shape[0]} (one per atom and output channel)"
            )
        coefficients = flat if flat.numel() == count else flat.reshape(count, shape[0])
        lora = {}
        for suffix in ("weight_lora_a", "weight_lora_b"):
            if f"{ckpt_name}.{suffix}" in reader:
                lora[suffix] = cast(_tensor(reader, f"{ckpt_name}.{suffix}", 2))
        bias = cast(_tensor(reader, f"{ckpt_name}.bias", 1)) if f"{ckpt_name}.bias" in reader else None
        if (bias is None) != (linear.bias is None):
            raise WeightkitError(
                f"{ckpt_name}.bias: the checkpoint and the model disagree on whether the layer has a bias"
            )
        try:
            return SharedLinear(
                atoms,
                cast(coefficients),
                bias,
                lora_a=lora.get("weight_lora_a"),
                lora_b=lora.get("weight_lora_b"),
            )
        except WeightkitError as err:
            raise WeightkitError(f"{ckpt_name}: {err}") from None

    return read
