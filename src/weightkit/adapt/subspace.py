"""Intrinsic-dimension (subspace) fine-tuning: ``d`` trained numbers, spread over the weights by a random map.

Papers:

- Li, Farkhoor, Liu, Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes", arXiv 1804.08838
  (DID, *direct intrinsic dimension*): ``theta = theta_0 + P theta_d`` with ``theta_d`` in ``R^d`` the only
  trained vector, initialised at zero, and ``P`` a fixed random ``D x d`` matrix with unit-length columns.
- Aghajanyan, Zettlemoyer, Gupta, "Intrinsic Dimensionality Explains the Effectiveness of Language Model
  Fine-Tuning", arXiv 2012.13255 (SAID, *structure-aware* intrinsic dimension): one learned scalar per weight
  tensor, ``theta_i = theta_0,i + lambda_i P_i theta_d``. The ``m`` scalars count in ``d``: ``theta_d`` has
  ``d - m`` entries, so exactly ``d`` numbers train either way.
- ``P`` is never stored: it is a Fastfood transform (Le, Sarlos, Smola, "Fastfood: Approximate Kernel
  Expansions in Loglinear Time", arXiv 1408.3060), as in both papers. One block is ``H G Pi H B`` on
  ``L = 2^ceil(log2 d)`` coordinates (``theta_d`` zero-padded to ``L``): ``B`` random signs, ``H`` the
  Walsh-Hadamard matrix (applied by the fast transform, ``O(L log L)``, never stored), ``Pi`` a random
  permutation, ``G`` Gaussian. A tensor of ``D`` entries stacks ``ceil(D / L)`` independent blocks and
  keeps the first ``D`` outputs (Le et al.'s construction for more outputs than inputs); ``O(D log d)``.

Every targeted module that holds parameters (by default every one: linear layers, embeddings, norms, the
output head) gets a :class:`SubspaceLayer`; each of its parameters has its own Fastfood projection, whose
random diagonals are drawn from ``seed`` in model order. A parameter shared by two modules (``lm_head`` tied
to the input embeddings) is one tensor: projected once, by the first module, and the tie holds. ``theta_d``
is one parameter shared by all layers of an adapter: it is registered in the first layer only (``<first
layer>.subspace_theta.<adapter>``) and the others reach it through a plain reference, so the model counts it
once. Each layer's update is computed once per forward from the current ``theta_d``.

Precision: on 16-bit modules ``theta_d``, SAID's scales and the projections are float32 unless
``autocast_adapter_dtype=False`` (PEFT's adapter precision), so every optimizer step is kept in
``theta_d``. The module itself still runs in its own dtype: the moved parameter ``theta_0 + P theta_d`` is
rounded to it in the forward (as a merged update would be).

Deliberate deviations:

- Fastfood's row-scaling diagonal ``S`` and its ``1 / (sigma sqrt(d))`` are kernel-approximation devices (they
  give rows the length distribution of Gaussian rows); the intrinsic-dimension papers only need unit-length
  columns. Each block is scaled by ``1 / (||G_b|| sqrt(D))`` instead, which makes every column of ``P_i``
  unit-length (exactly when ``D`` is a multiple of ``L``, up to the truncated rows otherwise), as Li et al.'s
  normalisation does. Li et al.'s code uses one padded block of size ``2^ceil(log2 D)`` rather than stacked
  blocks of size ``2^ceil(log2 d)``; both are Fastfood, the stacked one is cheaper.
- Each tensor's ``P_i`` has unit columns on its own (as Aghajanyan et al.'s code projects each tensor
  separately), so the full ``P`` has columns of length ``sqrt(number of tensors)``.
- SAID's scalars start at 1 (the reference code's choice; with ``theta_d = 0`` the start is neutral anyway).

Saved adapters hold ``theta_d`` and SAID's scales only, exactly ``d`` numbers: the projection is drawn again
from ``seed`` (saved in the adapter's config) with torch's CPU generator when the adapter is loaded, as
PEFT's VeRA does with ``save_projection=False``. Saving the diagonals instead would cost about 13 bytes per
adapted weight entry (int8 signs, int64 permutation, the Gaussian), more than the model itself. The price:
an adapter loads exactly only where torch's CPU generator gives the same streams for the same seed, which
it has done across releases for years.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.adapt.layer import AdapterModule, adapter_dtype, adapter_layers, finish_adapter, wrap_targets
from weightkit.errors import WeightkitError
from weightkit.quantized.linear import QuantizedLinear
from weightkit.registry import register
from weightkit.select import select_modules

__all__ = [
    "SubspaceConfig",
    "SubspaceLayer",
    "FastfoodParams",
    "add_subspace",
    "fwht",
    "fastfood_params",
    "fastfood_project",
]


@dataclass
class SubspaceConfig:
    """How many numbers train and which layers they move.

    Attributes:
        dim: ``d``, the total number of trained numbers (the intrinsic dimension being tried). The papers
            reach 90% of full fine-tuning with a few hundred to a few thousand; >= 1.
        said: structure-aware variant (SAID): each adapted tensor also gets a learned scale ``lambda_i``,
            and these scales are part of ``dim`` (``theta_d`` then has ``dim - number of tensors``
            entries, so ``dim`` must exceed the number of adapted tensors). ``False``: plain DID.
        targets: the modules whose own parameters are reparameterised (linear layers, embeddings, norms, any
            module holding parameters): exact module names or ``re:`` patterns matched against the full name
            (default: all of them, the whole model, as in the papers; e.g. ``["re:.*_proj"]`` for the
            attention and MLP projections only).
        seed: seed of the random projection; the same seed on the same targets gives the same projection.
    """

    dim: int = 1000
    said: bool = False
    targets: list[str] = field(default_factory=lambda: ["re:.*"])
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise WeightkitError(f"subspace: dim must be an integer >= 1, got {self.dim!r}")
        if not isinstance(self.said, bool):
            raise WeightkitError(f"subspace: said must be true or false, got {self.said!r}")
        if not self.targets:
            raise WeightkitError("subspace: targets is empty; name the modules to adapt")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise WeightkitError(f"subspace: seed must be an integer, got {self.seed!r}")


# Largest Hadamard factor fwht multiplies by: 32 x 32 keeps each pass a cheap small matmul while taking 5
# butterfly stages at once (measured ~5x faster than one pass per stage on CPU, forward and backward).
_FWHT_FACTOR = 32


def _hadamard(size: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Sylvester's ``size x size`` Hadamard matrix (``size`` a power of two)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)))
    return h


def fwht(x: Tensor) -> Tensor:
    """Walsh-Hadamard transform along the last axis, unnormalised: ``x @ H`` with ``H`` Sylvester's
    ``L x L`` matrix of +-1 (``H[i, j] = (-1)^popcount(i & j)``, symmetric).

    ``H_L`` is the Kronecker product of small Hadamard matrices (``H_ab = H_a kron H_b``), so the transform
    is one small matmul per factor of at most 32, each along its own group of index bits:
    ``O(L log L)`` per row, vectorised over any leading (batch) axes.

    Raises:
        WeightkitError: the last axis is not a power of two.
    """
    length = x.shape[-1]
    if length < 1 or length & (length - 1):
        raise WeightkitError(f"fwht: the last axis must be a power of two, got {length}")
    out = x.reshape(-1, length)
    inner = 1  # product of the factors done so far: they act on the low index bits
    while inner < length:
        size = min(_FWHT_FACTOR, length // inner)
        h = _hadamard(size, dtype=x.dtype, device=x.device)
        # View the index as (higher bits, this factor's bits, lower bits) and multiply along the middle.
        out = out.reshape(-1, size) @ h if inner == 1 else h @ out.reshape(-1, size, inner)
        inner *= size
    return out.reshape(x.shape)


class FastfoodParams(NamedTuple):
    """The random diagonals of a stack of Fastfood blocks, one row per block (``num_blocks x L``).

    Attributes:
        sign: ``B``, +-1 (int8).
        perm: ``Pi`` as indices: block ``b`` maps ``v`` to ``v[perm[b]]`` (int64).
        gauss: ``G``, standard normal.
        scale: one factor per block, ``1 / (||G_b|| sqrt(D))`` (unit-length columns).
    """

    sign: Tensor
    perm: Tensor
    gauss: Tensor
    scale: Tensor


def fastfood_params(
    d: int, out_features: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> FastfoodParams:
    """Draw the diagonals of a ``out_features x d`` Fastfood projection (on the CPU, from ``generator``).

    Blocks have ``L = 2^ceil(log2 d)`` rows; ``ceil(out_features / L)`` of them are stacked.
    """
    length = 1 << max(d - 1, 0).bit_length()
    num_blocks = -(-out_features // length)
    sign = torch.randint(0, 2, (num_blocks, length), generator=generator, dtype=torch.int8) * 2 - 1
    perm = torch.argsort(torch.rand(num_blocks, length, generator=generator), dim=-1)
    gauss = torch.randn(num_blocks, length, generator=generator, dtype=torch.float64)
    scale = 1 / (gauss.norm(dim=-1) * math.sqrt(out_features))
    return FastfoodParams(sign, perm, gauss.to(dtype), scale.to(dtype))


def fastfood_project(theta_d: Tensor, params: FastfoodParams, out_features: int) -> Tensor:
    """``P @ theta_d`` for the stacked Fastfood matrix ``P`` (``out_features x d``) that ``params`` describe.

    Block ``b`` is ``scale_b * H diag(gauss_b) Pi_b H diag(sign_b)`` on ``theta_d`` zero-padded to ``L``; the
    blocks' outputs are concatenated and the first ``out_features`` kept.

    Args:
        theta_d: the ``d`` subspace coordinates (``d <= L``).
        params: from :func:`fastfood_params` (same ``d`` and ``out_features``).
        out_features: ``D``, the length of the result.
    """
    length = params.gauss.shape[-1]
    x = F.pad(theta_d, (0, length - theta_d.shape[-1])) * params.sign  # (blocks, L): every block sees theta_d
    x = fwht(x)
    x = torch.gather(x, -1, params.perm)
    x = fwht(x * params.gauss)
    return (x * params.scale[:, None]).reshape(-1)[:out_features]


class _Fastfood(nn.Module):
    """One tensor's projection: the diagonals as buffers that follow ``.to()`` but are not saved (they are
    drawn again from the seed)."""

    def __init__(self, params: FastfoodParams, out_features: int, device: torch.device):
        super().__init__()
        self.out_features = out_features
        for key, value in params._asdict().items():
            self.register_buffer(key, value.to(device), persistent=False)

    def forward(self, theta_d: Tensor) -> Tensor:
        params = FastfoodParams(self.sign, self.perm, self.gauss, self.scale)
        return fastfood_project(theta_d, params, self.out_features)


class SubspaceLayer(AdapterModule):
    """A frozen module whose own parameters move along named adapters' random subspaces:
    ``p = p_0 + sum over active adapters of lambda_p * P_p theta_d`` (``lambda_p = 1`` without SAID).

    Any module that holds parameters itself (``nn.Linear``, ``nn.Embedding``, norms ...) can be wrapped: the
    forward runs the base module with the moved parameters (``torch.func.functional_call``). A parameter the
    module shares with an earlier adapted module (``lm_head`` tied to the embeddings) is moved by that
    module's projection, so the tie holds: this layer reads the earlier layer's update and never merges it.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.subspace_theta = nn.ParameterDict()  # theta_d, only in the adapter's first layer
        self.subspace_lambda = nn.ParameterDict()  # SAID: a scale per owned parameter, subspace_proj order
        self.subspace_proj = nn.ModuleDict()  # adapter -> {owned parameter name: its projection}
        # adapter name -> the ParameterDict holding theta_d: a plain dict, so the parameter is not
        # registered (counted, saved) again here; reading through the dict follows a replaced parameter.
        self.theta_home: dict[str, nn.ParameterDict] = {}
        # adapter -> {parameter name: (the earlier layer that owns it, its name there)}, plain references.
        self.tied: dict[str, dict[str, tuple[SubspaceLayer, str]]] = {}
        self.active: list[str] = []
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.theta_home)

    def add_adapter(
        self, name: str, theta_home: nn.ParameterDict, owners: dict[int, tuple["SubspaceLayer", str]], *,
        said: bool, generator: torch.Generator, autocast_adapter_dtype: bool = True,
    ) -> None:  # fmt: skip
        """Attach adapter ``name`` whose ``theta_d`` is ``theta_home[name]``: draw a projection from
        ``generator`` for each of the base module's parameters not yet in ``owners`` (``id(parameter)`` ->
        owning layer and name, updated here), and follow the owner for the others. Projections and scales
        are in :func:`~weightkit.adapt.layer.adapter_dtype` of the parameters' dtype."""
        d = theta_home[name].numel()
        projections, tied = nn.ModuleDict(), {}
        for param_name, param in self.base_layer.named_parameters(recurse=False):
            if id(param) in owners:
                tied[param_name] = owners[id(param)]
                continue
            dtype = adapter_dtype(param.dtype, autocast_adapter_dtype)
            params = fastfood_params(d, param.numel(), generator=generator, dtype=dtype)
            projections[param_name] = _Fastfood(params, param.numel(), param.device)
            owners[id(param)] = (self, param_name)
        self.subspace_proj[name] = projections
        if said and projections:
            weight = next(iter(self.base_layer.parameters()))
            dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
            ones = torch.ones(len(projections), device=weight.device, dtype=dtype)
            self.subspace_lambda[name] = nn.Parameter(ones)
        self.theta_home[name] = theta_home
        self.tied[name] = tied
        self.active.append(name)

    def param_delta(self, name: str, param_name: str) -> Tensor:
        """Adapter ``name``'s update of this layer's own parameter ``param_name``."""
        projections = self.subspace_proj[name]
        param = getattr(self.base_layer, param_name)
        delta = projections[param_name](self.theta_home[name][name]).view_as(param)
        if name in self.subspace_lambda:
            delta = delta * self.subspace_lambda[name][list(projections).index(param_name)]
        return delta

    def deltas(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s updates of the base module's parameters that are not merged: its own ones unless
        this layer merged them, the tied ones unless their owner merged them into the shared tensor."""
        out = {} if name in self.merged else {p: self.param_delta(name, p) for p in self.subspace_proj[name]}
        for param_name, (owner, owner_name) in self.tied[name].items():
            if name not in owner.merged:
                out[param_name] = owner.param_delta(name, owner_name)
        return out

    def merge(self) -> None:
        """Add the active adapters' updates into the base module's own parameters."""
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self._add(name, sign=1)
                    self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base parameters (up to float rounding)."""
        with torch.no_grad():
            while self.merged:
                self._add(self.merged.pop(), sign=-1)

    def _add(self, name: str, *, sign: int) -> None:
        for param_name in self.subspace_proj[name]:  # tied parameters are the owner's to merge
            param = getattr(self.base_layer, param_name)
            param += sign * self.param_delta(
                name, param_name
            )  # computed in the adapter's dtype, rounded once

    def forward(self, *args, **kwargs):
        params = dict(self.base_layer.named_parameters(recurse=False))
        moved = False
        for name in self.active:
            for param_name, delta in self.deltas(name).items():
                params[param_name] = params[param_name] + delta.to(params[param_name].dtype)
                moved = True
        if not moved:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, params, args, kwargs)


