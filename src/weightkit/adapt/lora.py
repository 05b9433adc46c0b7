"""LoRA: train a low-rank update ``W + (alpha / r) * B @ A`` of frozen linear, embedding and conv layers.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685. rsLoRA's
scaling ``alpha / sqrt(r)`` (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA", arXiv 2312.03732) is the ``rslora`` option.

Initialisation as in the paper (and PEFT's default): ``A`` Kaiming-uniform, ``B`` zero, so a fresh adapter
leaves the model's outputs unchanged. The wrapped layer keeps PEFT's module names (``base_layer``,
``lora_A.<adapter>``, ``lora_B.<adapter>``), so a model adapted here has PEFT's state-dict keys and the
adapter files round-trip with PEFT unchanged (see :mod:`weightkit.adapt.peft_format`).

Embeddings and 2-D convolutions get LoRA as PEFT defines it (:class:`LoRAEmbedding`, :class:`LoRAConv2d`;
the paper treats dense layers only): the embedding's ``A`` starts at zero and ``B`` normal, and it has no
dropout; the convolution's ``A`` is a convolution with the base layer's kernel, ``B`` a 1x1 convolution.
GPT-2's ``Conv1D`` (transformers' linear layer that stores its weight ``in x out``) is a linear layer here,
as in PEFT (``fan_in_fan_out``): the same factors, the update transposed into the weight.
DoRA works on all of them. PiSSA and EVA initialise linear layers (``nn.Linear``, ``Conv1D``) only.
Grouped, dilated or non-zero-padded convolutions and embeddings with ``max_norm`` are refused: PEFT's layout
cannot merge their updates exactly.

A :class:`~weightkit.quantized.linear.QuantizedLinear` (a layer of a quantized checkpoint) is a linear layer
too, as PEFT's quantized layers are (QLoRA): the adapter's forward adds to the quantized layer's output, the
integer weight never changes, and the adapter, saved under the same module names, applies to the
full-precision model as well. DoRA reads the dequantized weight (as PEFT's DoRA over quantized layers does).
PiSSA and OLoRA, which leave the base a residual, are refused on it, and so is EVA (:mod:`weightkit.adapt.eva`
reads dense layers only); so is merging into it, which would have to quantize the merged weight again.

On a float16/bfloat16 layer the factors (and DoRA's magnitudes) are float32 unless
``autocast_adapter_dtype=False`` (:func:`weightkit.adapt.layer.adapter_dtype`, PEFT's default); the forward
runs the adapter in its dtype and rounds the sum to the base output's dtype once, as PEFT's does.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.adapt.dora import dora_extra_output, dora_scale, merged_weight, row_norms, unmerged_weight
from weightkit.adapt.eva import eva_components
from weightkit.adapt.layer import (
    LINEAR_TYPES,
    AdapterModule,
    adapter_dtype,
    adapter_layers,
    as_out_in,
    fan_in_fan_out,
    finish_adapter,
    wrap_targets,
)
from weightkit.adapt.olora import orthonormal_factors
from weightkit.adapt.pissa import principal_factors
from weightkit.errors import WeightkitError
from weightkit.quantized.linear import QuantizedLinear
from weightkit.registry import register
from weightkit.select import select_modules, suffix_pattern_value

__all__ = ["LoRAConfig", "LoRALinear", "LoRAEmbedding", "LoRAConv2d", "LORA_LAYERS", "add_lora"]


@dataclass
class LoRAConfig:
    """Where and how large the low-rank updates are.

    Attributes:
        rank: ``r``, the rank of each update (>= 1, at most the layer's smaller side).
        alpha: the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter's input during training (not on embeddings: token ids).
        targets: which ``nn.Linear``, ``Conv1D`` (GPT-2's), ``nn.Embedding`` and ``nn.Conv2d`` modules get an
            adapter: exact module names or ``re:`` patterns matched against the full name (default: the
            attention query and value projections of Llama-style and BERT-style models; GPT-2's fused
            query-key-value projection is ``c_attn``).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        dora: DoRA (:mod:`weightkit.adapt.dora`): also learn each output feature's magnitude.
        init: how ``A`` and ``B`` start. ``"kaiming"``: ``A`` Kaiming-uniform, ``B`` zero (the paper's and
            PEFT's default; outputs unchanged). ``"pissa"``: the principal singular vectors of the weight,
            the base weight keeps the residual (:mod:`weightkit.adapt.pissa`; outputs unchanged).
            ``"olora"``: likewise from the weight's QR decomposition (:mod:`weightkit.adapt.olora`).
            ``"eva"``: ``A`` spans the top principal directions of each layer's inputs on ``data``, ranks
            redistributed by explained variance under the budget ``rank * layers``
            (:mod:`weightkit.adapt.eva`; ``B`` zero); needs calibration batches.
        rank_pattern: per-module ranks overriding ``rank``, keyed as PEFT's: a key is a regular expression
            matched against the end of the module's name at a dot boundary (``"q_proj"``,
            ``"layers.0.mlp.up_proj"``; ``"0"`` matches ``layers.2.0`` but not ``layers.20``), the first
            matching key wins; a ``re:`` key fully matches the name. A key that matches no adapted module is
            an error.
        alpha_pattern: per-module alphas overriding ``alpha``, keyed alike.
        eva_rho: EVA: a layer may get up to ``round(eva_rho * rank)`` (1 keeps every rank uniform).
        eva_tau: EVA: stop reading a layer's inputs once its components' cosine to the previous batch's
            reaches this.
        lora_bias: PEFT's ``lora_bias``: ``lora_B`` also has a bias (starting at zero), scaled with the
            update; merging adds it to the base layer's bias. Not with DoRA, PiSSA/EVA or on embeddings (as
            in PEFT).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    eva_rho: float = 2.0
    eva_tau: float = 0.99
    lora_bias: bool = False

    def __post_init__(self):
        for where, rank in [("rank", self.rank), *(("rank_pattern", r) for r in self.rank_pattern.values())]:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise WeightkitError(f"lora: {where} ranks must be integers >= 1, got {rank!r}")
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise WeightkitError("lora: targets is empty; name the modules to adapt")
        if self.init not in INITS:
            raise WeightkitError(f"lora: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.lora_bias and (self.dora or self.init != "kaiming"):
            raise WeightkitError(
                "lora: lora_bias works with plain LoRA only (not DoRA, PiSSA or EVA), as in PEFT"
            )
        if not self.eva_rho >= 1 or not 0 <= self.eva_tau <= 1:
            raise WeightkitError(
                f"lora: eva_rho must be >= 1 and eva_tau in [0, 1], got {self.eva_rho}, {self.eva_tau}"
            )

    def rank_for(self, module_name: str) -> int:
        rank = suffix_pattern_value(module_name, self.rank_pattern)
        return self.rank if rank is None else rank

    def alpha_for(self, module_name: str) -> float:
        alpha = suffix_pattern_value(module_name, self.alpha_pattern)
        return self.alpha if alpha is None else alpha

    def scaling_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(rank) if self.rslora else rank)


INITS = ("kaiming", "pissa", "olora", "eva")
# Initialisations that move part of the weight into the adapter; the base keeps the residual.
_RESIDUAL_INITS = {"pissa": principal_factors, "olora": orthonormal_factors}


class LoRALinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``) plus named low-rank adapters, summed when active.

    On a ``Conv1D``, which stores ``W`` transposed (``in x out``; PEFT's ``fan_in_fan_out``), the factors
    have the ``nn.Linear`` shapes all the same (``A``: ``r x in``, ``B``: ``out x r``), DoRA's magnitudes are
    per output feature, and the update merges transposed: PEFT's layout, so the files are the same.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        # DoRA's per-output-feature magnitudes; PEFT saves them as "<module>.lora_magnitude_vector".
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_norms: dict[str, Tensor] = {}  # DoRA row norms at merge time, to unmerge exactly
        # PiSSA's/OLoRA's initial (A, B): saving expresses the update against the original base weight.
        self.pissa_initial: dict[str, tuple[Tensor, Tensor]] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def as_matrix(self, tensor: Tensor) -> Tensor:
        """A weight-shaped tensor as the ``out x in`` matrix DoRA normalises row by row (a view)."""
        return as_out_in(self.base_layer, tensor)

    def add_adapter(
        self, name: str, *, rank: int, scaling: float, dropout: float = 0.0, dora: bool = False,
        init: str = "kaiming", dtype: torch.dtype | None = None, lora_bias: bool = False,
    ) -> None:  # fmt: skip
        """Add adapter ``name`` (active), its tensors in ``dtype`` (default: the base weight's).
        ``init="pissa"``/``"olora"`` also replace the base weight by its residual; ``lora_bias`` gives
        ``lora_B`` a bias."""
        _check_new_adapter(self, name)
        weight = _base_weight(self)
        out_features, in_features = self.as_matrix(weight).shape
        kwargs = {"bias": False, "device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_A[name] = nn.Linear(in_features, rank, **kwargs)
        self.lora_B[name] = nn.Linear(rank, out_features, **{**kwargs, "bias": lora_bias})
        with torch.no_grad():
            if init in _RESIDUAL_INITS:
                a, b, residual = _RESIDUAL_INITS[init](self.as_matrix(weight), rank, scaling)
                self.lora_A[name].weight.copy_(a)
                self.lora_B[name].weight.copy_(b)
                self.as_matrix(weight).copy_(residual)
                self.pissa_initial[name] = (
                    self.lora_A[name].weight.clone(),
                    self.lora_B[name].weight.clone(),
                )
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[name].weight)
                if lora_bias:
                    nn.init.zeros_(self.lora_B[name].bias)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling[name] = scaling
        if dora:
            self.lora_magnitude_vector[name] = _initial_magnitude(self, name)
        self.active.append(name)

    def _lora_delta(self, name: str) -> Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if fan_in_fan_out(self.base_layer) else delta  # shaped like the weight

    def delta_weight(self, name: str) -> Tensor:
        """The update adapter ``name`` adds to the current base weight (DoRA's depends on that weight)."""
        return _delta_weight(self, name)

    def merge(self) -> None:
        """Fold the active adapters into the base weight (inference without extra matmuls)."""
        _merge(self)

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base weight (up to float rounding)."""
        _unmerge(self)

    def forward(self, x: Tensor) -> Tensor:
        base_out = self.base_layer(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            lora_x = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            hidden = lora_A(lora_x)
            if name in self.lora_magnitude_vector:
                out = out + self._dora_output(name, lora_x, out, lora_B(hidden) * self.scaling[name])
            elif out.dim() > 1:
                # out + scaling * hidden B^T as one GEMM (in the wider of the two dtypes, as PEFT's sum is):
                # no separate passes over the output to scale and add.
                dtype = torch.promote_types(out.dtype, hidden.dtype)
                rows, hidden = out.reshape(-1, out.shape[-1]).to(dtype), hidden.reshape(-1, hidden.shape[-1])
                out = torch.addmm(rows, hidden.to(dtype), lora_B.weight.T.to(dtype),
                                  alpha=self.scaling[name]).view(out.shape)  # fmt: skip
                if lora_B.bias is not None:
                    out = out + lora_B.bias * self.scaling[name]
            else:
                out = out + lora_B(hidden) * self.scaling[name]
        return out.to(base_out.dtype)  # one rounding to the base layer's dtype

    def _dora_output(self, name: str, lora_x: Tensor, result: Tensor, lora_out: Tensor) -> Tensor:
        weight, bias = _base_weight(self), self.base_layer.bias
        if _dora_rescales_result(self, name):
            plain = result if bias is None else result - bias
        else:  # DoRA scales the dropped-out input's base output, as the paper and PEFT do
            plain = nn.functional.linear(lora_x, self.as_matrix(weight).to(lora_x.dtype))
        magnitude = self.lora_magnitude_vector[name]
        return dora_extra_output(
            plain.to(lora_out.dtype), lora_out, magnitude, self.as_matrix(weight),
            self.as_matrix(self._lora_delta(name)),
        )  # fmt: skip


class LoRAEmbedding(AdapterModule):
    """A frozen ``nn.Embedding`` plus named low-rank adapters, summed when active (PEFT's ``lora.Embedding``).

    The ``num_embeddings x embedding_dim`` table gets the update ``scaling * (B A)^T``, where
    ``lora_embedding_A.<name>`` is ``A`` (``r x num_embeddings``) and ``lora_embedding_B.<name>`` is ``B``
    (``embedding_dim x r``): token ``t`` gains ``scaling * B A[:, t]``. ``A`` starts at zero and ``B``
    standard normal (the reverse of the linear layer, as in the paper's code and PEFT), so a fresh adapter
    changes nothing. There is no dropout: token ids cannot be dropped out (PEFT has none either). With DoRA
    the magnitudes are per embedding dimension: the table's columns are the rows of the linear map from
    one-hot tokens.
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        self.base_layer = base_layer
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_norms: dict[str, Tensor] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A)

    @staticmethod
    def as_matrix(tensor: Tensor) -> Tensor:
        """A table-shaped tensor as the ``embedding_dim x num_embeddings`` map of one-hot tokens (a view)."""
        return tensor.T

    def add_adapter(
        self, name: str, *, rank: int, scaling: float, dora: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        """Add adapter ``name`` (active), its tensors in ``dtype`` (default: the table's)."""
        _check_new_adapter(self, name)
        weight = self.base_layer.weight
        num_embeddings, embedding_dim = weight.shape
        kwargs = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(rank, num_embeddings, **kwargs))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(embedding_dim, rank, **kwargs))
        self.scaling[name] = scaling
        if dora:
            self.lora_magnitude_vector[name] = _initial_magnitude(self, name)
        self.active.append(name)

    def _lora_delta(self, name: str) -> Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        """The update adapter ``name`` adds to the current table (DoRA's depends on that table)."""
        return _delta_weight(self, name)

    def merge(self) -> None:
        """Fold the active adapters into the base table."""
        _merge(self)

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base table (up to float rounding)."""
        _unmerge(self)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        base_out = base(x)
        out = base_out
        # Scaled embeddings (Gemma's) multiply the rows they look up; scale the update's alike, as merged.
        embed_scale = getattr(base, "embed_scale", None)
        for name in self.active:
            if name in self.merged:
                continue
            rows = nn.functional.embedding(
                x, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
            )  # fmt: skip
            lora_out = rows @ self.lora_embedding_B[name].T * self.scaling[name]
            if embed_scale is not None:
                lora_out = lora_out * embed_scale
            if name in self.lora_magnitude_vector:
                lora_out = dora_extra_output(
                    out.to(lora_out.dtype), lora_out, self.lora_magnitude_vector[name],
                    self.as_matrix(base.weight), self.as_matrix(self._lora_delta(name)),
                )  # fmt: skip
            out = out + lora_out
        return out.to(base_out.dtype)


class LoRAConv2d(AdapterModule):
    """A frozen ``nn.Conv2d`` plus named low-rank adapters, summed when active (PEFT's ``lora.Conv2d``).

    ``lora_A.<name>`` is a convolution to ``r`` channels with the base layer's kernel size, stride and
    padding; ``lora_B.<name>`` a 1x1 convolution back to the output channels. Their composition is one
    convolution with kernel ``scaling * B A`` (``B`` as ``out x r``, ``A`` as ``r x (in * kh * kw)``), the
    update merged into the base kernel. Initialised like the linear layer (``A`` Kaiming-uniform, ``B``
    zero). With DoRA the magnitudes are per output channel (PEFT's shape ``1 x out x 1 x 1``).
    """

    def __init__(self, base_layer: nn.Conv2d):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._merged_norms: dict[str, Tensor] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    @staticmethod
    def as_matrix(tensor: Tensor) -> Tensor:
        """A kernel-shaped tensor as the ``out x (in * kh * kw)`` matrix (a view)."""
        return tensor.view(tensor.shape[0], -1)

    def add_adapter(
        self, name: str, *, rank: int, scaling: float, dropout: float = 0.0, dora: bool = False,
        dtype: torch.dtype | None = None, lora_bias: bool = False,
    ) -> None:  # fmt: skip
        """Add adapter ``name`` (active), its tensors in ``dtype`` (default: the kernel's); ``lora_bias``
        gives ``lora_B`` a bias."""
        _check_new_adapter(self, name)
        base = self.base_layer
        kwargs = {"bias": False, "device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, **kwargs
        )
        self.lora_B[name] = nn.Conv2d(rank, base.out_channels, 1, **{**kwargs, "bias": lora_bias})
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
            if lora_bias:
                nn.init.zeros_(self.lora_B[name].bias)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling[name] = scaling
        if dora:
            self.lora_magnitude_vector[name] = _initial_magnitude(self, name, shape=(1, -1, 1, 1))
        self.active.append(name)

    def _lora_delta(self, name: str) -> Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (self.as_matrix(b) @ self.as_matrix(a)).view_as(self.base_layer.weight) * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        """The update adapter ``name`` adds to the current kernel (DoRA's depends on that kernel)."""
        return _delta_weight(self, name)

    def merge(self) -> None:
        """Fold the active adapters into the base kernel."""
        _merge(self)

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base kernel (up to float rounding)."""
        _unmerge(self)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        base_out = base(x)
        out = base_out
        for name in self.active:
            if name in self.merged:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            lora_x = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            lora_out = lora_B(lora_A(lora_x)) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                if _dora_rescales_result(self, name):
                    plain = out if base.bias is None else out - base.bias[:, None, None]
                else:  # as LoRALinear: DoRA scales the dropped-out input's base output
                    plain = base._conv_forward(lora_x, base.weight.to(lora_x.dtype), None)
                # The channels (dim -3, batched or not) are DoRA's output features; put them last.
                lora_out = dora_extra_output(
                    plain.to(lora_out.dtype).movedim(-3, -1), lora_out.movedim(-3, -1),
                    self.lora_magnitude_vector[name].flatten(), self.as_matrix(base.weight),
                    self.as_matrix(self._lora_delta(name)),
                ).movedim(-1, -3)  # fmt: skip
            out = out + lora_out
        return out.to(base_out.dtype)


# What the LoRA layers share. A layer has ``base_layer``, ``active``, ``merged``, ``scaling``,
# ``lora_magnitude_vector``, ``_merged_norms``, ``_lora_delta(name)`` (weight-shaped, scaled) and
# ``as_matrix`` (the weight as the ``out x in`` matrix whose rows DoRA normalises).


def _base_weight(layer: nn.Module) -> Tensor:
    """The base layer's weight, to read: its own, or a ``QuantizedLinear``'s dequantized (a new tensor in the
    dtype of its scales; merges, which change the weight in place, refuse quantized layers)."""
    base = layer.base_layer
    return base.dequantized_weight() if isinstance(base, QuantizedLinear) else base.weight


def _dora_rescales_result(layer: nn.Module, name: str) -> bool:
    """Whether DoRA adapter ``name`` rescales the layer's output so far (base layer and the adapters before
    it), as PEFT's forward does without dropout or in eval mode; else (dropout while training) it rescales
    the base layer's output on the dropped-out input."""
    return isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training


def _check_new_adapter(layer: nn.Module, name: str) -> None:
    # A rank above the layer's smaller side is allowed, as in PEFT (a rank-8 adapter on a 3-class head):
    # wasteful but exact. PiSSA, which needs that many singular vectors, refuses it itself.
    if name in layer.adapter_names():
        raise WeightkitError(f"lora: this layer already has an adapter named {name!r}")


def _initial_magnitude(layer: nn.Module, name: str, shape: tuple[int, ...] = (-1,)) -> nn.Parameter:
    """DoRA's magnitudes at the start: the row norms of ``W + delta``, so the adapter starts as the base;
    in the dtype of the adapter's factors."""
    weight = _base_weight(layer)
    with torch.no_grad():
        delta = layer._lora_delta(name)
        norms = row_norms(layer.as_matrix(weight).float(), layer.as_matrix(delta).float())
    return nn.Parameter(norms.reshape(shape).to(delta.dtype))


def _delta_weight(layer: nn.Module, name: str) -> Tensor:
    delta = layer._lora_delta(name)
    if name not in layer.lora_magnitude_vector:
        return delta
    weight = _base_weight(layer)
    matrix, delta_matrix = layer.as_matrix(weight), layer.as_matrix(delta)
    scale = dora_scale(matrix, delta_matrix, layer.lora_magnitude_vector[name].flatten())
    merged = torch.empty_like(weight, dtype=delta.dtype)
    layer.as_matrix(merged).copy_(merged_weight(matrix, [delta_matrix], [scale]))
    return merged - weight


def _lora_bias(layer: nn.Module, name: str) -> Tensor | None:
    """Adapter ``name``'s scaled ``lora_B`` bias (``lora_bias``), or None."""
    lora_B = getattr(layer, "lora_B", None)  # embeddings have no lora_B layers (nor a lora_bias)
    bias = lora_B[name].bias if lora_B is not None else None
    return None if bias is None else bias * layer.scaling[name]


def _check_lora_bias_merges(layer: nn.Module, names: list[str], has_dora: bool) -> None:
    with_bias = [name for name in names if _lora_bias(layer, name) is not None]
    if with_bias and layer.base_layer.bias is None:
        raise WeightkitError(
            f"lora: cannot merge adapter {with_bias[0]!r} (lora_bias) into a layer without a bias (nor can "
            "PEFT); keep it unmerged"
        )
    if with_bias and has_dora:
        raise WeightkitError(
            f"lora: cannot merge adapter {with_bias[0]!r} (lora_bias) together with a DoRA adapter on one "
            "layer; merge them separately (activate one) or keep them unmerged"
        )


def _merged_scale(layer: nn.Module, name: str) -> Tensor:
    """DoRA adapter ``name``'s per-row factor ``m / ||W + delta||`` with the norms kept when it was merged."""
    return layer.lora_magnitude_vector[name].flatten() / layer._merged_norms[name]


def _merge(layer: nn.Module) -> None:
    pending = [name for name in layer.active if name not in layer.merged]
    has_dora = any(name in layer.lora_magnitude_vector for name in layer.merged + pending)
    if pending and has_dora and layer.merged:
        # A DoRA adapter is normalised against the base weight, not one another adapter already changed:
        # take the merged ones out and merge every active adapter at once.
        _unmerge(layer)
        pending = list(layer.active)
    if not pending:
        return
    if isinstance(layer.base_layer, QuantizedLinear):
        raise WeightkitError(
            f"lora: cannot merge adapter {pending[0]!r} into a QuantizedLinear layer "
            f"(int{layer.base_layer.scheme.bits}): its weight is frozen on the integer grid, and rounding "
            "the merged weight to the grid again would lose what of the update is below a grid step; keep "
            "the adapter unmerged, or merge it into the full-precision model (weightkit merge-adapter) and "
            "compress the result"
        )
    _check_lora_bias_merges(layer, pending, has_dora)
    with torch.no_grad():
        weight = layer.base_layer.weight
        if not has_dora:  # plain LoRA updates simply add up
            for name in pending:
                weight += layer._lora_delta(name)  # in the adapter's dtype: the weight is rounded once
                if (bias := _lora_bias(layer, name)) is not None:
                    layer.base_layer.bias += bias
        else:
            matrix = layer.as_matrix(weight)
            deltas = [layer.as_matrix(layer._lora_delta(name)) for name in pending]
            scales = []
            for name, delta in zip(pending, deltas, strict=True):
                if name in layer.lora_magnitude_vector:
                    # The norms at merge time, kept: unmerging must divide by these, not recompute them.
                    layer._merged_norms[name] = row_norms(matrix, delta)
                    scales.append(_merged_scale(layer, name))
                else:
                    scales.append(None)
            matrix.copy_(merged_weight(matrix, deltas, scales))
        layer.merged.extend(pending)


def _unmerge(layer: nn.Module) -> None:
    if not layer.merged:  # nothing to undo (and a QuantizedLinear, never merged, has no weight to read)
        return
    with torch.no_grad():
        weight = layer.base_layer.weight
        if not any(name in layer.lora_magnitude_vector for name in layer.merged):
            while layer.merged:
                name = layer.merged.pop()
                weight -= layer._lora_delta(name)
                if (bias := _lora_bias(layer, name)) is not None:
                    layer.base_layer.bias -= bias
            return
        matrix = layer.as_matrix(weight)
        deltas = [layer.as_matrix(layer._lora_delta(name)) for name in layer.merged]
        scales = [
            _merged_scale(layer, name) if name in layer.lora_magnitude_vector else None
            for name in layer.merged
        ]
        layer._merged_norms.clear()
        matrix.copy_(unmerged_weight(matrix, deltas, scales))
        layer.merged.clear()


# The LoRA layer for each kind of module LoRA adapts (GPT-2's Conv1D is a linear layer stored transposed,
# QuantizedLinear one stored on an integer grid).
LORA_LAYERS = {
    **dict.fromkeys((*LINEAR_TYPES, QuantizedLinear), LoRALinear),
    nn.Embedding: LoRAEmbedding,
    nn.Conv2d: LoRAConv2d,
}


def add_lora(
    model: nn.Module, config: LoRAConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear``, ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d`` of ``model`` a LoRA
    adapter ``name``; freeze everything else.

    Calling it again with another ``name`` adds a second adapter to the same layers (several named
    adapters on one model); layers already wrapped keep their wrapper. ``autocast_adapter_dtype``: float32
    factors on 16-bit layers (PEFT's default; ``False`` keeps each layer's dtype).

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a rank too large for a layer, an
            adapter name already used, a PiSSA/EVA init on a layer that is not linear (``nn.Linear`` or
            ``Conv1D``) or is a ``QuantizedLinear``, or a layer LoRA cannot adapt exactly (grouped, dilated
            or non-zero-padded convolutions, embeddings with ``max_norm``).
    """
    init = config.init if initialize else "kaiming"
    selected = _select_targets(model, config.targets)
    for module_name, module in selected.items():
        problem = _unsupported(module)
        if init != "kaiming" and isinstance(getattr(module, "base_layer", module), QuantizedLinear):
            why = (
                "EVA reads dense layers only" if init == "eva"
                else "it leaves the base weight a residual, and this one is frozen on its integer grid"
            )  # fmt: skip
            problem = (
                f"init={init!r} does not work on a QuantizedLinear layer (of a quantized checkpoint): {why}; "
                "use init='kaiming' (LoRA, rsLoRA, DoRA), or adapt the full-precision model"
            )
        elif init != "kaiming" and not isinstance(module, (*LINEAR_TYPES, LoRALinear)):
            problem = (
                f"init={init!r} works on nn.Linear and Conv1D layers only, this is a {type(module).__name__}"
            )
        if config.lora_bias and isinstance(module, nn.Embedding | LoRAEmbedding):
            problem = "lora_bias does not work on embeddings (nor in PEFT)"
        if problem:
            raise WeightkitError(f"lora: cannot adapt {module_name}: {problem}")
    for where, table in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in table:
            if not any(suffix_pattern_value(n, {key: True}) for n in selected):
                raise WeightkitError(f"lora: {where} key {key!r} matches none of the adapted modules")
    eva_a = {}
    if init == "eva":
        # EVA decides each layer's rank from its inputs first; layers given rank 0 get no adapter.
        eva_a = _eva_init(model, list(selected), config, data)
        config = dataclasses.replace(config, targets=sorted(eva_a))
        selected = {n: m for n, m in selected.items() if n in eva_a}
    for module_name, layer in _wrap(model, selected).items():
        rank, scaling = config.rank_for(module_name), config.scaling_for(module_name)
        dtype = adapter_dtype(_base_weight(layer).dtype, autocast_adapter_dtype)
        if isinstance(layer, LoRAEmbedding):
            layer.add_adapter(name, rank=rank, scaling=scaling, dora=config.dora, dtype=dtype)
            continue
        if isinstance(layer, LoRAConv2d):
            layer.add_adapter(
                name, rank=rank, scaling=scaling, dropout=config.dropout, dora=config.dora, dtype=dtype,
                lora_bias=config.lora_bias,
            )  # fmt: skip
            continue
        if module_name in eva_a:
            rank, alpha = eva_a[module_name].shape[0], config.alpha_for(module_name)
            scaling = alpha * rank / config.rank / (math.sqrt(rank) if config.rslora else rank)
        layer.add_adapter(
            name, rank=rank, scaling=scaling, dropout=config.dropout, dora=config.dora,
            init="kaiming" if init == "eva" else init, dtype=dtype, lora_bias=config.lora_bias,
        )  # fmt: skip
        if module_name in eva_a:
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(eva_a[module_name])
    return finish_adapter(model, name, config)


def _select_targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The targeted modules LoRA adapts (plain or already LoRA layers), in model order. The modules inside
    adapter layers (their base layers and adapter weights) are never targets, even of a broad pattern."""
    types = tuple(LORA_LAYERS) + tuple(LORA_LAYERS.values())
    selected = select_modules(model, targets=targets, ignore=[], types=types)
    inside = tuple(f"{n}." for n in adapter_layers(model))
    return {n: m for n, m in selected.items() if not n.startswith(inside)}


def _unsupported(module: nn.Module) -> str | None:
    """Why LoRA cannot adapt ``module`` exactly (its update would not merge into the weight), or None."""
    if isinstance(module, nn.Conv2d):
        # PEFT's lora_A copies kernel size, stride and padding only (and PEFT cannot merge grouped ones).
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        if module.dilation != (1, 1):
            return f"dilated convolutions (dilation={module.dilation}) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "embeddings with max_norm are not supported (the renormalised rows would not merge)"
    # An embedding subclass with its own forward (OPT's learned positions take an attention mask) does not
    # look up token ids as LoRA's update does; Gemma's scaled embedding is handled (``embed_scale``).
    if (
        isinstance(module, nn.Embedding)
        and type(module).forward is not nn.Embedding.forward
        and not hasattr(module, "embed_scale")
    ):
        return f"{type(module).__name__} has its own forward; LoRA adapts token-id embedding lookups only"
    return None


def _wrap(model: nn.Module, selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Wrap each selected module in the LoRA layer for its type; ``{name: LoRA layer}`` in model order."""
    wrapped = {}
    for base_type, wrapper in LORA_LAYERS.items():
        names = [n for n, m in selected.items() if isinstance(m, base_type | wrapper)]
        if names:
            wrapped.update(wrap_targets(model, names, wrapper, types=(base_type,)))
    return {n: wrapped[n] for n in selected}


def _eva_init(model: nn.Module, modules: list[str], config: LoRAConfig, data) -> dict[str, Tensor]:
    """EVA's ``A`` per targeted module (rank 0 modules left out)."""
    if data is None:
        raise WeightkitError("lora: init='eva' needs calibration batches: adapt(model, config, data=batches)")
    components = eva_components(
        model, modules, data, rank=config.rank, rho=config.eva_rho, tau=config.eva_tau
    )
    return {n: a for n, a in components.items() if a.shape[0] > 0}


# One core, named presets: "--method eva" is LoRA initialised by EVA, "dora" is LoRA with DoRA ...
register("adapt", "lora", LoRAConfig, add_lora, preset={"init": "kaiming", "dora": False})
register("adapt", "dora", LoRAConfig, add_lora, preset={"init": "kaiming", "dora": True})
register("adapt", "pissa", LoRAConfig, add_lora, preset={"init": "pissa", "dora": False})
register("adapt", "olora", LoRAConfig, add_lora, preset={"init": "olora", "dora": False})
register("adapt", "eva", LoRAConfig, add_lora, preset={"init": "eva", "dora": False})
