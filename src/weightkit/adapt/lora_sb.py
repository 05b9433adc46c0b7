"""LoRA-SB and LoRA-XS: train only an r x r matrix ``R`` between two frozen projections, ``W + B R A``.

Papers:

- LoRA-XS: Bałazy, Banaei, Aberer, Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
  Parameters", arXiv 2405.17604. ``B`` and ``A`` come from the truncated SVD of the pre-trained weight
  ``W ~ U_r S_r V_r^T``: ``B = U_r`` (out x r), ``A = S_r V_r^T`` (r x in; the paper's ``A = U_r S_r`` in
  its ``x W`` convention), and only ``R`` is trained (``init="svd"``, registered as ``"lora_xs"``).
- LoRA-SB: Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization using Update
  Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557. Same
  architecture, but ``B``, ``R``, ``A`` come from the truncated SVD of an estimate of the *first full
  fine-tuning update* ``dW``: ``B = U_r``, ``R = S_r``, ``A = V_r^T`` (``init="gradient"``, the default,
  registered as ``"lora_sb"``). With orthonormal ``B`` and ``A``, a step on ``R`` moves ``W`` by
  ``B B^T g A^T A``: the full fine-tuning gradient ``g`` projected onto the subspaces of the first update,
  so training stays close to full fine-tuning with r*r parameters per layer and no scaling factor.

How the LoRA-SB update is estimated (as in the authors' code): the gradient ``G`` of the loss with respect
to each targeted weight is averaged over up to ``calib_batches`` batches of ``data``, and the first step of
the optimizer the paper trains with (Adam) is applied to it: ``dW = -init_lr * sign(G)`` -- Adam's first,
bias-corrected step ``-lr * m / sqrt(v) = -lr * G / |G|`` (``first_step="sgd"`` gives ``-init_lr * G``).
The initial ``B R A`` is *added* to the frozen weight, as the authors do: the adapted model starts at the
best rank-r approximation of that first step, not at the pre-trained model.

The step size ``init_lr`` is the training run's first learning rate, and the gradient comes from training
examples only. What we verified in the authors' released code (github.com/RaghavSinghal10/lora-sb,
``train_glue.py``, ``train_cr.py``, ``utils/gradient_utils.py``): the gradient is estimated on the training
loader (2 examples for GLUE, 170 for commonsense reasoning), the step is ``-eff_lr * sign(sum of
gradients)`` with ``eff_lr = lr / (warmup_ratio * total_steps)``, i.e. the learning rate divided by the
number of warm-up steps: the first non-zero rate of the linear warm-up (``get_linear_schedule_with_warmup``
starts at 0) that the run then trains with. :func:`weightkit.adapt.finetune` applies the same rule to its own
schedule, whose first step already runs at ``lr / (warmup_steps + 1)`` (``lr`` without warm-up).

Deliberate deviations:

- We could not read the LoRA-SB paper's method section from here (only its abstract); the update formula
  above, the step size, ``R = S_r`` and the choice to start from the approximated step are taken from the
  authors' public code (``lora-sb``'s training scripts and gradient utilities, and the initialisation of
  the same authors' Fed-SB code).
- No scaling factor: the update is ``B R A`` (scale 1). LoRA-SB is scale-free by design (the authors set
  ``alpha = r``); LoRA-XS's ``alpha / r`` only rescales ``R`` (equivalently its learning rate).
- LoRA-XS starts from ``R = 0`` (its code draws ``R`` from N(0, 1e-5^2)): outputs are exactly unchanged
  and the gradient ``B^T g A^T`` of ``R`` is not zero, so training starts as usual. Nothing is random.
- Exact SVDs (``torch.linalg.svd`` in float32) instead of the authors' randomised SVD: deterministic.
- No adapter dropout. The calibration batches run in the model's current mode (train/eval), which the
  caller chooses; Hugging Face models load in eval mode (deterministic).

The layer's tensors: ``lora_A.<name>`` (r x in) and ``lora_B.<name>`` (out x r) are persistent buffers
(saved with the adapter, so loading needs neither the data nor an SVD); ``lora_R.<name>`` (r x r) is the
one trained parameter. On a 16-bit layer all three are float32 unless ``autocast_adapter_dtype=False``
(PEFT's adapter precision). ``B R A`` is an ordinary rank-r update, so :func:`to_lora_factors` turns it into
plain LoRA factors (``lora_A = R A``, ``lora_B = B``, ``lora_alpha = r``) for PEFT or vLLM.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.adapt.layer import (
    AdapterModule,
    BufferDict,
    adapter_dtype,
    as_out_in,
    batch_loss,
    finish_adapter,
    merge_deltas,
    unmerge_deltas,
    weight_matrix,
    wrap_targets,
)
from weightkit.errors import WeightkitError, require_finite
from weightkit.registry import register

__all__ = [
    "LoRASBConfig",
    "LoRASBLinear",
    "add_lora_sb",
    "svd_init",
    "first_step_update",
    "update_init",
    "mean_gradients",
    "to_lora_factors",
]

_INITS = ("gradient", "svd")
_FIRST_STEPS = ("adam", "sgd")


@dataclass
class LoRASBConfig:
    """Where the ``W + B R A`` adapters go and how ``B``, ``R``, ``A`` start (only ``R`` trains).

    Attributes:
        rank: ``r``: ``B`` is out x r, ``R`` r x r, ``A`` r x in; each layer trains ``r * r`` numbers
            (>= 1, at most the layer's smaller side). The papers use ranks far above LoRA's (e.g. 64-96)
            because the cost grows with ``r^2`` only.
        init: ``"gradient"`` (LoRA-SB): ``B R A`` = the best rank-r approximation of an estimated first full
            fine-tuning step, added to the weights (needs ``data``). ``"svd"`` (LoRA-XS): ``B``, ``A`` from
            the truncated SVD of each weight and ``R = 0`` (outputs unchanged; no data needed).
        first_step: (``"gradient"`` only) the full fine-tuning step being approximated: ``"adam"``,
            Adam's first step ``-init_lr * sign(G)`` (the paper trains with AdamW), or ``"sgd"``,
            ``-init_lr * G``, where ``G`` is the loss gradient averaged over the calibration batches.
        init_lr: (``"gradient"`` only) the learning rate of that simulated step: the learning rate of the
            training run's first step, after warm-up scaling (the authors' scripts pass
            ``lr / warm-up steps``). It sets how far the model moves at initialisation; it does not change
            the gradients ``R`` gets later. ``None``: ``weightkit adapt`` (:func:`weightkit.adapt.finetune`)
            derives it from the run's ``--lr`` and ``--warmup-steps``; calling :func:`adapt` directly with
            ``init="gradient"`` needs a number.
        calib_batches: (``"gradient"`` only) at most this many batches of ``data`` are used to estimate
            ``G`` (the authors use about 50 examples).
        targets: which ``nn.Linear`` (or GPT-2 ``Conv1D``) modules get an adapter: exact module names or
            ``re:`` patterns matched against the full name (default: the attention query and value
            projections of Llama-style and BERT-style models).
    """

    rank: int = 8
    init: str = "gradient"
    first_step: str = "adam"
    init_lr: float | None = None
    calib_batches: int = 16
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise WeightkitError(f"lora_sb: rank must be an integer >= 1, got {self.rank!r}")
        if self.init not in _INITS:
            raise WeightkitError(f"lora_sb: init must be one of {', '.join(_INITS)}, got {self.init!r}")
        if self.first_step not in _FIRST_STEPS:
            raise WeightkitError(
                f"lora_sb: first_step must be one of {', '.join(_FIRST_STEPS)}, got {self.first_step!r}"
            )
        if self.init_lr is not None and (
            isinstance(self.init_lr, bool)
            or not isinstance(self.init_lr, int | float)
            or not 0 < self.init_lr < math.inf
        ):
            raise WeightkitError(f"lora_sb: init_lr must be a finite number > 0, got {self.init_lr!r}")
        if (
            isinstance(self.calib_batches, bool)
            or not isinstance(self.calib_batches, int)
            or self.calib_batches < 1
        ):
            raise WeightkitError(
                f"lora_sb: calib_batches must be an integer >= 1, got {self.calib_batches!r}"
            )
        if not self.targets:
            raise WeightkitError("lora_sb: targets is empty; name the modules to adapt")


def svd_init(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """LoRA-XS's frozen factors of ``weight`` (out x in): ``(B, A) = (U_r, S_r V_r^T)``.

    ``B`` (out x rank) has orthonormal columns and ``B @ A`` is the best rank-``rank`` approximation of
    ``weight``. Computed in float32 (exact SVD) and returned in float32, on ``weight``'s device.
    """
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return U[:, :rank], S[:rank, None] * Vh[:rank]


def first_step_update(grad: Tensor, *, lr: float, first_step: str) -> Tensor:
    """The first full fine-tuning step on a weight whose loss gradient is ``grad``.

    ``"sgd"``: ``-lr * grad``. ``"adam"``: ``-lr * sign(grad)``, Adam's first step (bias-corrected moments
    ``m = grad``, ``v = grad^2``) without its ``eps``.
    """
    if first_step == "adam":
        return -lr * torch.sign(grad)
    if first_step == "sgd":
        return -lr * grad
    raise WeightkitError(f"lora_sb: first_step must be one of {', '.join(_FIRST_STEPS)}, got {first_step!r}")


def update_init(update: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA-SB's factors of a full update ``update`` (out x in): ``(B, R, A) = (U_r, diag(S_r), V_r^T)``.

    ``B R A`` is the best rank-``rank`` approximation of ``update``; ``B`` and ``A^T`` have orthonormal
    columns. Computed in float32 (exact SVD) and returned in float32.
    """
    U, S, Vh = torch.linalg.svd(update.detach().to(torch.float32), full_matrices=False)
    return U[:, :rank], torch.diag(S[:rank]), Vh[:rank]