def _target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """The targeted modules that hold parameters themselves, or are subspace layers already, in model order.
    Other methods' adapter layers and everything inside them, and the frozen base inside a subspace layer,
    never count."""
    selected = select_modules(model, targets=targets, ignore=[], types=(nn.Module,))
    layers = adapter_layers(model)
    in_other = tuple(f"{n}." for n, layer in layers.items() if not isinstance(layer, SubspaceLayer))
    in_any = tuple(f"{n}." for n in layers)
    for module_name, module in selected.items():
        # Its weight is a buffer, not a parameter: it would silently stay out of the subspace.
        if isinstance(module, QuantizedLinear) and not module_name.startswith(in_any):
            raise WeightkitError(
                f"subspace: {module_name} is a QuantizedLinear layer (int{module.scheme.bits}, of a "
                "quantized checkpoint) whose weight stays frozen on its integer grid; target other modules, "
                "train LoRA, rsLoRA or DoRA over a quantized model, or adapt the full-precision model"
            )
    return [
        module_name
        for module_name, module in selected.items()
        if module_name
        and not module_name.startswith(in_other)
        and (
            isinstance(module, SubspaceLayer)
            or (
                next(module.parameters(recurse=False), None) is not None
                and not module_name.startswith(in_any)
            )
        )
    ]


