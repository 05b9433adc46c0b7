"""FoldGPT: "FoldGPT: Simple and Effective Large Language Model Compression Scheme" (Liu, Zeng, Li, Yan, Fu,
Mei and Chen, arXiv 2407.00928): remove the most redundant transformer blocks, then let the remaining blocks
share weights in groups, each shared layer with a small learnable gate.

Two steps, on calibration text (block by block, with the captured activations of
:mod:`weightkit.compress.quant.blockwise`):

1. **Block removal.** Each block's redundancy is the mean cosine similarity between the hidden state of a
   token entering it and leaving it (:func:`weightkit.linalg.mean_token_cosine`, the measure behind
   ShortGPT's Block Influence): a block whose output is nearly its input adds little. The ``drop`` blocks
   with the highest similarity are removed, and the model's config and layer indices renumbered
   (:func:`blocks_to_drop`).
2. **Group parameter sharing.** The remaining blocks are cut into consecutive groups of ``share`` blocks
   (:func:`sharing_groups`); every linear layer of a block reuses the weight of the same layer in its group's
   first block, scaled per output channel by a gate of its own, ``y = g * (W_first x + b_first)``. The
   gates are fitted on calibration data in closed form: per output channel, the least-squares scale from
   the first block's layer output to the layer's own original output on the same inputs
   (:func:`least_squares_gates`). A group's first block has gates of one. Norms are not shared: each block
   keeps its own.

Deliberate deviations from the paper (whose full text was not at hand: only its abstract and summaries,
which describe learnable gating parameters for block importance, a polarisation-friendly optimisation,
group sharing with per-block gates and LayerNorm re-adaptation, then fine-tuning with tail-layer
distillation):

- The paper ranks blocks by learnable gates trained with a polarising regulariser, which also models the
  coupling between blocks; here they are ranked once by the input/output similarity above, computed on the
  original model (no training, no coupling).
- The gates are per output channel of each shared linear layer and fitted by least squares on calibration
  activations, not trained jointly with the model; the inputs of layers inside a block come from its
  original (unshared) layers, while each block's inputs come from the blocks before it already shared.
- No fine-tuning and no tail-layer distillation afterwards (out of scope: the result is training-free).

Supported: decoder and encoder families whose config this module can trim (:data:`TRIMMABLE`); others are
refused by name. A model with removed blocks and no sharing (``share=1``) is a plain Hugging Face checkpoint.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from weightkit.arch import block_lists
from weightkit.compress.quant.blockwise import BlockInputs, capture_block_inputs, run_batches
from weightkit.compress.quant.calibrated import calibration_batches
from weightkit.compress.quant.config import CalibrationFields
from weightkit.errors import WeightkitError
from weightkit.linalg import token_cosines
from weightkit.progress import track
from weightkit.quantized.shared import SharedLinear
from weightkit.registry import register

__all__ = [
    "FoldGPTConfig",
    "TRIMMABLE",
    "blocks_to_drop",
    "sharing_groups",
    "least_squares_gates",
    "block_similarities",
    "drop_blocks",
    "fold",
]

# Model types with one list of blocks whose config counts them in num_hidden_layers and describes them
# per layer (if at all) in layer_types: removing blocks is trimming exactly these (checked by tests that
# load the result in transformers). Other configs may hold per-layer settings this module does not know.
TRIMMABLE = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "bert",
    "roberta",
)


@dataclass
class FoldGPTConfig(CalibrationFields):
    """FoldGPT (arXiv 2407.00928): remove blocks, then share the weights of the rest in groups with gates.

    Attributes (besides the calibration fields):
        drop: how many blocks to remove (those whose output is most similar to their input); 0 keeps all.
            Fewer than the model's blocks.
        share: blocks per weight-sharing group among the blocks kept: consecutive groups of this many
            (the last may be shorter) store one block's linear weights plus one gate vector per layer and
            block. 1 shares nothing (removal only, a plain checkpoint).
    """

    drop: int = 1
    share: int = 2

    def __post_init__(self):
        CalibrationFields.__post_init__(self)
        if self.drop < 0:
            raise WeightkitError(f"drop must be at least 0, got {self.drop}")
        if self.share < 1:
            raise WeightkitError(f"share must be at least 1, got {self.share}")
        if self.drop == 0 and self.share == 1:
            raise WeightkitError("drop 0 and share 1 would leave the model as it is: remove or share blocks")


# -- pure functions ----------------------------------------------------------------------------------------


def blocks_to_drop(similarities: Tensor, drop: int) -> list[int]:
    """The indices of the ``drop`` blocks with the highest input/output similarity, ascending (of equal
    similarities the earlier block goes first).

    Raises:
        WeightkitError: ``drop`` not in ``[0, blocks)``.
    """
    blocks = similarities.numel()
    if not 0 <= drop < blocks:
        raise WeightkitError(
            f"drop must be at least 0 and fewer than the model's {blocks} blocks, got {drop}"
        )
    order = torch.sort(similarities, descending=True, stable=True).indices
    return sorted(order[:drop].tolist())


def sharing_groups(blocks: int, share: int) -> list[list[int]]:
    """``range(blocks)`` cut into consecutive groups of ``share`` (the last may be shorter).

    Raises:
        WeightkitError: ``share`` not in ``[1, blocks]``.
    """
    if not 1 <= share <= blocks:
        raise WeightkitError(f"share must be between 1 and the {blocks} blocks kept, got {share}")
    return [list(range(start, min(start + share, blocks))) for start in range(0, blocks, share)]


def least_squares_gates(cross: Tensor, energy: Tensor) -> Tensor:
    """Per-channel gates ``g = argmin sum_t (y_tc - g_c z_tc)^2`` from ``cross = sum_t y_t * z_t`` and
    ``energy = sum_t z_t^2`` (both ``[out]``); a channel whose shared output is always zero gets 1."""
    return torch.where(energy > 0, cross / energy.where(energy > 0, 1.0), 1.0)


# -- on a model --------------------------------------------------------------------------------------------


def _single_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's one list of blocks, refusing model types whose config this module cannot trim."""
    model_type = model.config.model_type
    if model_type not in TRIMMABLE:
        raise WeightkitError(
            f"FoldGPT supports model types {', '.join(TRIMMABLE)}; weightkit does not know how to remove "
            f"blocks from a {model_type!r} config correctly"
        )
    (found,) = block_lists(model)  # these types have exactly one
    if model.config.num_hidden_layers != len(found[1]):
        raise WeightkitError(
            f"config.num_hidden_layers is {model.config.num_hidden_layers} but {found[0]} holds "
            f"{len(found[1])} blocks"
        )
    return found


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if type(m) is nn.Linear}


