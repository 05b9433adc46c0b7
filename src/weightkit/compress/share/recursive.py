"""Recursive Transformers: tie a pretrained model's layers into K shared layers looped over its depth,
optionally relaxed by a low-rank correction per layer.

Paper: "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA" (Bae, Fisch,
Harutyunyan, Ji, Kim, Schuster; ICLR 2025; arXiv:2410.20672).

A model of ``L`` transformer layers becomes a Recursive Transformer of ``K`` unique layers run ``L / K``
times in a loop (the paper's CYCLE strategy, Eq. 2, with ``B = L / K`` looping blocks): layer ``l``
(0-based) runs shared layer ``l mod K``. The paper restricts ``B`` to a factor of ``L``, so ``K`` must divide
``L``. Each selected ``nn.Linear`` of a layer becomes a :class:`~weightkit.quantized.shared.SharedLinear`
whose one atom (``[1, out, in]``, coefficient 1) is the same ``nn.Parameter`` in the ``L / K`` layers that
loop over it, so the model holds and stores ``K`` layers' linear weights instead of ``L``.

Initialising the shared layers (§2.2, Figure 2; ``init``):

- ``"stepwise"``: shared layer ``k`` takes pretrained layer ``floor(k (L - 1) / (K - 1))``, layers at regular
  intervals keeping the first and the last (the paper's "fixed-ends" variant, Appendix F; with ``K = 1``,
  the first layer). The paper's best for strict Recursive Transformers.
- ``"average"``: the mean of the layers it serves (``k, k + K, k + 2K ...``). The paper's best for Relaxed
  Recursive Transformers.
- ``"lower"``: the first ``K`` layers.

Relaxed (``relax_rank = r > 0``; §2.3, Appendix C): every layer ``l`` adds its own ``B_l A_l`` to each
shared weight, initialised from the truncated SVD of its residual ``W_l - W'_(l mod K)``: ``B = U_r Σ_r``,
``A = V_r^T`` (singular vectors sign-fixed with :func:`weightkit.linalg.largest_entry_signs`, so the result
is a function of the weights alone). At ``r = min(out, in)`` every layer gets its own weight back (up to
rounding).

Deliberate deviations:

- Norms and the linears' biases stay per layer. The paper ties the RMSNorm weights too; keeping them costs
  a few ``hidden``-sized vectors per layer (well under 1% of a layer) and means strict tying changes only the
  linear weights and the relaxed model at full rank reproduces every layer. Any other parameter in a layer
  (e.g. experts fused into 3-D parameters, GPT-2's ``Conv1D``) is refused by name rather than left untied.
- A layer whose residual is zero (one that ``stepwise``/``lower`` picked for its own shared layer) gets
  ``B = 0`` and ``A`` = the SVD's orthonormal rows, not the paper's random Gaussian ``A``: the same zero
  correction to start from, without a seed.
- The paper then uptrains the result (15B tokens); this is the conversion. Its shared atoms and LoRA factors
  are trainable parameters (``weightkit.load`` ties the atoms again).

In memory (:func:`recursive_share`) the model is changed in place. :func:`~weightkit.compress.
compress_checkpoint` streams: it reads one linear of every layer at a time (``q_proj`` of all ``L``
layers, then ``k_proj`` ...), which averaging and the residuals need at once, writes its ``K`` shared weights
and ``L`` LoRAs and frees them; peak memory is the embeddings plus ``L`` weights of one linear. The output is
weightkit's "shared" format (:mod:`weightkit.quantized.shared`), which :func:`weightkit.load` reads and
transformers refuses; it equals ``recursive_share`` on the loaded model saved with ``save_quantized``
(tested). Only models with one stack of layers (decoder-only or encoder-only) are
handled; encoder-decoders are refused.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from weightkit.arch import block_lists
from weightkit.checkpoint import CheckpointWriter
from weightkit.errors import WeightkitError
from weightkit.linalg import largest_entry_signs
from weightkit.progress import track
from weightkit.quantized.shared import SharedLinear, atom_set_indices, share_linears, shared_tensors
from weightkit.registry import register
from weightkit.select import DEFAULT_IGNORE, select_modules

__all__ = [
    "RecursiveConfig",
    "recursive_share",
    "stepwise_layers",
    "source_layers",
    "average_weight",
    "residual_lora",
]

INITS = ("stepwise", "average", "lower")


@dataclass
class RecursiveConfig:
    """Tie a model's ``L`` layers into ``blocks`` shared layers (Recursive Transformer, arXiv:2410.20672).

    Attributes:
        blocks: ``K``, the unique layers kept; layer ``l`` runs shared layer ``l mod K``, looping ``L / K``
            times. Must divide the model's layer count; ``K = L`` changes nothing. Required.
        init: how each shared layer is made from the pretrained ones: ``"stepwise"`` (layers at regular
            intervals, first and last kept), ``"average"`` (the mean of the layers it serves) or
            ``"lower"`` (the first ``K`` layers). ``None``: the paper's best, stepwise for strict
            recursion and average when ``relax_rank > 0``.
        relax_rank: rank of each layer's own LoRA correction, initialised from the SVD of what tying
            took from it (the Relaxed Recursive Transformer); 0 is strict recursion. At most the smaller
            side of every shared weight.
        targets: linear layers to tie (names or ``re:`` patterns; ``_default``: every linear of the
            layers); a target must select the same linear in every layer. Linears outside the stack of
            layers are never tied.
        ignore: names or patterns left untied, per layer (default: embeddings, lm_head, norms, pooler).
    """

    blocks: int | None = None
    init: str | None = None
    relax_rank: int = 0
    targets: list[str] = field(default_factory=lambda: ["_default"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    def __post_init__(self):
        if self.blocks is None:
            raise WeightkitError(
                "blocks is required: K, the number of shared layers to keep (the CLI's --blocks)"
            )
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise WeightkitError(f"blocks must be a whole number of at least 1, got {self.blocks!r}")
        if self.init is not None and self.init not in INITS:
            raise WeightkitError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if isinstance(self.relax_rank, bool) or not isinstance(self.relax_rank, int) or self.relax_rank < 0:
            raise WeightkitError(
                "relax_rank must be a whole number of at least 0 (0: strict recursion), got "
                f"{self.relax_rank!r}"
            )

    @property
    def init_method(self) -> str:
        """``init``, or the paper's best for this ``relax_rank`` when it is ``None``."""
        if self.init is not None:
            return self.init
        return "average" if self.relax_rank else "stepwise"