def add_subspace(
    model: nn.Module, config: SubspaceConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Reparameterise the parameters of every targeted module of ``model`` in one shared random subspace
    (adapter ``name``); freeze everything else, so exactly ``config.dim`` numbers train.

    ``theta_d`` starts at zero, so a fresh adapter leaves the outputs unchanged. ``data`` and ``initialize``
    are accepted for the common signature: the initialisation needs no data and is already cheap.
    ``autocast_adapter_dtype``: float32 ``theta_d``, scales and projections on 16-bit modules (PEFT's
    default); ``False`` keeps the modules' dtype.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing, SAID with ``dim`` not above the number of adapted
            tensors, or an adapter name already used.
    """
    module_names = _target_names(model, config.targets)
    if not module_names:
        raise WeightkitError(f"subspace: targets {config.targets} select no module with parameters")
    # Children are wrapped before parents: a module with parameters of its own *and* adapted children runs
    # its children's subspace layers inside its own.
    layers = list(wrap_targets(model, module_names, SubspaceLayer, types=(nn.Module,)).values())
    if any(name in layer.adapter_names() for layer in layers):
        raise WeightkitError(f"subspace: the targeted layers already have an adapter named {name!r}")
    # Tied parameters (one tensor under two modules) are one tensor: moved, and counted, once.
    num_tensors = len({id(p) for layer in layers for p in layer.base_layer.parameters(recurse=False)})
    size = config.dim - num_tensors if config.said else config.dim
    if size < 1:
        raise WeightkitError(
            f"subspace: said=True spends one of the dim={config.dim} numbers on each of the {num_tensors} "
            f"adapted tensors, leaving none for theta_d; use dim > {num_tensors} or fewer targets"
        )
    home = layers[0]
    weight = next(iter(home.base_layer.parameters()))
    dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
    home.subspace_theta[name] = nn.Parameter(torch.zeros(size, device=weight.device, dtype=dtype))
    generator = torch.Generator().manual_seed(config.seed)
    owners: dict[int, tuple[SubspaceLayer, str]] = {}
    for layer in layers:
        layer.add_adapter(
            name, home.subspace_theta, owners, said=config.said, generator=generator,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )  # fmt: skip
    return finish_adapter(model, name, config)


# DID and SAID are one method; the presets name the papers' two variants.
register("adapt", "did", SubspaceConfig, add_subspace, preset={"said": False})
register("adapt", "said", SubspaceConfig, add_subspace, preset={"said": True})
