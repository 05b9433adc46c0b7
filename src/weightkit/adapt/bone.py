"""Bone and Bat: train one small block per layer that every shard of the frozen weight shares.

Paper: Jiale Kang, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large
Language Models", arXiv 2409.15371 (verified; later versions of the same id are titled "Bone: Block-Affine
Adaptation of Large Language Models" and "DiSHA: Dimension-Sharding Adaptation ..."; PEFT's ``MissConfig``,
the successor of its removed ``BoneConfig``, cites the same id).

A weight ``W`` (``out x in``) is cut into shards of ``r`` input columns. With ``r`` the *block size*:

- **Bone** (``variant="bone"``; PEFT's default ``init_weights=True``): one trainable block ``D``
  (``r x out``) is added to every shard, ``W'[:, j*r:(j+1)*r] = W[:, j*r:(j+1)*r] + D^T``, i.e.
  ``delta[o, i] = D[i mod r, o]`` (a last, narrower shard gets the first columns of ``D^T``). The forward
  never builds the matrix: it sums the input's shards, ``y = W x + fold(x) @ D``.
- **Bat** (``variant="bat"``; PEFT's ``init_weights="bat"``; the paper's "Weight Guide": the trainable
  block acts through the frozen weight): ``W`` is cut into ``r x r`` blocks ``W_ij`` and every block
  row ``i`` has its own trainable ``D_i`` (``r x r``), shared along the row:
  ``W'_ij = W_ij + W_ij @ D_i + D_i``. The update depends on the frozen weight, so the forward runs with
  the updated weight.

Both train ``r * out`` numbers per layer and start from ``D = 0`` (the model is unchanged at first). On a
16-bit layer ``D`` is float32 unless ``autocast_adapter_dtype=False`` (PEFT's adapter precision); Bat then
builds the adapted weight in float32, as PEFT's MiSS does.

Interoperability: the blocks live in ``miss_block.<adapter>`` (PEFT's MiSS module name), so the saved
tensor of a layer is ``<module>.miss_block`` exactly as PEFT writes it; :meth:`BoneConfig.peft_config`
and :meth:`BoneConfig.from_peft` translate the settings to and from PEFT's ``adapter_config.json``
(``peft_type`` ``"MISS"``; PEFT 0.21 no longer loads ``"BONE"``). GPT-2's ``Conv1D`` layers (weight stored
``in x out``) are adapted through the ``out x in`` view of their weight, the same math; PEFT's MiSS adapts
``nn.Linear`` layers only (it refuses a ``Conv1D`` target on load), so such an adapter loads in weightkit
only.

Deviations from the paper and PEFT:

- Several named adapters on one layer, of either variant, run in their ``active`` order and compose as
  their merges do (a Bat adapter transforms the weight that the adapters before it produced). While any
  Bat adapter is active on a layer, that layer's Bone adapters are added to the weight too, so their
  dropout does not apply there.
- Bat is unmerged by solving ``W_ij (I + D_i) = W'_ij - D_i`` (PEFT multiplies by an explicit inverse).
- MiSS's later ``"mini"`` variant and PEFT's random ``init_weights=False`` initialisation are not offered.
"""

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.adapt.layer import AdapterModule, adapter_dtype, finish_adapter, weight_matrix, wrap_targets
from weightkit.errors import WeightkitError
from weightkit.registry import register

__all__ = [
    "BoneConfig",
    "BoneLinear",
    "add_bone",
    "bone_delta",
    "bone_forward",
    "bat_delta",
    "bat_unmerge",
]

VARIANTS = ("bone", "bat")