def stepwise_layers(layers: int, blocks: int) -> list[int]:
    """The pretrained layers (0-based) the stepwise initialisation picks for ``blocks`` shared layers out of
    ``layers``: ``floor(k (layers - 1) / (blocks - 1))``, which keeps the first and the last; ``[0]`` for one
    shared layer."""
    if blocks == 1:
        return [0]
    return [k * (layers - 1) // (blocks - 1) for k in range(blocks)]


def source_layers(layers: int, blocks: int, init: str) -> list[list[int]]:
    """For each shared layer ``k``, the pretrained layers whose weights initialise it: the layers it serves
    (``k, k + blocks ...``) for ``"average"``, the stepwise pick for ``"stepwise"``, layer ``k`` for
    ``"lower"``."""
    if init == "average":
        return [list(range(k, layers, blocks)) for k in range(blocks)]
    if init == "stepwise":
        return [[layer] for layer in stepwise_layers(layers, blocks)]
    if init == "lower":
        return [[k] for k in range(blocks)]
    raise WeightkitError(f"init must be one of {', '.join(INITS)}, got {init!r}")


def average_weight(weights: Sequence[Tensor]) -> Tensor:
    """The mean of ``weights`` (summed in float32, returned in their dtype); one weight comes back exactly."""
    return torch.stack([w.float() for w in weights]).mean(0).to(weights[0].dtype)


def residual_lora(weight: Tensor, shared: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` whose product is the best rank-``rank`` approximation of
    ``weight - shared``: its truncated SVD, computed in float32, ``B = U_r Σ_r`` and ``A = V_r^T``, each
    singular pair's sign fixed by its left vector's largest entry; returned in ``weight``'s dtype."""
    residual = weight.float() - shared.float()
    left, singular, right = torch.linalg.svd(residual, full_matrices=False)
    left, singular, right = left[:, :rank], singular[:rank], right[:rank]
    signs = largest_entry_signs(left, dim=0)
    lora_b = left * (singular * signs)
    lora_a = right * signs[:, None]
    return lora_a.to(weight.dtype), lora_b.to(weight.dtype)


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm, or a model's own norm class (LlamaRMSNorm, T5LayerNorm ...), by transformers' naming."""
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.endswith("Norm")


def _refuse_untieable(list_name: str, layer: nn.Module) -> None:
    """Refuse a layer holding parameters recursion would silently leave untied: anything outside its
    linears and norms (GPT-2's Conv1D, experts fused into 3-D parameters ...)."""
    for name, module in layer.named_modules():
        if isinstance(module, Conv1D):
            raise WeightkitError(
                f"{list_name}.0.{name} is a transformers Conv1D (GPT-2 style), not an nn.Linear: recursive "
                "ties nn.Linear layers only"
            )
        if isinstance(module, nn.Linear) or _is_norm(module):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            raise WeightkitError(
                f"{list_name}.0.{name + '.' if name else ''}{own[0]} is a parameter of a "
                f"{type(module).__name__}, neither a linear layer nor a norm: recursive cannot tie it"
            )


def _tied_linears(model: nn.Module, config: RecursiveConfig) -> tuple[str, dict[str, list[nn.Linear]]]:
    """The model's one stack of layers and, by name within a layer, the selected linear of every layer,
    checked to be selected and of one shape in all of them."""
    lists = block_lists(model)
    if len(lists) != 1:
        raise WeightkitError(
            f"{type(model).__name__} has {len(lists)} stacks of layers ({', '.join(n for n, _ in lists)}): "
            "recursive ties the layers of one stack (decoder-only or encoder-only models)"
        )
    list_name, layers = lists[0]
    _refuse_untieable(list_name, layers[0])
    count, k = len(layers), config.blocks
    if k > count:
        raise WeightkitError(f"blocks={k} is more than the {count} layers of {list_name}")
    if count % k:
        divisors = [d for d in range(1, count + 1) if count % d == 0]
        raise WeightkitError(
            f"blocks={k} does not divide the {count} layers of {list_name}: the shared layers loop a whole "
            f"number of times (the paper's restriction); choose one of {', '.join(map(str, divisors))}"
        )
    selected = select_modules(model, targets=config.targets, ignore=config.ignore)
    by_name: dict[str, dict[int, nn.Linear]] = {}
    for name, linear in selected.items():
        head, dot, inner = name.removeprefix(f"{list_name}.").partition(".")
        if name.startswith(f"{list_name}.") and dot and head.isdigit():
            by_name.setdefault(inner, {})[int(head)] = linear
    if not by_name:
        raise WeightkitError(f"no linear layer of {list_name} selected (check targets and ignore)")
    tied = {}
    for inner, per_layer in by_name.items():
        missing = [i for i in range(count) if i not in per_layer]
        if missing:
            raise WeightkitError(
                f"{list_name}.{{i}}.{inner} is selected in some layers but not in layer {missing[0]}: a "
                "shared linear is tied across all the layers that loop over it, so select it in every layer"
            )
        shapes = {tuple(per_layer[i].weight.shape) for i in range(count)}
        if len(shapes) > 1:
            raise WeightkitError(
                f"{list_name}.{{i}}.{inner} has several shapes across layers ({sorted(shapes)}): layers "
                "cannot share its weight"
            )
        (shape,) = shapes
        if config.relax_rank > min(shape):
            raise WeightkitError(
                f"relax_rank={config.relax_rank} exceeds {list_name}.0.{inner}'s {list(shape)} weight, whose "
                f"rank is at most {min(shape)}"
            )
        tied[inner] = [per_layer[i] for i in range(count)]
    return list_name, tied


def _tie(
    weights: Sequence[Tensor], sources: list[list[int]], relax_rank: int, device: torch.device | None
) -> list[tuple[nn.Parameter, dict[int, tuple[Tensor, Tensor]]]]:
    """For each shared layer ``k`` of one linear: its atoms ``[1, out, in]`` (the shared weight) and, with
    ``relax_rank``, the LoRA ``(A, B)`` of each layer it serves, by layer index. ``weights`` is that linear's
    weight in every layer; the results are on their device, computed on ``device`` (``None``: the same)."""
    count, blocks = len(weights), len(sources)
    home = weights[0].device
    work = home if device is None else device
    tied = []
    for k in range(blocks):
        shared = average_weight([weights[i].to(work) for i in sources[k]])
        loras = {}
        if relax_rank:
            for layer in range(k, count, blocks):
                lora_a, lora_b = residual_lora(weights[layer].to(work), shared, relax_rank)
                loras[layer] = (lora_a.to(home), lora_b.to(home))
        tied.append((nn.Parameter(shared.to(home)[None]), loras))
    return tied


class TensorStore(Protocol):
    """Where a checkpoint's tensors are read from and the output's written to, one tensor at a time (the
    streaming ``compress_checkpoint``'s store)."""

    writer: CheckpointWriter

    def read(self, model_name: str) -> Tensor | None:
        """The checkpoint's tensor of the model's ``model_name`` (finite), or ``None`` if it has none."""


def _meta_shared(model: nn.Module, list_name: str, tied: dict[str, list[nn.Linear]], config) -> dict:
    """Swap the tied linears of a meta-device ``model`` for meta-device ``SharedLinear`` layers, tied as
    they will be, and return ``(linear name, shared layer) -> its atom set's index`` in the output."""
    count, blocks = len(next(iter(tied.values()))), config.blocks
    atoms_of = {}
    for inner, linears in tied.items():
        weight = linears[0].weight
        for k in range(blocks):
            atoms = nn.Parameter(torch.empty((1, *weight.shape), dtype=weight.dtype, device="meta"))
            members = {f"{list_name}.{layer}.{inner}": layer for layer in range(k, count, blocks)}
            ones = {name: torch.ones(1, dtype=weight.dtype, device="meta") for name in members}
            rank, (out_features, in_features) = config.relax_rank, weight.shape
            loras = {
                name: (
                    torch.empty((rank, in_features), dtype=weight.dtype, device="meta"),
                    torch.empty((out_features, rank), dtype=weight.dtype, device="meta"),
                )
                for name in members
                if rank
            }
            share_linears(model, atoms, ones, loras=loras)
            atoms_of[(inner, k)] = atoms
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SharedLinear)}
    indices = atom_set_indices(layers)
    return {key: indices[id(atoms)] for key, atoms in atoms_of.items()}


def _stream(model, list_name, tied, config, sources, store: TensorStore, progress, device) -> None:
    """Recursion from a checkpoint, one linear (all its layers) at a time: its weights in every layer are
    read, tied and written in the "shared" layout; the layers' other tensors are copied as they are. The
    meta-device ``model`` is left holding meta-device ``SharedLinear`` layers that describe the output."""
    count, blocks = len(next(iter(tied.values()))), config.blocks
    own = {f"{list_name}.{layer}.{inner}" for inner in tied for layer in range(count)}
    for name in model.state_dict():
        module, _, _ = name.rpartition(".")
        if name.startswith(f"{list_name}.") and module not in own:
            tensor = store.read(name)
            if tensor is not None:  # None: a buffer the model computes itself
                store.writer.add(name, tensor)
    has_bias = {inner: linears[0].bias is not None for inner, linears in tied.items()}
    set_index = _meta_shared(model, list_name, tied, config)
    for inner in track(list(tied), "recursive", enabled=progress):
        names = [f"{list_name}.{layer}.{inner}" for layer in range(count)]
        weights = [_required(store, f"{name}.weight") for name in names]
        biases = [_required(store, f"{name}.bias") if has_bias[inner] else None for name in names]
        layers, indices = {}, {}
        for k, (atoms, loras) in enumerate(_tie(weights, sources, config.relax_rank, device)):
            indices[id(atoms)] = set_index[(inner, k)]
            for layer in range(k, count, blocks):
                lora_a, lora_b = loras.get(layer, (None, None))
                ones = torch.ones(1, dtype=atoms.dtype)
                layers[layer] = SharedLinear(atoms, ones, biases[layer], lora_a=lora_a, lora_b=lora_b)
        in_order = {names[layer]: layers[layer] for layer in range(count)}
        for name, tensor in shared_tensors(in_order, set_index=indices):
            store.writer.add(name, tensor)


def _required(store: TensorStore, name: str) -> Tensor:
    tensor = store.read(name)
    if tensor is None:
        raise WeightkitError(f"the checkpoint lacks {name}, which the model needs")
    return tensor


def recursive_share(
    model: nn.Module,
    config: RecursiveConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    device: torch.device | None = None,
    store: TensorStore | None = None,
) -> nn.Module:
    """Tie ``model``'s layers into ``config.blocks`` shared layers, in place (module docstring).

    Every selected linear of layer ``l`` becomes a ``SharedLinear`` holding shared layer ``l mod K``'s
    weight (one ``nn.Parameter`` for all the layers looping over it), with its own bias and, when
    ``relax_rank > 0``, its own LoRA factors from the SVD of its residual. ``data`` and ``tokenizer`` are
    not used (the conversion needs no data).

    Args:
        model: the model; with ``store``, built on the meta device (its layers are read from the store).
        config: the settings.
        data: unused.
        tokenizer: unused.
        progress: show a progress bar.
        device: where the averages and SVDs are computed (``None``: where the weights are); the model stays
            where it is.
        store: for :func:`~weightkit.compress.compress_checkpoint`: read the layers' tensors from it and
            write the output's there, one linear of every layer at a time.

    Returns:
        ``model``.

    Raises:
        WeightkitError: more or fewer than one stack of layers, ``blocks`` larger than the layer count or not
            dividing it, ``relax_rank`` above a shared weight's smaller side, a layer holding parameters it
            cannot tie, or a selection that differs between layers; checked before anything changes.
    """
    list_name, tied = _tied_linears(model, config)
    count, blocks = len(next(iter(tied.values()))), config.blocks
    sources = source_layers(count, blocks, config.init_method)
    if store is not None:
        _stream(model, list_name, tied, config, sources, store, progress, device)
        return model
    for inner, linears in track(list(tied.items()), "recursive", enabled=progress):
        # Every layer's weight is taken before any module is swapped: a shared layer may be made from a
        # layer that belongs to another shared layer.
        weights = [linear.weight.detach() for linear in linears]
        for k, (atoms, loras) in enumerate(_tie(weights, sources, config.relax_rank, device)):
            names = {layer: f"{list_name}.{layer}.{inner}" for layer in range(k, count, blocks)}
            ones = {name: torch.ones(1, dtype=atoms.dtype, device=atoms.device) for name in names.values()}
            share_linears(model, atoms, ones, loras={names[layer]: lora for layer, lora in loras.items()})
    return model


register("compress", "recursive", RecursiveConfig, recursive_share)
