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
   first block (one stored copy), scaled per output channel by a gate of its own: ``y = g * (W_first x) +
   b_own``. The gates start at one and are learned block by block with Adam on calibration data: the error
   of the block's output against its own unshared output, on the inputs the block will see (the outputs of
   the blocks before it, already shared); the best iterate scored on all calibration batches is kept, gates
   of one included. A group's first block has gates of one. Norms and biases are not shared: each block
   keeps its own.

Deliberate deviations from the paper (whose full text was not at hand: only its abstract and summaries,
which describe learnable gating parameters for block importance, a polarisation-friendly optimisation,
group sharing with per-block gates and LayerNorm re-adaptation, then fine-tuning with tail-layer
distillation):

- The paper ranks blocks by learnable gates trained with a polarising regulariser, which also models the
  coupling between blocks; here they are ranked once by the input/output similarity above, computed on the
  original model (no training, no coupling).
- The gates are per output channel of each shared linear layer (what "small learnable gates" are exactly in
  the paper could not be checked) and learned per block on its output error, not with the whole model;
  the norms keep their pretrained values (no LayerNorm re-adaptation).
- No fine-tuning and no tail-layer distillation afterwards (out of scope).
- A closed-form alternative was tried and dropped: per-channel least-squares gates from each layer's
  shared output to its own output lower every layer's error but, on MiniLM, made the model's embeddings
  worse than gates of one (they shrink the gates of layers whose weights differ, e.g. both the query and
  key projections, which compounds inside the block); the block-level objective does not.

Supported: decoder and encoder families whose config this module can trim (:data:`TRIMMABLE`); others are
refused by name. A model with removed blocks and no sharing (``share=1``) is a plain Hugging Face checkpoint.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.arch import block_lists
from weightkit.compress.quant.blockwise import (
    BlockInputs,
    block_error,
    capture_block_inputs,
    frozen,
    learn_best,
    run_batches,
)
from weightkit.compress.quant.calibrated import calibration_batches
from weightkit.compress.quant.config import CalibrationFields
from weightkit.errors import WeightkitError
from weightkit.linalg import token_cosines
from weightkit.progress import track
from weightkit.quantized.shared import SharedLinear, share_linears
from weightkit.registry import register

__all__ = [
    "FoldGPTConfig",
    "TRIMMABLE",
    "blocks_to_drop",
    "sharing_groups",
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
        steps: Adam steps per shared block (one calibration batch each, the batches cycled) learning its
            gates on the block's output error; 0 leaves the gates at one (plain sharing).
        lr: Adam's learning rate for the gates.
    """

    drop: int = 1
    share: int = 2
    steps: int = 50
    lr: float = 0.01

    def __post_init__(self):
        CalibrationFields.__post_init__(self)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise WeightkitError(f"steps must be a whole number at least 0, got {self.steps!r}")
        if not 0 < self.lr < math.inf:
            raise WeightkitError(f"lr must be a positive number, got {self.lr!r}")
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
    ``num_hidden_layers`` and ``layer_types`` and the blocks' ``layer_idx`` (their place in a KV cache).

    Raises:
        WeightkitError: a model type whose config this module cannot trim (:data:`TRIMMABLE`), an index that
            is not a block's, or every block.
    """
    list_name, blocks = _single_block_list(model)
    if not set(drop) <= set(range(len(blocks))) or len(set(drop)) == len(blocks):
        raise WeightkitError(
            f"cannot drop blocks {sorted(drop)} of {len(blocks)}: give indices of some of them"
        )
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


def _block_output(block: nn.Module, inputs: BlockInputs, b: int, device: torch.device) -> Tensor:
    hidden, args, kwargs = inputs.batch(b, device)
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _learn_gates(
    block: nn.Module,
    inputs: BlockInputs,
    targets: list[Tensor],
    device: torch.device,
    config: "FoldGPTConfig",
) -> None:
    """Adam on the gates (coefficients) of ``block``'s shared layers, everything else frozen, minimising the
    squared error of the block's output against ``targets`` (its unshared output) over the real tokens, one
    calibration batch per step; the gates are left at the best iterate scored on all batches (gates of one
    included, so the block never ends worse on the calibration data than plain sharing)."""
    rows = [inputs.token_rows(b, device) for b in range(len(inputs))]
    counts = [len(r) * targets[b].shape[-1] for b, r in enumerate(rows)]  # fold checked there are tokens

    def batch_error(b: int) -> Tensor:
        return block_error(_block_output(block, inputs, b, device), targets[b].to(device), rows[b])

    def step_loss(step: int) -> Tensor:
        b = step % len(inputs)
        return batch_error(b) / max(counts[b], 1)

    def total_loss() -> float:
        with torch.no_grad():
            return sum(batch_error(b).item() for b in range(len(inputs))) / sum(counts)

    gates = [m.coefficients for m in block.modules() if isinstance(m, SharedLinear)]
    with frozen(block):
        for gate in gates:
            gate.requires_grad_(True)
        learn_best(
            gates, step_loss, steps=config.steps, lr=config.lr, total_loss=total_loss, score_every=len(inputs)
        )


def _share_block(block: nn.Module, atoms: dict[str, nn.Parameter]) -> None:
    """Swap each linear layer of ``block`` for a :class:`SharedLinear` over ``atoms[its name]`` with gates of
    one (``[1, out]``: one per output channel) and its own bias."""
    for name, layer in _linears(block).items():
        share_linears(block, atoms[name], {name: torch.ones_like(layer.weight[:, 0]).unsqueeze(0)})


@torch.no_grad()
def _share_groups(
    blocks: nn.ModuleList,
    groups: list[list[int]],
    inputs: BlockInputs,
    device: torch.device,
    config: "FoldGPTConfig",
    progress: bool,
) -> None:
    """Share each group's linear weights (its first block's), walking the blocks in order: each later block of
    a group gets gates learned on its inputs as they will be (the outputs of the blocks before it, already
    shared) against its own unshared outputs."""
    atoms: dict[int, dict[str, nn.Parameter]] = {}
    first_of = {i: group[0] for group in groups for i in group}
    for i, block in enumerate(track(blocks, "FoldGPT sharing", enabled=progress)):
        if first_of[i] == i:
            atoms[i] = {
                name: nn.Parameter(m.weight.detach().unsqueeze(0)) for name, m in _linears(block).items()
            }
            _share_block(block, atoms[i])
        else:
            targets = run_batches(block, inputs, device)
            _share_block(block, atoms[first_of[i]])
            _learn_gates(block, inputs, targets, device, config)
        if i < len(blocks) - 1:
            inputs.hidden = run_batches(block, inputs, device)


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
    if not sum(int(batch["attention_mask"].sum()) for batch in batches):
        raise WeightkitError("calibration data has no tokens (all padding?)")
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
            _share_groups(blocks, groups, inputs, here, config, progress)
    finally:
        model.train(training)
    return model


register("compress", "foldgpt", FoldGPTConfig, fold)
