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

Every targeted ``nn.Linear`` gets a :class:`SubspaceLinear`; the weight (and the bias, if the layer has one)
each have their own Fastfood projection, whose random diagonals are persistent buffers drawn from ``seed`` in
model order. ``theta_d`` is one parameter shared by all layers of an adapter: it is registered in the first
layer only (``<first layer>.subspace_theta.<adapter>``) and the others reach it through a plain reference, so
the model counts it once. Each layer's update is computed once per forward from the current ``theta_d``.

Deliberate deviations:

- The papers reparameterise every parameter of the model; here only the targeted ``nn.Linear`` weights and
  biases are (default: all linear layers except ``lm_head``). Embeddings and norms stay frozen.
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

from weightkit.adapt.layer import finish_adapter, wrap_targets
from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = [
    "SubspaceConfig",
    "SubspaceLinear",
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
        targets: which ``nn.Linear`` modules are reparameterised (weight, and bias when present): exact module
            names or ``re:`` patterns matched against the full name (default: every linear layer except
            ``lm_head``).
        seed: seed of the random projection; the same seed on the same targets gives the same projection.
    """

    dim: int = 1000
    said: bool = False
    # Every name but lm_head's and the frozen layer inside an existing wrapper (a second adapter's targets).
    targets: list[str] = field(default_factory=lambda: ["re:(?!(.*\\.)?(lm_head|base_layer)$).*"])
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


class SubspaceLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight (and bias) move along named adapters' random subspaces:
    ``W = W_0 + sum over active adapters of lambda * P theta_d`` (``lambda = 1`` without SAID)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.subspace_theta = nn.ParameterDict()  # theta_d, only in the adapter's first layer
        self.subspace_lambda = nn.ParameterDict()  # SAID: [lambda_weight(, lambda_bias)]
        self.subspace_weight_proj = nn.ModuleDict()
        self.subspace_bias_proj = nn.ModuleDict()
        # adapter name -> the ParameterDict holding theta_d: a plain dict, so the parameter is not
        # registered (counted, saved) again here; reading through the dict follows a replaced parameter.
        self.theta_home: dict[str, nn.ParameterDict] = {}
        self.active: list[str] = []
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.subspace_weight_proj)

    def num_tensors(self) -> int:
        """How many tensors this layer reparameterises (weight, and bias when present)."""
        return 1 if self.base_layer.bias is None else 2

    def add_adapter(
        self, name: str, theta_home: nn.ParameterDict, *, said: bool, generator: torch.Generator
    ) -> None:
        """Attach adapter ``name`` whose ``theta_d`` is ``theta_home[name]``, drawing this layer's
        projections from ``generator``."""
        if name in self.subspace_weight_proj:
            raise WeightkitError(f"subspace: this layer already has an adapter named {name!r}")
        weight = self.base_layer.weight
        d = theta_home[name].numel()
        params = fastfood_params(d, weight.numel(), generator=generator, dtype=weight.dtype)
        self.subspace_weight_proj[name] = _Fastfood(params, weight.numel(), weight.device)
        if self.base_layer.bias is not None:
            bias = self.base_layer.bias
            params = fastfood_params(d, bias.numel(), generator=generator, dtype=bias.dtype)
            self.subspace_bias_proj[name] = _Fastfood(params, bias.numel(), bias.device)
        if said:
            ones = torch.ones(self.num_tensors(), device=weight.device, dtype=weight.dtype)
            self.subspace_lambda[name] = nn.Parameter(ones)
        self.theta_home[name] = theta_home
        self.active.append(name)

    def delta(self, name: str) -> tuple[Tensor, Tensor | None]:
        """Adapter ``name``'s updates of the weight and the bias (``None`` without a bias)."""
        theta_d = self.theta_home[name][name]
        delta_weight = self.subspace_weight_proj[name](theta_d).view_as(self.base_layer.weight)
        delta_bias = self.subspace_bias_proj[name](theta_d) if name in self.subspace_bias_proj else None
        if name in self.subspace_lambda:
            scales = self.subspace_lambda[name]
            delta_weight = delta_weight * scales[0]
            delta_bias = None if delta_bias is None else delta_bias * scales[1]
        return delta_weight, delta_bias

    def merge(self) -> None:
        """Add the active adapters' updates into the base weight and bias."""
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self._add(*self.delta(name), sign=1)
                    self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base weight (up to float rounding)."""
        with torch.no_grad():
            while self.merged:
                self._add(*self.delta(self.merged.pop()), sign=-1)

    def _add(self, delta_weight: Tensor, delta_bias: Tensor | None, *, sign: int) -> None:
        self.base_layer.weight += sign * delta_weight.to(self.base_layer.weight.dtype)
        if delta_bias is not None:
            self.base_layer.bias += sign * delta_bias.to(self.base_layer.bias.dtype)

    def forward(self, x: Tensor) -> Tensor:
        running = [name for name in self.active if name not in self.merged]
        if not running:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        for name in running:
            delta_weight, delta_bias = self.delta(name)
            weight = weight + delta_weight.to(weight.dtype)
            if bias is not None:
                bias = bias + delta_bias.to(bias.dtype)
        return F.linear(x, weight, bias)


def add_subspace(
    model: nn.Module, config: SubspaceConfig, *, name: str = "default", data=None, initialize: bool = True
) -> nn.Module:
    """Reparameterise every targeted ``nn.Linear`` of ``model`` in one shared random subspace (adapter
    ``name``); freeze everything else, so exactly ``config.dim`` numbers train.

    ``theta_d`` starts at zero, so a fresh adapter leaves the outputs unchanged. ``data`` and ``initialize``
    are accepted for the common signature: the initialisation needs no data and is already cheap.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing, SAID with ``dim`` not above the number of adapted
            tensors, or an adapter name already used.
    """
    layers = list(wrap_targets(model, config.targets, SubspaceLinear).values())
    if not layers:
        raise WeightkitError(f"subspace: targets {config.targets} select no nn.Linear module")
    if any(name in layer.adapter_names() for layer in layers):
        raise WeightkitError(f"subspace: the targeted layers already have an adapter named {name!r}")
    num_tensors = sum(layer.num_tensors() for layer in layers)
    size = config.dim - num_tensors if config.said else config.dim
    if size < 1:
        raise WeightkitError(
            f"subspace: said=True spends one of the dim={config.dim} numbers on each of the {num_tensors} "
            f"adapted tensors, leaving none for theta_d; use dim > {num_tensors} or fewer targets"
        )
    home = layers[0]
    weight = home.base_layer.weight
    home.subspace_theta[name] = nn.Parameter(torch.zeros(size, device=weight.device, dtype=weight.dtype))
    generator = torch.Generator().manual_seed(config.seed)
    for layer in layers:
        layer.add_adapter(name, home.subspace_theta, said=config.said, generator=generator)
    return finish_adapter(model, name, config)


# DID and SAID are one method; the presets name the papers' two variants.
register("adapt", "did", SubspaceConfig, add_subspace, preset={"said": False})
register("adapt", "said", SubspaceConfig, add_subspace, preset={"said": True})