def mean_gradients(
    model: nn.Module, weights: dict[str, Tensor], data: Iterable, max_batches: int
) -> dict[str, Tensor]:
    """The loss gradient of each of ``weights`` averaged over up to ``max_batches`` batches of ``data``.

    Only ``weights`` get gradients (every other parameter is frozen for the passes); ``requires_grad`` of
    every parameter is restored afterwards and no ``.grad`` is written. Gradients are float32.

    Raises:
        WeightkitError: ``data`` gives no batches, or batches with no loss (see ``batch_loss``).
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    count = 0
    try:
        for param in params:
            param.requires_grad_(False)
        for weight in weights.values():
            weight.requires_grad_(True)
        with torch.enable_grad():
            for batch in islice(data, max_batches):
                loss = batch_loss(model, batch)
                # autograd.grad instead of backward(): nothing is accumulated into .grad.
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for total, grad in zip(sums.values(), grads, strict=True):
                    if grad is not None:  # a weight this loss does not depend on has gradient 0
                        total += grad.to(torch.float32)
                count += 1
    finally:
        for param, flag in zip(params, flags, strict=True):
            param.requires_grad_(flag)
    if count == 0:
        raise WeightkitError("lora_sb: data gave no batches; the gradient initialisation needs some")
    return {n: total / count for n, total in sums.items()}


class LoRASBLinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) plus named ``B R A`` adapters (frozen ``B``, ``A``;
    trained ``R``)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = BufferDict()
        self.lora_B = BufferDict()
        self.lora_R = nn.ParameterDict()
        self.active: list[str] = []
        self.merged: list[str] = []

    def adapter_names(self) -> list[str]:
        return list(self.lora_R)

    def add_adapter(
        self, name: str, B: Tensor, R: Tensor, A: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        """Add adapter ``name`` with factors ``B`` (out x r), ``R`` (r x r, trained) and ``A`` (r x in),
        stored in ``dtype`` (default: the base weight's) on the base weight's device."""
        weight = self.base_layer.weight
        out_features, in_features = weight_matrix(self.base_layer).shape
        rank = R.shape[0]
        if B.shape != (out_features, rank) or R.shape != (rank, rank) or A.shape != (rank, in_features):
            raise WeightkitError(
                f"lora_sb: factors of shapes B {tuple(B.shape)}, R {tuple(R.shape)}, A {tuple(A.shape)} do "
                f"not fit a {out_features}x{in_features} layer"
            )
        # Contiguous copies: SVD factors come column-major, which would make the same adapter
        # compute differently (last-bit rounding) before and after a save/load round trip.
        kwargs = {"dtype": dtype or weight.dtype, "device": weight.device}
        self.lora_B[name] = B.detach().to(**kwargs).contiguous()
        self.lora_A[name] = A.detach().to(**kwargs).contiguous()
        self.lora_R[name] = nn.Parameter(R.detach().to(**kwargs).contiguous())
        self.active.append(name)

    def delta_weight(self, name: str) -> Tensor:
        """The update ``B @ R @ A`` adapter ``name`` adds to the base weight."""
        return self.lora_B[name] @ self.lora_R[name] @ self.lora_A[name]

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
            # x -> A x -> R A x -> B R A x through r-dimensional coordinates, never an out x in matrix.
            coords = F.linear(x.to(self.lora_A[name].dtype), self.lora_A[name])
            out = out + F.linear(F.linear(coords, self.lora_R[name]), self.lora_B[name])
        return out.to(base_out.dtype)  # summed in the adapter's dtype, rounded once


def to_lora_factors(layer: LoRASBLinear, name: str) -> tuple[Tensor, Tensor]:
    """Adapter ``name`` of ``layer`` as plain LoRA factors ``(lora_A, lora_B) = (R A, B)``.

    ``lora_B @ lora_A`` is exactly the layer's update ``B R A``, so a PEFT LoRA with ``r = rank`` and
    ``lora_alpha = rank`` (scale 1) reproduces the adapter.
    """
    return (layer.lora_R[name] @ layer.lora_A[name]).detach(), layer.lora_B[name].detach()


def add_lora_sb(
    model: nn.Module, config: LoRASBConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear`` and ``Conv1D`` of ``model`` a LoRA-SB / LoRA-XS adapter ``name``;
    freeze the rest.

    Args:
        model: any ``torch.nn.Module`` (for ``init="gradient"``: one :func:`weightkit.adapt.layer.batch_loss`
            gets a loss from, e.g. a Hugging Face model given batches with ``labels``).
        config: rank, initialisation and targets.
        name: the adapter's name; calling again with another name adds a second adapter to the same layers.
        data: (``init="gradient"``) an iterable of batches; the first ``config.calib_batches`` are used.
        initialize: compute the initialisation; ``False`` builds zero tensors of the right shapes (to be
            loaded from a saved adapter) and needs no data.
        autocast_adapter_dtype: ``B``, ``R``, ``A`` in float32 on 16-bit layers (PEFT's default); ``False``
            keeps each layer's dtype.

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a rank too large for a layer, an
            adapter name already used, a layer with merged adapters, ``init="gradient"`` without data, or
            a weight or gradient holding NaN/Inf.
    """
    if initialize and config.init == "gradient" and data is None:
        raise WeightkitError(
            "lora_sb: init='gradient' needs data: batches the model computes a loss for (Hugging Face "
            "models: dicts with input_ids and labels); or use init='svd' (LoRA-XS), which needs none"
        )
    if initialize and config.init == "gradient" and config.init_lr is None:
        raise WeightkitError(
            "lora_sb: init='gradient' needs init_lr, the learning rate of your training run's first step "
            "(after warm-up scaling); weightkit adapt sets it from --lr and --warmup-steps"
        )
    layers = wrap_targets(model, config.targets, LoRASBLinear)
    for module_name, layer in layers.items():
        out_features, in_features = weight_matrix(layer.base_layer).shape
        if config.rank > min(out_features, in_features):
            raise WeightkitError(
                f"lora_sb: rank {config.rank} is larger than {module_name} "
                f"({out_features}x{in_features}) allows"
            )
        if name in layer.adapter_names():
            raise WeightkitError(f"lora_sb: {module_name} already has an adapter named {name!r}")
        if layer.merged:
            # The factors must come from the base weight, not from the base plus merged updates.
            raise WeightkitError(f"lora_sb: unmerge {module_name}'s adapters before adding another")

    rank = config.rank
    if initialize and config.init == "gradient":
        weights = {n: layer.base_layer.weight for n, layer in layers.items()}
        grads = mean_gradients(model, weights, data, config.calib_batches)
    for module_name, layer in layers.items():
        weight = weight_matrix(layer.base_layer)  # out x in (a Conv1D's weight transposed, a view)
        out_features, in_features = weight.shape
        R = weight.new_zeros(rank, rank)
        if not initialize:
            B, A = weight.new_zeros(out_features, rank), weight.new_zeros(rank, in_features)
        elif config.init == "svd":
            require_finite(weight, f"{module_name}.weight")
            B, A = svd_init(weight, rank)
        else:
            grad = as_out_in(layer.base_layer, grads[module_name])  # shaped like the weight -> out x in
            require_finite(grad, f"the loss gradient of {module_name}.weight")
            update = first_step_update(grad, lr=config.init_lr, first_step=config.first_step)
            B, R, A = update_init(update, rank)
        layer.add_adapter(name, B, R, A, dtype=adapter_dtype(weight.dtype, autocast_adapter_dtype))
    return finish_adapter(model, name, config)


register("adapt", "lora_sb", LoRASBConfig, add_lora_sb, preset={"init": "gradient"})
register("adapt", "lora_xs", LoRASBConfig, add_lora_sb, preset={"init": "svd"})
