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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import greenlet
import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError

__all__ = ["BlockInputs", "capture_block_inputs", "input_groups", "calibrate_block"]


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


def _token_rows(inputs: BlockInputs) -> list[Tensor]:
    # Flat positions of the real tokens: index_select is ~6x faster than boolean-mask indexing.
    return [mask.flatten().nonzero().squeeze(1) for mask in inputs.token_masks]


def _real_tokens(x: Tensor, rows: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.to(x.device))


def _run_batches(
    block: nn.Module, modules: list[nn.Module], inputs: BlockInputs, on_input: Callable[[int, Tensor], None]
) -> list[Tensor]:
    """:func:`calibrate_block` without pauses: one batch after the other, in this thread."""
    index = {id(m): i for i, m in enumerate(modules)}
    token_rows = _token_rows(inputs)
    current = [0]
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args: on_input(index[id(mod)], _real_tokens(args[0], token_rows[current[0]]))
        )
        for m in modules
    ]
    outputs = []
    try:
        for b in range(len(inputs)):
            current[0] = b
            outputs.append(_first(block(inputs.hidden[b], *inputs.args[b], **inputs.kwargs[b])))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@torch.no_grad()
def calibrate_block(
    block: nn.Module,
    modules: list[nn.Module],
    inputs: BlockInputs,
    on_input: Callable[[int, Tensor], None],
    on_all_reached: Callable[[int], None] | None = None,
) -> list[Tensor]:
    """Run ``block`` once on every batch, holding all batches at each of ``modules`` in turn.

    For ``i = 0, 1, ...`` (``modules`` in call order): every batch's forward pass runs until it is
    about to call ``modules[i]`` and hands its input to ``on_input(i, x)`` as ``[tokens, features]``
    without padding tokens; when all batches are there, ``on_all_reached(i)`` runs (e.g. to quantize
    the layers reading that input in place), and only then do the passes go on, so everything after
    ``modules[i]`` sees its new weights.

    Returns:
        The block's output hidden states for every batch.

    This is GPTQ's sequential calibration in one forward pass per block instead of one partial pass
    per group. Each batch's pass is a greenlet (a coroutine with its own stack, in this thread),
    paused in a hook. The price is memory: every batch's in-flight activations are alive at once.
    Greenlets rather than threads: a thread per pass made MiniLM GPTQ ~15% slower (each thread has its
    own malloc arena, OpenMP team and BLAS buffers, and hand-overs wake sleeping threads). Thread-local
    state (grad mode, autocast) is shared by the passes, which is sound because every pass runs the
    same code between the same pauses.
    """
    if on_all_reached is None or not modules:  # nothing changes between batches: no need to hold them
        return _run_batches(block, modules, inputs, on_input)
    index = {id(m): i for i, m in enumerate(modules)}
    token_rows = _token_rows(inputs)
    caller = greenlet.getcurrent()
    batch_of: dict[greenlet.greenlet, int] = {}

    def pause_at(module, args):
        b = batch_of[greenlet.getcurrent()]
        caller.switch((index[id(module)], _real_tokens(args[0], token_rows[b])))

    def forward(b: int) -> tuple:
        return "output", _first(block(inputs.hidden[b], *inputs.args[b], **inputs.kwargs[b]))

    passes = [greenlet.greenlet(partial(forward, b), parent=caller) for b in range(len(inputs))]
    batch_of.update((g, b) for b, g in enumerate(passes))
    handles = [m.register_forward_pre_hook(pause_at) for m in modules]
    try:
        for i in range(len(modules)):
            for b, running in enumerate(passes):
                kind, x = running.switch()  # runs pass b to its next pause; its errors raise here
                if kind != i:
                    seen = "returned" if kind == "output" else f"called layer number {kind}"
                    raise WeightkitError(
                        f"calibration batch {b}: expected the block to call layer number {i} next, but it "
                        f"{seen} (each layer must be called once per pass, in the order first seen)"
                    )
                on_input(i, x)
            on_all_reached(i)
        outputs = []
        for b, running in enumerate(passes):
            kind, out = running.switch()
            if kind != "output":
                raise WeightkitError(f"calibration batch {b}: a layer was called again after its turn")
            outputs.append(out)
        return outputs
    finally:
        for handle in handles:
            handle.remove()
        for running in passes:
            if running:  # started and paused: unwind its stack (raises GreenletExit inside it)
                running.throw()
