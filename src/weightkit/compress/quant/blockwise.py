"""Block-by-block calibration: capture the inputs of transformer block 0, then walk the blocks.

GPTQ and AWQ need the activations that reach each linear layer. Running the whole model for every
layer would cost memory and time, so (as both papers' reference code does) the inputs of the first
block are captured once, each block is calibrated and quantized on its captured inputs, and the
quantized block's outputs become the next block's inputs. Peak memory is the model plus one block's
activations for the calibration set.

Inside a block, linear layers that read the *same* input tensor form a group (q/k/v; gate/up) and are
processed in call order. Groups are quantized sequentially: a later group is calibrated on the
inputs produced by the already-quantized earlier groups, so it can compensate their error
("true sequential" in GPTQ's reference code).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError

__all__ = ["BlockInputs", "capture_block_inputs", "run_block", "input_groups", "stream_inputs"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the activations needed were seen."""


@dataclass
class BlockInputs:
    """What one transformer block receives for every calibration batch."""

    hidden: list[Tensor]  # per batch: the hidden states, the block's first positional argument
    args: list[tuple]  # per batch: the other positional arguments
    kwargs: list[dict]  # per batch: keyword arguments (attention mask, rotary embeddings ...)
    token_masks: list[Tensor]  # per batch: bool [batch, seq], False at padding (kept out of statistics)

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[dict[str, Tensor]]) -> BlockInputs:
    """Run the model on each batch up to ``block`` and record what the block is called with."""
    captured = BlockInputs([], [], [], [])

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(dict(kwargs))
        raise _Stop

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    # A KV cache would grow every time a block is re-run on the same inputs.
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                model(**batch)
            except _Stop:
                pass
            else:
                raise WeightkitError("calibration forward pass never reached the first transformer block")
            captured.token_masks.append(batch["attention_mask"].bool())
    finally:
        handle.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return captured


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's output hidden states for every calibration batch."""
    return [
        _first(block(h, *a, **kw)) for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)
    ]


@torch.no_grad()
def input_groups(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs) -> list[list[str]]:
    """Names of ``linears`` (relative to ``block``) grouped by shared input, in call order."""
    # The input tensors are kept alive until the grouping is done, so equal data pointers really
    # mean a shared input and not memory reused by the allocator.
    calls: list[tuple[str, Tensor]] = []
    names = {id(m): n for n, m in linears.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((names[id(mod)], args[0])))
        for m in linears.values()
    ]
    try:
        block(inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, x in calls:
        if any(name in g for g in groups):
            continue
        if last_input is not None and x.data_ptr() == last_input.data_ptr() and x.shape == last_input.shape:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = set(linears) - {n for g in groups for n in g}
    if missing:
        raise WeightkitError(f"layers never called during calibration: {', '.join(sorted(missing))}")
    return groups


@torch.no_grad()
def stream_inputs(
    block: nn.Module, modules: list[nn.Module], inputs: BlockInputs, fn: Callable[[int, Tensor], None]
) -> None:
    """Call ``fn(i, x)`` with the input ``x`` of ``modules[i]`` for each batch, as ``[tokens, features]``
    without padding tokens.

    Each forward pass of the block stops as soon as every module in ``modules`` has been reached.
    """
    state: dict = {}

    def hook(module, args):
        x = args[0]
        fn(state["index"][id(module)], x[state["mask"]].reshape(-1, x.shape[-1]))
        state["left"] -= 1
        if state["left"] == 0:
            raise _Stop

    state["index"] = {id(m): i for i, m in enumerate(modules)}
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        for h, a, kw, token_mask in zip(
            inputs.hidden, inputs.args, inputs.kwargs, inputs.token_masks, strict=True
        ):
            state.update(mask=token_mask, left=len(modules))
            with contextlib.suppress(_Stop):
                block(h, *a, **kw)
    finally:
        for handle in handles:
            handle.remove()
