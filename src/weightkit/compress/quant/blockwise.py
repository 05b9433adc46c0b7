"""Block-by-block calibration: capture the inputs of transformer block 0, then walk the blocks.

GPTQ and AWQ need the activations that reach each linear layer. Running the whole model for every
layer would cost memory and time, so (as both papers' reference code does) the inputs of the first
block are captured once, each block is calibrated and quantized on its captured inputs, and the
quantized block's outputs become the next block's inputs.

Inside a block, linear layers that read the *same* input tensor form a group (q/k/v; gate/up), found
in call order by :func:`input_groups`.

Memory: the calibration batches run through a block one at a time (:func:`run_batches`), so besides
the model's resident part and the block, only the captured inputs (the hidden states entering and
leaving the block, one tensor per batch) grow with the calibration set; one batch's activations are
alive at any time. On a GPU the captured inputs stay on the CPU and move to the GPU batch by batch
(:func:`storage_device`), and only the block being calibrated (plus, once, the small front part of
the model that computes block 0's inputs) is moved to the GPU (:func:`borrowed`, :func:`block_on`).
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from weightkit.errors import WeightkitError

__all__ = [
    "BlockInputs",
    "block_on",
    "borrowed",
    "capture_block_inputs",
    "carry_outputs",
    "input_groups",
    "run_batches",
    "storage_device",
    "learn_best",
    "block_error",
    "frozen",
]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the activations needed were seen."""


def storage_device(device: torch.device) -> torch.device:
    """Where captured activations live when computing on ``device``: the CPU for an accelerator (its
    memory is kept for the block), else ``device`` itself (the CPU, or ``meta`` for shape-only runs)."""
    return device if device.type in ("cpu", "meta") else torch.device("cpu")


def _to(value, device: torch.device):
    """``value`` with every tensor in it (also inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """What one transformer block receives for every calibration batch, kept on :attr:`store`."""

    hidden: list[Tensor]  # per batch: the hidden states, the block's first positional argument
    args: list[tuple]  # per batch: the other positional arguments
    kwargs: list[dict]  # per batch: keyword arguments (attention mask, rotary embeddings ...)
    token_masks: list[Tensor]  # per batch: bool [batch, seq], False at padding (kept out of statistics)
    store: torch.device  # where the tensors above live

    def __len__(self) -> int:
        return len(self.hidden)

    def batch(self, b: int, device: torch.device) -> tuple[Tensor, tuple, dict]:
        """Batch ``b``'s ``(hidden, args, kwargs)`` on ``device``."""
        return _to(self.hidden[b], device), _to(self.args[b], device), _to(self.kwargs[b], device)

    def token_rows(self, b: int, device: torch.device) -> Tensor:
        """Flat positions of batch ``b``'s real tokens (index_select is ~6x faster than a bool mask)."""
        return self.token_masks[b].flatten().nonzero().squeeze(1).to(device)


def _tensors(module: nn.Module) -> dict[tuple[nn.Module, str, bool], Tensor]:
    """Every parameter and buffer of ``module`` and its children, keyed by (owner, name, is_parameter)."""
    found = {}
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                found[(owner, name, True)] = p
        for name, b in owner._buffers.items():
            if b is not None:
                found[(owner, name, False)] = b
    return found


def _put(tensors: dict[tuple[nn.Module, str, bool], Tensor], device: torch.device | None = None) -> None:
    """Give each owner the tensor listed for it (``device=None``: the very objects, e.g. to restore
    them) or a copy on ``device``: a new ``Parameter`` for a parameter, one per original, so weights
    tied within ``tensors`` stay tied (replacing the object, unlike ``.data =``, also works for a
    device of another tensor type such as ``meta``)."""
    copies: dict[int, nn.Parameter] = {}
    for (owner, name, is_param), tensor in tensors.items():
        if device is None:
            value = tensor
        elif is_param:
            if id(tensor) not in copies:
                copies[id(tensor)] = nn.Parameter(tensor.detach().to(device), tensor.requires_grad)
            value = copies[id(tensor)]
        else:
            value = tensor.to(device)
        (owner._parameters if is_param else owner._buffers)[name] = value


@contextmanager
def borrowed(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Run with copies of ``modules``' parameters and buffers on ``device``; afterwards (also after an
    error) the modules hold their original tensors again. For read-only use: changes are dropped."""
    originals = {}
    for module in modules:
        originals.update(_tensors(module))
    try:
        _put(originals, device)
        yield
    finally:
        _put(originals)


@contextmanager
def block_on(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Run with ``block`` on ``device``. When it was elsewhere, it goes back to its own device
    afterwards with whatever changed (quantized layers, folded scales); after an error its original
    tensors are put back, so a block that failed is left as it was."""
    originals = _tensors(block)
    home = next((t.device for t in originals.values()), device)
    if home == device:
        yield
        return
    try:
        _put(originals, device)
        yield
    except BaseException:
        _put(originals)
        raise
    block.to(home)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[dict[str, Tensor]], device: torch.device
) -> BlockInputs:
    """Run the model on each batch (on ``device``) up to ``block`` and record what the block is called
    with, on :func:`storage_device` of ``device``."""
    store = storage_device(device)
    captured = BlockInputs([], [], [], [], store)

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        # A cache object (a decoder stack may make one whatever use_cache says: T5's has its own config)
        # would be filled by the first re-run and then replace the layers' own keys and values.
        uncached = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
        captured.hidden.append(_to(hidden, store))
        captured.args.append(_to(tuple(args[1:]), store))
        captured.kwargs.append(_to(uncached, store))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    # A KV cache would grow every time a block is re-run on the same inputs.
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        for batch in batches:
            try:
                model(**_to(batch, device))
            except _Stop:
                pass
            else:
                raise WeightkitError("calibration forward pass never reached the first transformer block")
            captured.token_masks.append(batch["attention_mask"].bool().to(store))
    finally:
        handle.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return captured


