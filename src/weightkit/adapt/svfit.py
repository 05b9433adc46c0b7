"""SVFit: train only the top-r singular values of each frozen weight.

Paper: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular
Values", arXiv 2409.05926. Each weight is split by its SVD ``W = U S V^T`` into the best rank-r part
``W_r = U_r S_r V_r^T`` and the rest ``W_e = W - W_r``; ``W_e``, ``U_r`` and ``V_r`` stay frozen and the r
singular values ``S_r`` are trained, so each layer trains r numbers (the paper picks r so that the top-r
singular values hold most of the matrix's energy). The paper has no scaling factor; neither do we.

Deliberate deviation in form, not in function: we keep ``W`` itself as the frozen base and train
``delta_s`` (initialised to 0), computing ``W + U_r diag(delta_s) V_r^T``. That is the paper's
``W_e + U_r diag(S_r + delta_s) V_r^T`` exactly (same outputs, same gradients, since ``d/d delta_s =
d/d S_r``), but the base weight is left untouched, so several named adapters share one base, a fresh
adapter changes no output bit (no rounding from rebuilding ``W`` out of its SVD), and the saved adapter is
applied to the ordinary base model. One difference shows only with weight decay: it pulls ``delta_s``
towards 0 (back to the pre-trained singular values), where decaying ``S_r`` itself would pull the
principal singular values towards 0. (We could not read the paper's full text from here; the
parametrisation above is its abstract's and its published summary's: "trains only the top-r singular
values in W_r while freezing W_e and the associated subspaces".)

The layer's tensors: ``svfit_U.<name>`` (out x r left singular vectors) and ``svfit_Vh.<name>`` (r x in,
right singular vectors as rows) are persistent buffers, saved with the adapter so it does not depend on
an SVD's sign choices on another machine; ``svfit_delta.<name>`` (r) is the trained parameter. On a
16-bit layer all three are float32 unless ``autocast_adapter_dtype=False`` (PEFT's adapter precision).
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.adapt.layer import (
    AdapterModule,
    BufferDict,
    adapter_dtype,
    finish_adapter,
    merge_deltas,
    unmerge_deltas,
    weight_matrix,
    wrap_targets,
)
from weightkit.errors import WeightkitError, require_finite
from weightkit.registry import register

__all__ = ["SVFitConfig", "SVFitLinear", "add_svfit", "top_singular_vectors", "svfit_delta_weight"]


@dataclass
class SVFitConfig:
    """Which layers get SVFit adapters and how many singular values each trains.

    Attributes:
        rank: ``r``, how many of each weight's largest singular values are trained (>= 1, at most the
            layer's smaller side). A layer trains exactly ``r`` numbers, so ranks far above LoRA's are cheap.
        targets: which ``nn.Linear`` (or GPT-2 ``Conv1D``) modules get an adapter: exact module names or
            ``re:`` patterns matched against the full name (default: the attention query and value
            projections of Llama-style and BERT-style models).
    """

    rank: int = 8
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise WeightkitError(f"svfit: rank must be an integer >= 1, got {self.rank!r}")
        if not self.targets:
            raise WeightkitError("svfit: targets is empty; name the modules to adapt")


def top_singular_vectors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The ``rank`` leading singular vectors of ``weight`` (out x in): ``(U_r, Vh_r)``.

    ``U_r`` is out x rank, ``Vh_r`` is rank x in (right singular vectors as rows), so that
    ``weight ~ U_r @ diag(S_r) @ Vh_r``. Computed and returned in float32 (full SVD, deterministic), on
    ``weight``'s device.
    """
    U, _, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return U[:, :rank], Vh[:rank]


def svfit_delta_weight(U_r: Tensor, delta_s: Tensor, Vh_r: Tensor) -> Tensor:
    """The weight change ``U_r @ diag(delta_s) @ Vh_r`` of changing the top singular values by ``delta_s``."""
    return (U_r * delta_s) @ Vh_r


class SVFitLinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) plus named SVFit adapters (trained changes of its top
    singular values)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.svfit_U = BufferDict()
        self.svfit_Vh = BufferDict()
        self.svfit_delta = nn.ParameterDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.svfit_delta)

    def add_adapter(
        self, name: str, config: SVFitConfig, *, initialize: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        """Add adapter ``name``: the base weight's top-``rank`` singular vectors (zeros when not
        ``initialize``: they are about to be loaded) and ``delta_s = 0``, in ``dtype`` (default: the
        weight's)."""
        weight = weight_matrix(self.base_layer)  # out x in (a Conv1D's weight transposed, a view)
        out_features, in_features = weight.shape
        if config.rank > min(out_features, in_features):
            raise WeightkitError(
                f"svfit: rank {config.rank} is larger than a {out_features}x{in_features} layer allows"
            )
        if name in self.svfit_delta:
            raise WeightkitError(f"svfit: this layer already has an adapter named {name!r}")
        if self.merged:
            # The singular vectors must be the base weight's, not those of the base plus merged updates.
            raise WeightkitError("svfit: unmerge this layer's adapters before adding another")
        dtype = dtype or weight.dtype
        if initialize:
            U_r, Vh_r = top_singular_vectors(weight, config.rank)
        else:
            U_r = weight.new_zeros(out_features, config.rank)
            Vh_r = weight.new_zeros(config.rank, in_features)
        self.svfit_U[name] = U_r.to(dtype)
        self.svfit_Vh[name] = Vh_r.to(dtype)
        self.svfit_delta[name] = nn.Parameter(weight.new_zeros(config.rank, dtype=dtype))
        self.active.append(name)

    def delta_weight(self, name: str) -> Tensor:
        """The update ``U_r diag(delta_s) V_r^T`` adapter ``name`` adds to the base weight."""
        return svfit_delta_weight(self.svfit_U[name], self.svfit_delta[name], self.svfit_Vh[name])

    def merge(self) -> None:
        """Add the active adapters' updates into the base weight (inference without extra matmuls)."""
        merge_deltas(self)

    def unmerge(self) -> None:
        """Subtract every merged update again, restoring the base weight (up to float rounding)."""
        unmerge_deltas(self)

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base_layer(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            # Through the r-dimensional coordinates (x V_r) rather than a materialised out x in update.
            coords = x.to(self.svfit_Vh[name].dtype) @ self.svfit_Vh[name].T
            out = out + (coords * self.svfit_delta[name]) @ self.svfit_U[name].T
        return out.to(base_out.dtype)  # summed in the adapter's dtype, rounded once


def add_svfit(
    model: nn.Module, config: SVFitConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear`` and ``Conv1D`` of ``model`` an SVFit adapter ``name``; freeze the
    rest.

    Args:
        model: any ``torch.nn.Module``.
        config: rank and targets.
        name: the adapter's name; calling again with another name adds a second adapter to the same layers.
        data: unused (SVFit's initialisation needs only the weights).
        initialize: compute the SVDs; ``False`` builds zero buffers of the right shapes, to be loaded.
        autocast_adapter_dtype: float32 adapter tensors on 16-bit layers (PEFT's default); ``False`` keeps
            each layer's dtype.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a rank too large for a layer,
            an adapter name already used, or a weight holding NaN/Inf.
    """
    for module_name, layer in wrap_targets(model, config.targets, SVFitLinear).items():
        if initialize:
            require_finite(layer.base_layer.weight, f"{module_name}.weight")
        dtype = adapter_dtype(layer.base_layer.weight.dtype, autocast_adapter_dtype)
        layer.add_adapter(name, config, initialize=initialize, dtype=dtype)
    return finish_adapter(model, name, config)


register("adapt", "svfit", SVFitConfig, add_svfit)