@torch.no_grad()
def block_similarities(blocks: nn.ModuleList, inputs: BlockInputs, device: torch.device) -> Tensor:
    """Per block, the mean over all calibration tokens (padding left out) of the cosine similarity between
    a token's hidden state entering the block and leaving it; ``inputs`` (block 0's) are consumed."""
    tokens = sum(int(mask.sum()) for mask in inputs.token_masks)
    if tokens == 0:
        raise WeightkitError("calibration data has no tokens (all padding?)")
    similarities = torch.zeros(len(blocks), dtype=torch.float64)
    for i, block in enumerate(blocks):
        outputs = run_batches(block, inputs, device)
        for b, (entering, leaving) in enumerate(zip(inputs.hidden, outputs, strict=True)):
            rows = inputs.token_rows(b, inputs.store)
            width = entering.shape[-1]
            similarities[i] += token_cosines(
                entering.reshape(-1, width).index_select(0, rows),
                leaving.reshape(-1, width).index_select(0, rows),
            ).sum()
        inputs.hidden = outputs
    return similarities / tokens


def drop_blocks(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove the blocks at indices ``drop`` from ``model`` in place: the list of blocks, the config's
    ``num_hidden_layers`` and ``layer_types`` and the blocks' ``layer_idx`` (their place in a KV cache)."""
    list_name, blocks = _single_block_list(model)
    kept = [i for i in range(len(blocks)) if i not in set(drop)]
    model.set_submodule(list_name, nn.ModuleList(blocks[i] for i in kept))
    for new, block in enumerate(model.get_submodule(list_name)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    return model


class _GateFit:
    """Streamed sums for :func:`least_squares_gates` of one layer: its own output ``y`` and the group's first
    block's layer output ``z`` on the same inputs."""

    def __init__(self, own: nn.Linear, first: nn.Linear):
        self.own, self.first = own, first
        self.cross = torch.zeros(own.out_features, dtype=torch.float64, device=own.weight.device)
        self.energy = torch.zeros_like(self.cross)

    def add(self, x: Tensor) -> None:
        # F.linear, not the modules: calling a hooked layer from its own hook would recurse.
        y = F.linear(x, self.own.weight, self.own.bias).to(torch.float64)
        z = F.linear(x, self.first.weight, self.first.bias).to(torch.float64)
        self.cross += (y * z).sum(0)
        self.energy += z.square().sum(0)

    def gates(self) -> Tensor:
        return least_squares_gates(self.cross, self.energy)


def _adder(fits: list[_GateFit]):
    """``run_batches``' ``on_input``: the inputs of the ``k``-th layer go to ``fits[k]``."""
    return lambda k, x: fits[k].add(x)


def _gated_output(shared: dict[int, tuple[nn.Linear, Tensor]]):
    """A forward hook giving a layer the output it will have shared: ``g * first(x)``, from ``shared``
    (layer id -> the group's first block's layer and the gates)."""

    def hook(module, args, _output):
        first, gates = shared[id(module)]
        return F.linear(args[0], first.weight, first.bias) * gates.to(args[0].dtype)

    return hook


@torch.no_grad()
def _fit_gates(
    blocks: nn.ModuleList, groups: list[list[int]], inputs: BlockInputs, device: torch.device, progress: bool
) -> dict[int, dict[str, Tensor]]:
    """Per block that is not first in its group, ``{layer name: gates}``, fitted walking the blocks in order:
    a block's inputs are the outputs of the blocks before it as they will be (gated shared layers)."""
    first_of = {i: group[0] for group in groups for i in group}
    gates: dict[int, dict[str, Tensor]] = {}
    for i, block in enumerate(track(blocks, "FoldGPT gates", enabled=progress)):
        if first_of[i] == i:
            inputs.hidden = run_batches(block, inputs, device)
            continue
        own, first = _linears(block), _linears(blocks[first_of[i]])
        fits = [_GateFit(own[name], first[name]) for name in own]
        run_batches(block, inputs, device, modules=[f.own for f in fits], on_input=_adder(fits))
        gates[i] = {name: fit.gates() for name, fit in zip(own, fits, strict=True)}
        shared = {id(f.own): (f.first, g) for f, g in zip(fits, gates[i].values(), strict=True)}
        handles = [f.own.register_forward_hook(_gated_output(shared)) for f in fits]
        try:
            inputs.hidden = run_batches(block, inputs, device)
        finally:
            for handle in handles:
                handle.remove()
    return gates


def _share(blocks: nn.ModuleList, groups: list[list[int]], gates: dict[int, dict[str, Tensor]]) -> None:
    """Swap every linear layer of every block for a :class:`SharedLinear` over its group's first block's
    weight (one ``Parameter`` per group and layer), with the block's gates (ones for the first block)."""
    for group in groups:
        first = _linears(blocks[group[0]])
        for name, layer in first.items():
            atoms = nn.Parameter(layer.weight.detach().unsqueeze(0))
            for i in group:
                g = gates[i][name].to(layer.weight) if i in gates else torch.ones_like(layer.weight[:, 0])
                bias = None if layer.bias is None else layer.bias.detach() * g
                blocks[i].set_submodule(name, SharedLinear(atoms, g.unsqueeze(0), bias))


@torch.no_grad()
def fold(
    model: nn.Module,
    config: FoldGPTConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    device: torch.device | None = None,
) -> nn.Module:
    """FoldGPT on ``model`` in place: remove ``config.drop`` blocks, then share the rest in gated groups.

    Args:
        data: calibration data (see :func:`weightkit.compress.quant.calibrated.calibration_batches`).
        tokenizer: the model's tokenizer, needed when ``data`` is text.
        device: where to run (``None``: where the model is). FoldGPT works on the whole model in memory:
            the model is moved to ``device`` and stays there.

    Raises:
        WeightkitError: a model type it cannot trim, ``drop`` not fewer than the blocks, ``share`` more than
            the blocks kept, or no calibration tokens; the model is unchanged then.
    """
    list_name, blocks = _single_block_list(model)
    if not 0 <= config.drop < len(blocks):
        raise WeightkitError(
            f"drop must be fewer than the model's {len(blocks)} blocks (one must remain), got {config.drop}"
        )
    sharing_groups(len(blocks) - config.drop, config.share)  # checks share before any work
    here = device or next(model.parameters()).device
    batches = calibration_batches(config, data, tokenizer)
    training = model.training
    model.eval()  # no dropout in the calibration passes
    try:
        model.to(here)
        if config.drop:
            inputs = capture_block_inputs(model, blocks[0], batches, here)
            drop_blocks(model, blocks_to_drop(block_similarities(blocks, inputs, here), config.drop))
        if config.share > 1:
            blocks = model.get_submodule(list_name)
            groups = sharing_groups(len(blocks), config.share)
            inputs = capture_block_inputs(model, blocks[0], batches, here)
            _share(blocks, groups, _fit_gates(blocks, groups, inputs, here, progress))
    finally:
        model.train(training)
    return model


register("compress", "foldgpt", FoldGPTConfig, fold)