@torch.no_grad()
def carry_outputs(block: nn.Module, inputs: BlockInputs, carries, device: torch.device) -> None:
    """Run a list's first ``block`` on every batch and put its extra outputs that the later blocks take as
    positional arguments into ``inputs.args``: ``carries`` pairs (output index, index in ``args``). T5's
    first block computes the position biases every block of its list uses."""
    for b in range(len(inputs)):
        hidden, args, kwargs = inputs.batch(b, device)
        out = block(hidden, *args, **kwargs)
        carried = list(inputs.args[b])
        for output_index, arg_index in carries:
            carried[arg_index] = _to(out[output_index], inputs.store)
        inputs.args[b] = tuple(carried)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def input_groups(
    block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, device: torch.device
) -> list[list[str]]:
    """Names of ``linears`` (relative to ``block``) grouped by shared input, in call order."""
    # The input tensors are kept alive until the grouping is done, so equal data pointers really
    # mean a shared input and not memory reused by the allocator.
    calls: list[tuple[str, Tensor]] = []
    names = {id(m): n for n, m in linears.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((names[id(mod)], args[0])))
        for m in linears.values()
    ]
    hidden, args, kwargs = inputs.batch(0, device)
    try:
        block(hidden, *args, **kwargs)
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
def run_batches(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    *,
    modules: list[nn.Module] = (),
    on_input: Callable[[int, Tensor], None] | None = None,
    until: nn.Module | None = None,
) -> list[Tensor] | None:
    """Run ``block`` on ``device`` on every calibration batch, one batch at a time.

    Each time one of ``modules`` is about to run, ``on_input(i, x)`` gets its input as
    ``[tokens, features]`` without padding tokens (``i`` indexes ``modules``). With ``until``, each
    pass stops right before ``until`` would run (after its ``on_input``), and nothing is returned:
    the cheap way to see what one layer receives, since nothing after it runs.

    Returns:
        Without ``until``: the block's output hidden states for every batch, on ``inputs.store``.
    """
    index = {id(m): i for i, m in enumerate(modules)}
    rows = [None]

    def seen(module, args):
        i = index.get(id(module))
        if i is not None and on_input is not None:
            on_input(i, args[0].reshape(-1, args[0].shape[-1]).index_select(0, rows[0]))
        if module is until:
            raise _Stop

    hooked = list(modules) + ([until] if until is not None and id(until) not in index else [])
    handles = [m.register_forward_pre_hook(seen) for m in hooked]
    outputs = []
    try:
        for b in range(len(inputs)):
            rows[0] = inputs.token_rows(b, device)
            hidden, args, kwargs = inputs.batch(b, device)
            try:
                out = block(hidden, *args, **kwargs)
            except _Stop:
                continue
            if until is not None:
                raise WeightkitError(f"calibration batch {b}: the block never called {type(until).__name__}")
            outputs.append(_first(out).to(inputs.store))
    finally:
        for handle in handles:
            handle.remove()
    return None if until is not None else outputs


def learn_best(
    params: list[nn.Parameter],
    step_loss: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float,
    total_loss: Callable[[], float] | None = None,
    score_every: int = 1,
) -> float:
    """Adam on ``step_loss(step)`` for ``steps`` steps, then ``params`` set to the best iterate scored.

    With ``total_loss``, ``total_loss()`` scores the current iterate at step 0, every ``score_every``
    steps and after the last. Without it, ``step_loss`` must be the loss over all the data: each step's
    loss scores the iterate it was computed at (no second pass), and the last iterate gets one more. A NaN
    score never wins, so a diverging run ends where it was best. Returns the best score.
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    best, kept = math.nan, None

    def consider(score: float) -> None:
        nonlocal best, kept
        if kept is None or score < best:
            best, kept = score, [p.detach().clone() for p in params]

    with torch.enable_grad():
        for step in range(steps + 1):
            if total_loss is not None and (step % score_every == 0 or step == steps):
                consider(total_loss())
            if step == steps:
                break
            loss = step_loss(step)
            if total_loss is None:
                consider(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if total_loss is None:
        with torch.no_grad():
            consider(step_loss(steps).item())
    with torch.no_grad():
        for param, value in zip(params, kept, strict=True):
            param.copy_(value)
    return best


def block_error(output: Tensor, target: Tensor, rows: Tensor) -> Tensor:
    """Sum of squared differences between a block's ``output`` and ``target`` hidden states over the real
    tokens (flat positions ``rows``), in float32."""
    width = output.shape[-1]
    real_output, real_target = (t.reshape(-1, width).index_select(0, rows).float() for t in (output, target))
    return (real_output - real_target).square().sum()


@contextmanager
def frozen(block: nn.Module) -> Iterator[None]:
    """Run with every parameter of ``block`` frozen (only what is learned outside it changes); the
    ``requires_grad`` flags are restored after, also after an error."""
    flags = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