@dataclass
class BoneConfig:
    """Where the shared blocks go, how large they are and how they act on the weight.

    Attributes:
        rank: ``r``, the block size: the weight is cut into shards of ``r`` input columns (and, for
            ``bat``, ``r`` output rows). Each layer trains ``r * out_features`` numbers. ``bone`` needs
            ``r <= in_features``; ``bat`` needs ``r`` to divide both sides of the weight.
        variant: ``"bone"``: the same block is added to every shard of the weight (cheap: no weight
            matmul in the forward). ``"bat"``: each ``r x r`` block of the weight is transformed by a
            trainable block of its block row, ``W_ij + W_ij @ D_i + D_i`` (nonlinear in the weight;
            the forward rebuilds the layer's weight, so it costs more time and memory).
        dropout: dropout on the adapter's input during training (``bone`` only: ``bat`` acts on the weight,
            not on the input).
        targets: which ``nn.Linear`` (or GPT-2 ``Conv1D``) modules get an adapter: exact module names or
            ``re:`` patterns matched against the full name (default: the attention query and value
            projections of Llama-style and BERT-style models).
    """

    rank: int = 64
    variant: str = "bone"
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["re:.*\\.(q_proj|v_proj|query|value)"])

    # The PEFT adapter types :meth:`from_peft` reads (the generic loader asks).
    PEFT_TYPES: ClassVar[tuple[str, ...]] = ("MISS",)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise WeightkitError(f"bone: rank (the block size) must be an integer >= 1, got {self.rank!r}")
        if self.variant not in VARIANTS:
            raise WeightkitError(f"bone: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0 <= self.dropout < 1:
            raise WeightkitError(f"bone: dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.variant == "bat":
            raise WeightkitError("bone: dropout applies to the 'bone' variant only; 'bat' acts on the weight")
        if not self.targets:
            raise WeightkitError("bone: targets is empty; name the modules to adapt")

    def peft_config(self, target_modules: list[str]) -> dict:
        """The method's part of PEFT's ``adapter_config.json`` (a MiSS adapter) for these modules."""
        return {
            "peft_type": "MISS",
            "r": self.rank,
            "init_weights": True if self.variant == "bone" else "bat",
            "miss_dropout": self.dropout,
            "mini_r": 1,
            "target_modules": list(target_modules),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "modules_to_save": None,
        }

    @classmethod
    def from_peft(cls, saved: dict) -> "BoneConfig":
        """The config of a PEFT MiSS adapter, from its ``adapter_config.json``.

        PEFT's ``target_modules`` become patterns that match as PEFT does (a list entry is a full name or a
        name suffix after a dot; a string is a regular expression for the whole name).

        Raises:
            WeightkitError: another method, MiSS's ``mini`` variant, or PEFT options weightkit does not
                reproduce (layer selection by index, excluded modules, trained biases). ``modules_to_save``
                is the loader's business and passes.
        """
        peft_type = saved.get("peft_type")
        if peft_type not in cls.PEFT_TYPES:
            raise WeightkitError(f"bone: a PEFT adapter of type {peft_type!r} is not a MiSS adapter")
        init = saved.get("init_weights", True)
        if init not in (True, False, "bat"):
            raise WeightkitError(f"bone: PEFT's MiSS variant init_weights={init!r} is not supported")
        unsupported = [k for k in ("layers_to_transform", "exclude_modules") if saved.get(k)]
        if saved.get("bias", "none") != "none":
            unsupported.append("bias")
        if unsupported:
            raise WeightkitError(f"bone: PEFT options {', '.join(unsupported)} are not supported")
        modules = saved.get("target_modules")
        if isinstance(modules, str):
            targets = [f"re:{modules}"]
        else:
            targets = [f"re:(.*\\.)?{re.escape(m)}" for m in sorted(modules or [])]
        variant = "bat" if init == "bat" else "bone"
        return cls(
            rank=int(saved["r"]),
            variant=variant,
            dropout=float(saved.get("miss_dropout") or 0.0) if variant == "bone" else 0.0,
            targets=targets,
        )


def bone_delta(block: Tensor, in_features: int) -> Tensor:
    """Bone's update of an ``out x in_features`` weight: ``delta[o, i] = block[i mod r, o]``.

    Args:
        block: ``D``, ``r x out``.
        in_features: the weight's number of columns.
    """
    r = block.shape[0]
    shards = -(-in_features // r)  # ceil: a last, narrower shard takes the first columns of D^T
    return block.T.repeat(1, shards)[:, :in_features]


def bone_forward(x: Tensor, block: Tensor) -> Tensor:
    """``x @ bone_delta(block, in).T`` without the matrix: sum the input's ``r``-wide shards, then ``@ D``.

    Args:
        x: ``(..., in)``.
        block: ``D``, ``r x out``.
    """
    r = block.shape[0]
    padded = F.pad(x, (0, -x.shape[-1] % r))  # zeros complete a last, narrower shard
    return padded.unflatten(-1, (-1, r)).sum(-2) @ block


def _weight_blocks(weight: Tensor, r: int) -> Tensor:
    """``out x in`` -> ``(out/r, in/r, r, r)``: ``[i, j]`` is the block ``W_ij``."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)


def _from_blocks(blocks: Tensor) -> Tensor:
    rows, cols, r, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(rows * r, cols * r)


def bat_delta(weight: Tensor, block: Tensor) -> Tensor:
    """Bat's update of ``weight``: block ``(i, j)`` is ``W_ij @ D_i + D_i``.

    Args:
        weight: ``W``, ``out x in`` with ``r`` dividing both.
        block: ``D``, ``(out/r, r, r)``: one ``r x r`` block per block row of ``W``.
    """
    per_row = block.unsqueeze(1)  # the same D_i for every block W_ij of row i
    return _from_blocks(_weight_blocks(weight, block.shape[-1]) @ per_row + per_row)


def bat_unmerge(merged: Tensor, block: Tensor) -> Tensor:
    """The ``W`` whose Bat update with ``block`` gives ``merged``: solves ``W_ij (I + D_i) = W'_ij - D_i``.

    Args:
        merged: ``W' = W + bat_delta(W, block)``.
        block: ``D``, ``(out/r, r, r)``; ``I + D_i`` must be invertible (it is near ``D = 0``).
    """
    r = block.shape[-1]
    per_row = block.unsqueeze(1)
    eye = torch.eye(r, device=block.device, dtype=block.dtype)
    solved = torch.linalg.solve(eye + per_row, _weight_blocks(merged, r) - per_row, left=False)
    return _from_blocks(solved)


class BoneLinear(AdapterModule):
    """A frozen ``nn.Linear`` (or GPT-2's ``Conv1D``, through its weight's ``out x in`` view) plus named
    Bone/Bat adapters, applied in ``active`` order."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        # PEFT's MiSS name, so the saved key is ``<module>.miss_block`` as PEFT writes it.
        self.miss_block = nn.ParameterDict()
        self.bone_dropout = nn.ModuleDict()
        self.variant: dict[str, str] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.train(base_layer.training)  # a model in eval mode stays there (no dropout in its new parts)

    def adapter_names(self) -> list[str]:
        return list(self.miss_block)

    def check_fits(self, name: str, config: BoneConfig, where: str = "this layer") -> None:
        """Raise if adapter ``name`` with ``config`` cannot be added to this layer (called ``where``)."""
        out_features, in_features = weight_matrix(self.base_layer).shape
        r = config.rank
        if name in self.miss_block:
            raise WeightkitError(f"bone: {where} already has an adapter named {name!r}")
        if config.variant == "bone" and r > in_features:
            raise WeightkitError(
                f"bone: block size {r} is larger than the {in_features} inputs of {where} "
                f"({out_features}x{in_features})"
            )
        if config.variant == "bat" and (in_features % r or out_features % r):
            raise WeightkitError(
                f"bone: variant 'bat' needs the block size to divide both sides of the weight; {r} does not "
                f"divide {where} ({out_features}x{in_features})"
            )

    def add_adapter(self, name: str, config: BoneConfig, dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` (zero blocks in ``dtype``, default the weight's: the layer's output is
        unchanged) and make it active."""
        self.check_fits(name, config)
        weight = self.base_layer.weight
        out_features, in_features = weight_matrix(self.base_layer).shape
        r = config.rank
        shape = (r, out_features) if config.variant == "bone" else (out_features // r, r, r)
        self.miss_block[name] = nn.Parameter(
            torch.zeros(shape, device=weight.device, dtype=dtype or weight.dtype)
        )
        self.bone_dropout[name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.bone_dropout[name].train(self.training)
        self.variant[name] = config.variant
        self.active.append(name)

    def updated_weight(self, weight: Tensor, name: str) -> Tensor:
        """``weight`` with adapter ``name``'s update applied (Bat's update depends on ``weight``), in the
        wider of the two dtypes."""
        block = self.miss_block[name]
        dtype = torch.promote_types(weight.dtype, block.dtype)
        weight, block = weight.to(dtype), block.to(dtype)
        if self.variant[name] == "bat":
            return weight + bat_delta(weight, block)
        return weight + bone_delta(block, weight.shape[1])

    def merge(self) -> None:
        """Fold the active adapters, in order, into the base weight (inference without extra work)."""
        with torch.no_grad():
            weight = weight_matrix(self.base_layer)  # out x in, a view (a Conv1D's weight transposed)
            for name in self.active:
                if name not in self.merged:
                    # float32 for the arithmetic, so half-precision weights round once, at the end
                    weight.copy_(self.updated_weight(weight.float(), name))
                    self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last first, restoring the base weight (up to float rounding)."""
        with torch.no_grad():
            weight = weight_matrix(self.base_layer)
            while self.merged:
                name = self.merged.pop()
                block = self.miss_block[name].float()
                if self.variant[name] == "bat":
                    weight.copy_(bat_unmerge(weight.float(), block))
                else:
                    weight.copy_(weight.float() - bone_delta(block, weight.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        pending = [name for name in self.active if name not in self.merged]
        if any(self.variant[name] == "bat" for name in pending):
            # Bat transforms the weight itself: build the adapted weight, in order, and run with it.
            weight, bias = weight_matrix(self.base_layer), self.base_layer.bias
            for name in pending:
                weight = self.updated_weight(weight, name)
            bias = bias.to(weight.dtype) if bias is not None else None
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        base_out = self.base_layer(x)
        out = base_out
        for name in pending:
            block = self.miss_block[name]
            bone_x = self.bone_dropout[name](x).to(block.dtype)
            out = out + bone_forward(bone_x, block)
        return out.to(base_out.dtype)  # summed in the adapter's dtype, rounded once


def add_bone(
    model: nn.Module, config: BoneConfig, *, name: str = "default", data=None, initialize: bool = True,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:  # fmt: skip
    """Give every targeted ``nn.Linear`` and ``Conv1D`` of ``model`` a Bone (or Bat) adapter ``name``; freeze
    the rest.

    The blocks start at zero, so the model's outputs are unchanged until training (``initialize`` and
    ``data`` change nothing: the initialisation is already free and data-free). Calling it again with
    another ``name`` adds a second adapter to the same layers. ``autocast_adapter_dtype``: float32 blocks on
    16-bit layers (PEFT's default; ``False`` keeps each layer's dtype).

    Returns:
        ``model``, modified in place.

    Raises:
        WeightkitError: a target that selects nothing (with close names), a block size that does not fit a
            layer (naming it), or an adapter name already used.
    """
    layers = wrap_targets(model, config.targets, BoneLinear)
    for module_name, layer in layers.items():  # check every layer before changing any
        layer.check_fits(name, config, where=module_name)
    for layer in layers.values():
        layer.add_adapter(
            name, config, dtype=adapter_dtype(layer.base_layer.weight.dtype, autocast_adapter_dtype)
        )
    return finish_adapter(model, name, config)


register("adapt", "bone", BoneConfig, add_bone)
