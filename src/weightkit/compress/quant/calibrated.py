"""GPTQ, AWQ and VPTQ applied to a whole model, block by block on calibration text.

The math is in ``gptq.py``, ``awq.py`` and ``vptq.py`` (pure functions over tensors); this module feeds
them the activations each linear layer sees (``blockwise.py``) and swaps the layers for ``QuantizedLinear``
(``VPTQLinear`` for VPTQ).
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from weightkit.arch import Fold, block_layout, block_lists, folds, model_task
from weightkit.compress.quant.awq import (
    CLIP_SAMPLE_TOKENS,
    awq_search_clip,
    awq_search_scales,
    clip_weight,
    even_sample,
    scale_candidates,
    scaled_rtn,
    weight_magnitude,
)
from weightkit.compress.quant.blockwise import (
    block_on,
    borrowed,
    capture_block_inputs,
    carry_outputs,
    input_groups,
    run_batches,
)
from weightkit.compress.quant.config import CalibrationFields, WeightQuantFields
from weightkit.compress.quant.gptq import gptq_quantize, shrink_hessian
from weightkit.compress.quant.hessian import Hessian
from weightkit.compress.quant.module import quantize_linear, selected_linears
from weightkit.compress.quant.vptq import VPTQConfig, vptq_quantize
from weightkit.data import calibration_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.progress import track
from weightkit.quantized.codebook import VPTQWeight
from weightkit.quantized.grid import QuantizedWeight, rtn_quantize
from weightkit.registry import register

__all__ = [
    "GPTQConfig",
    "AWQConfig",
    "BlockStore",
    "quantize_gptq",
    "quantize_awq",
    "quantize_vptq",
    "calibration_batches",
]


@dataclass
class GPTQConfig(WeightQuantFields, CalibrationFields):
    """GPTQ (arXiv 2210.17323): quantize column by column, pushing each rounding error onto the
    columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

    Attributes (besides the grid and calibration fields):
        damp: fraction of the mean Hessian diagonal added to its diagonal; more is more stable,
            less follows the data more closely. The paper uses 0.01.
        block_size: columns per lazy batch update (speed only, the result is the same).
        act_order: quantize the most-activated input columns first, while the columns left can
            still absorb their error. On by default (as in llm-compressor): on MiniLM at 4 bits g128
            it lifts held-out embedding cosine from 0.9766 to 0.9799 at no measurable cost.
        keep_zeros: weights that are exactly zero stay zero (no error is moved onto them; see
            :func:`~weightkit.compress.quant.gptq.gptq_quantize`), so a pruned model keeps its sparsity. Set
            by a recipe whose pruning stage comes before GPTQ; off by default (the paper).
        hessian_shrinkage: shrink each Hessian's off-diagonal part toward zero, by ``n / (n + d)`` for
            ``n`` calibration tokens and ``d`` input features while ``n <= d``, fading as ``d / n``
            beyond (``gptq.shrink_hessian``), so scarce calibration data leads toward round-to-nearest
            instead of below it. A deviation from the paper: under 0.5% of the weight for a 4096-wide
            layer at 65k tokens; ``False`` is the paper.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    hessian_shrinkage: bool = True
    keep_zeros: bool = False

    def __post_init__(self):
        WeightQuantFields.__post_init__(self)
        CalibrationFields.__post_init__(self)
        if not 0 <= self.damp < 1:
            raise WeightkitError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise WeightkitError(f"block_size must be at least 1, got {self.block_size}")


@dataclass
class AWQConfig(WeightQuantFields, CalibrationFields):
    """AWQ (arXiv 2306.00978): scale up the input channels that carry large activations before
    rounding (the inverse scale folds into the preceding op, so the model's function is unchanged),
    then search a clipping range per group. Follows the reference code (llm-awq, AutoAWQ,
    llm-compressor); see :mod:`weightkit.compress.quant.awq`.

    Attributes (besides the grid and calibration fields):
        n_grid: points of the scale grid search (alpha from 0 to 1) and step ``1 / n_grid`` of the
            clip search.
        duo_scaling: candidates ``x^alpha / w^(1 - alpha)`` (input and weight magnitudes) instead of
            the paper's ``x^alpha``; the default, as in llm-compressor and AutoAWQ.
        clip: search a per-group clipping ratio after scaling (AWQ's weight clipping; query and key
            projections are never clipped, as in every reference).
        max_shrink: the clip search tries ``max_shrink * n_grid`` ratios from 1 down in steps of
            ``1 / n_grid`` (to 0.55 for the defaults).
    """

    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    max_shrink: float = 0.5

    def __post_init__(self):
        WeightQuantFields.__post_init__(self)
        CalibrationFields.__post_init__(self)
        if self.n_grid < 3:
            raise WeightkitError(f"n_grid must be at least 3, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise WeightkitError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


class BlockStore(Protocol):
    """Where the weights of a model's blocks live when the model is not held in memory whole."""

    def load(self, prefix: str, block: nn.Module) -> None:
        """Give ``block`` (named ``prefix``) its weights before it is calibrated."""

    def save(self, prefix: str, block: nn.Module) -> None:
        """Take the quantized ``block`` away (e.g. write it out and free its memory)."""


@runtime_checkable
class ResumableStore(Protocol):
    """A :class:`BlockStore` that also keeps each finished block, so an interrupted run can resume.

    The walk asks :meth:`restore` before calibrating a block: a block finished by an earlier run is put
    back as it was finished (without reading or calibrating anything), with the outputs it passed on;
    after calibrating a block, the walk hands it to :meth:`record`. Then it goes to :meth:`save` as usual.
    """

    def restore(self, prefix: str, block: nn.Module) -> tuple[bool, list[Tensor] | None]:
        """``(True, outputs)`` when ``block`` was finished earlier and is now restored (``outputs``: its
        outputs for the next block, None for a last block), else ``(False, None)``."""

    def record(self, prefix: str, block: nn.Module, outputs: list[Tensor] | None) -> None:
        """Keep the finished ``block`` and its ``outputs`` (the next block's inputs; None for a last
        block)."""


def calibration_batches(config: CalibrationFields, data, tokenizer) -> list[dict[str, Tensor]]:
    """Tokenized calibration batches from ``data``: ``None`` (stdlib docstrings), a path, a list of
    texts, or already tokenized batches (dicts with ``input_ids`` and ``attention_mask``)."""
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data
    if tokenizer is None:
        raise WeightkitError("calibration text needs the model's tokenizer (pass tokenizer=...)")
    if isinstance(data, list):
        texts = data[: config.calib_samples]
        if not texts:
            raise WeightkitError("no calibration text: the list of texts is empty")
    else:
        texts = calibration_texts(data, config.calib_samples, seed=config.seed)
    return tokenize_batches(
        tokenizer,
        texts,
        max_length=config.calib_max_length,
        batch_size=config.calib_batch_size,
        by_length=True,
    )


def _block_lists(model: nn.Module, label: str) -> list[tuple[str, nn.ModuleList]]:
    """The lists of blocks a calibrated method walks (an encoder-decoder's encoder, then its decoder),
    refusing models it cannot calibrate on text."""
    if model_task(model.config.to_dict()) == "vision":
        raise WeightkitError(f"{label} calibrates on text; an image model can be compressed with method rtn")
    return block_lists(model)


def _plan(
    lists: list[tuple[str, nn.ModuleList]], linears: dict[str, nn.Module]
) -> list[list[tuple[str, nn.Module, dict]]]:
    """Per list of blocks, ``(prefix, block, {relative name: linear})`` for each block, in order."""
    plans, seen = [], set()
    for name, blocks in lists:
        plan = []
        for i, block in enumerate(blocks):
            head = f"{name}.{i}."
            inner = {n[len(head) :]: m for n, m in linears.items() if n.startswith(head)}
            seen.update(head + n for n in inner)
            plan.append((f"{name}.{i}", block, inner))
        plans.append(plan)
    outside = sorted(set(linears) - seen)
    if outside:
        raise WeightkitError(
            f"calibrated methods quantize layers inside transformer blocks only; {', '.join(outside[:5])} "
            f"lie outside (add them to ignore, or use method rtn)"
        )
    return plans


def _front(model: nn.Module, excluded: list[nn.ModuleList]) -> list[nn.Module]:
    """The parts of the model outside the ``excluded`` lists of blocks (embeddings, rotary embeddings,
    final norm ..., and an encoder-decoder's encoder when its decoder blocks are next): what computes the
    next list's first inputs, without the head of a bare backbone's wrapper."""
    base = getattr(model, "base_model", model)

    def holds(module: nn.Module) -> bool:
        return any(m is blocks for m in module.modules() for blocks in excluded)

    def outside(module: nn.Module) -> list[nn.Module]:
        parts = []
        for child in module.children():
            if any(child is blocks for blocks in excluded):
                continue
            parts += outside(child) if holds(child) else [child]
        return parts

    return outside(base)


def _device_of(modules: list[nn.Module]) -> torch.device:
    tensors = (t for m in modules for t in (*m.parameters(), *m.buffers()))
    return next((t.device for t in tensors), torch.device("cpu"))


def _warn_if_scarce(label: str, batches: list[dict[str, Tensor]], linears: dict[str, nn.Module]) -> None:
    """Warn when the calibration tokens are fewer than the widest selected layer's input features.

    Below that, a layer's input statistics have rank at most the token count: they cannot tell which
    input directions matter for every weight, so the method leans on its fallback (GPTQ's Hessian
    shrinkage, AWQ's identity scale and unclipped range), i.e. toward round-to-nearest; Wanda's and
    SparseGPT's masks rest on the same too-few tokens.
    """
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    name, widest = max(((n, m.in_features) for n, m in linears.items()), key=lambda item: item[1])
    if tokens < widest:
        warnings.warn(
            f"{label}: the calibration data has {tokens} tokens, fewer than the {widest} inputs of {name}; "
            f"give at least {widest} tokens (more or longer texts). With fewer, its input statistics are "
            f"rank-deficient and the result stays close to round-to-nearest (for GPTQ/AWQ) or rests on too "
            f"few tokens (for Wanda/SparseGPT's masks).",
            stacklevel=6,  # the caller of compress() or compress_checkpoint()
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with every module of ``model`` in eval mode (no dropout: the captured inputs, any targets and
    the outputs for the next block all see the same deterministic model); each module's mode is restored
    after, also after an error."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _walk_blocks(
    model, config, data, tokenizer, progress, label, quantize_block, store, device, linears=None
) -> nn.Module:
    """See :func:`_walk_blocks_in_eval_mode`; run with the model in eval mode (a model in training mode would
    calibrate with dropout on), its modules' modes restored after."""
    with _eval_mode(model):
        return _walk_blocks_in_eval_mode(
            model, config, data, tokenizer, progress, label, quantize_block, store, device, linears
        )


def _walk_blocks_in_eval_mode(
    model, config, data, tokenizer, progress, label, quantize_block, store, device, linears=None
) -> nn.Module:
    """Shared block walk: quantize each block's layers and pass the block's outputs on to the next.

    ``quantize_block(prefix, block, groups, inputs, device, last)`` gets the block's selected layers as
    a list of input groups (``{relative name: linear}``, in call order) and returns ``(quantized,
    outputs)``: each layer's quantized weight and the block's outputs for the next block (``None`` for
    the ``last`` block of its list, whose outputs nobody needs). A ``store`` (see :class:`BlockStore`)
    fills each block's weights just before it is needed and takes it away after; a
    :class:`ResumableStore` also keeps each finished block, and gives back those an earlier run finished.

    An encoder-decoder's lists are walked in turn: the decoder's first inputs are captured by running the
    model, its encoder already quantized (so the decoder calibrates on what it will see), on the
    calibration text as both input and target. The encoder's blocks stay in memory until the end for
    that. Arguments a list's first block computes for the others (T5's position biases,
    :attr:`weightkit.arch.BlockLayout.carries`) are taken from its full-precision outputs.

    With a ``device``, the front part of the model runs there to capture the first inputs, and each
    block is moved there while it is calibrated; the model is left where it was. Without one, each
    part runs where it is.

    ``linears`` are the layers to calibrate (default: the quantization config's
    :func:`~weightkit.compress.quant.module.selected_linears`). A method that changes a layer's weight in
    place (pruning) returns no quantized weight for it, and the layer stays a plain ``nn.Linear``.
    """
    lists = _block_lists(model, label)
    if linears is None:
        linears = selected_linears(model, config)
    plans = _plan(lists, linears)
    batches = calibration_batches(config, data, tokenizer)
    _warn_if_scarce(label, batches, linears)
    config_dict = model.config.to_dict()
    if model_task(config_dict) == "seq2seq":  # the decoder learns to give back its input
        batches = [{**batch, "labels": batch["input_ids"]} for batch in batches]
    kept = []  # blocks of lists before the last: the next list's inputs are computed through them
    for k, ((name, blocks), plan) in enumerate(zip(lists, plans, strict=True)):
        front = _front(model, [b for _, b in lists[k:]])
        capture_on = device or _device_of(front)
        with borrowed(front, capture_on):
            inputs = capture_block_inputs(model, blocks[0], batches, capture_on)
        layout = block_layout(config_dict, name)
        caption = label if len(lists) == 1 else f"{label} {name}"
        for i, (prefix, block, inner) in enumerate(track(plan, caption, enabled=progress)):
            resumable = isinstance(store, ResumableStore)
            restored, outputs = store.restore(prefix, block) if resumable else (False, None)
            if restored:
                inputs.hidden = outputs
            else:
                if store is not None:
                    store.load(prefix, block)
                here = device or _device_of([block])
                with block_on(block, here):
                    if i == 0 and layout is not None and layout.carries:
                        carry_outputs(block, inputs, layout.carries, here)
                    groups = (
                        [{n: inner[n] for n in g} for g in input_groups(block, inner, inputs, here)]
                        if inner
                        else []
                    )
                    last = i == len(plan) - 1
                    done, inputs.hidden = quantize_block(prefix, block, groups, inputs, here, last)
                    for rel, quantized in done.items():
                        quantize_linear(block, rel, quantized)
                if resumable:
                    store.record(prefix, block, inputs.hidden)
            if store is not None:
                if k == len(lists) - 1:
                    store.save(prefix, block)
                else:
                    kept.append((prefix, block))
    for prefix, block in kept:
        store.save(prefix, block)
    return model


def _first_layers(groups: list[dict[str, nn.Module]]) -> list[nn.Module]:
    return [next(iter(group.values())) for group in groups]


def _no_tokens() -> WeightkitError:
    return WeightkitError("calibration data has no tokens (all padding?)")


def _round_in_place(linear: nn.Module, quantized: QuantizedWeight | VPTQWeight) -> None:
    """Give a still-plain ``nn.Linear`` its rounded weight (fast to run; swapped when the block is done)."""
    linear.weight.data.copy_(quantized.dequantize())


def _gptq_group(prefix: str, group: dict[str, nn.Module], h: Tensor, config: GPTQConfig) -> dict:
    """GPTQ for layers that read one input (Hessian ``h``), leaving each holding its rounded weight.

    Layers with the same grid are stacked by rows into one sweep: GPTQ treats rows independently
    given ``H``, so the result is the same as one sweep per layer, in a fraction of the Python steps.
    """
    by_scheme: dict = {}  # shapes were checked against each scheme by selected_linears
    for rel in group:
        by_scheme.setdefault(config.scheme_for(f"{prefix}.{rel}"), []).append(rel)
    done = {}
    for scheme, rels in by_scheme.items():
        weights = [group[rel].weight.detach() for rel in rels]
        stacked = gptq_quantize(
            torch.cat(weights),
            h,
            scheme,
            damp=config.damp,
            block_size=config.block_size,
            act_order=config.act_order,
            keep_zeros=config.keep_zeros,
            name=" + ".join(f"{prefix}.{rel}.weight" for rel in rels),
        )
        for rel, quantized in zip(rels, stacked.split_rows([w.shape[0] for w in weights]), strict=True):
            done[rel] = quantized
            _round_in_place(group[rel], quantized)
    return done


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    config: GPTQConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    store: "BlockStore | None" = None,
    device: torch.device | None = None,
):
    """Quantize ``model`` in place with GPTQ on calibration ``data`` (see :func:`calibration_batches`).

    Groups are quantized in call order, each calibrated on the inputs the already-rounded groups
    before it produce, so later layers compensate earlier layers' error ("true sequential" in the
    paper's code). For each group every batch runs through the block, one batch at a time, only up
    to the group's first layer; a last pass gives the block's outputs. Memory therefore does not
    grow with the number of batches beyond the captured hidden states (measured cost of the partial
    passes: see ``bench/README.md``).

    Args:
        device: where to calibrate (see :func:`_walk_blocks`); ``None``: where the model is.
    """

    def quantize_block(prefix, block, groups, inputs, here, last):
        done = {}
        for group in groups:
            hessian = _group_hessian(block, group, inputs, here)
            h = hessian.value()
            if config.hessian_shrinkage:
                h = shrink_hessian(h, hessian.count)
            done.update(_gptq_group(prefix, group, h, config))
        return done, None if last else run_batches(block, inputs, here)

    return _walk_blocks(model, config, data, tokenizer, progress, "GPTQ", quantize_block, store, device)


def _group_hessian(block: nn.Module, group: dict[str, nn.Module], inputs, here: torch.device) -> Hessian:
    """The Hessian of the input a group's layers share, over every calibration batch run through the block
    (as it is now: the groups before hold their rounded weights) up to the group's first layer."""
    first = next(iter(group.values()))
    hessian = Hessian()
    run_batches(block, inputs, here, modules=[first], on_input=lambda _i, x: hessian.add(x), until=first)
    if not hessian.count:
        raise _no_tokens()
    return hessian


@torch.no_grad()
def quantize_vptq(
    model: nn.Module,
    config: VPTQConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    store: "BlockStore | None" = None,
    device: torch.device | None = None,
):
    """Quantize ``model`` in place with VPTQ on calibration ``data`` (see :func:`calibration_batches`):
    every selected layer becomes a ``VPTQLinear``.

    As :func:`quantize_gptq`, group by group in call order, each on the inputs the groups before it (already
    rounded) produce: per group one Hessian of the shared input, and each layer of the group gets its own
    codebooks (:func:`~weightkit.compress.quant.vptq.vptq_quantize`; the vector length and codebook size
    from ``config.scheme_for(name).spec_for(shape)``, checked for every layer before any work). No Hessian
    shrinkage: the paper's Hessian, dampened by ``config.damp``.

    Args:
        device: where to calibrate (see :func:`_walk_blocks`); ``None``: where the model is.
    """

    def quantize_block(prefix, block, groups, inputs, here, last):
        done = {}
        for group in groups:
            h = _group_hessian(block, group, inputs, here).value()
            for rel, linear in group.items():
                name = f"{prefix}.{rel}.weight"
                weight = linear.weight.detach()
                done[rel] = vptq_quantize(
                    weight,
                    h,
                    config.scheme_for(f"{prefix}.{rel}").spec_for(tuple(weight.shape), name),
                    damp=config.damp,
                    block_size=config.block_size,
                    act_order=config.act_order,
                    kmeans_iterations=config.kmeans_iterations,
                    seed=config.seed,
                    name=name,
                )
                _round_in_place(linear, done[rel])
        return done, None if last else run_batches(block, inputs, here)

    return _walk_blocks(model, config, data, tokenizer, progress, "VPTQ", quantize_block, store, device)


def _fold_for(block_folds: list[Fold], group: dict[str, nn.Module]) -> Fold | None:
    """The fold whose readers are exactly ``group`` (AWQ's scale goes into its source), if any."""
    return next((fold for fold in block_folds if set(fold.readers) == set(group)), None)


def _divide_output(block: nn.Module, fold: Fold, s: Tensor) -> None:
    """Divide the output channels of ``fold``'s source by ``s``: a norm's affine weight (``offset + w``
    for Gemma's norms) and bias, or a linear layer's rows (its last ``fold.last_rows`` for a fused one)."""
    op = block.get_submodule(fold.source)
    rows = slice(-fold.last_rows, None) if fold.last_rows else slice(None)
    weight = op.weight.data
    if weight.dim() == 2:
        weight[rows].div_(s.view(-1, 1).to(weight.dtype))
    else:
        s = s.to(weight.dtype)
        weight.add_(fold.norm_offset).div_(s).sub_(fold.norm_offset)
    if getattr(op, "bias", None) is not None:
        op.bias.data[rows].div_(s.to(op.bias.dtype))


# Without a layout (weightkit.arch), the layers not clipped are recognised by these name endings.
_QUERY_KEY_NAMES = ("q_proj", "k_proj", "query", "key")


def _inspected(block: nn.Module, group: dict[str, nn.Module]) -> nn.Module | None:
    """The module whose output scores a group's scales: the lowest common parent of its layers
    (``self_attn`` for q/k/v, ``mlp`` for gate/up), or ``None`` for a layer alone in its group,
    which is scored by its own output."""
    if len(group) == 1:
        return None
    parts = [name.split(".") for name in group]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return block.get_submodule(".".join(common))


@dataclass
class _AWQInputStats:
    """What AWQ keeps of one group's inputs: mean magnitude, Hessian (when the group is scored by its
    own outputs) and a token sample for the clip search."""

    sample_at: Tensor  # indices, over all calibration tokens, of the tokens kept for the clip search
    scaled: bool  # whether the group gets a scale search (needs the input magnitudes)
    needs_hessian: bool  # scored through its inputs' Hessian (a layer alone in its group)
    hessian: Hessian = field(default_factory=Hessian)
    count: int = 0
    abs_sum: Tensor | float = 0.0
    sample: list[Tensor] = field(default_factory=list)

    def add(self, x: Tensor) -> None:
        start = self.count
        self.count += x.shape[0]
        if self.scaled:
            self.abs_sum = self.abs_sum + x.float().abs().sum(dim=0)
        if self.needs_hessian:
            self.hessian.add(x)
        at = self.sample_at[(self.sample_at >= start) & (self.sample_at < self.count)] - start
        self.sample.append(x[at.to(x.device)].float())


def _real(output, rows: Tensor) -> Tensor:
    """A module's (first) output as ``[real tokens, features]`` in float32."""
    out = output[0] if isinstance(output, tuple) else output
    return out.reshape(-1, out.shape[-1]).index_select(0, rows).float()


def _module_losses(
    block: nn.Module,
    inputs,
    here: torch.device,
    module: nn.Module,
    layers: list[nn.Module],
    candidates: list[list[Tensor]],
) -> Tensor:
    """Output errors of a group's scale candidates, measured at the output of ``module``.

    ``candidates[k]`` holds the weights (``RTN(W * s) / s`` for candidate ``k``) of the group's
    ``layers``. Every batch runs through the block in full precision up to ``module``, which then runs
    on the batch's inputs once as it is and once per candidate with the layers holding the candidate
    weights; the squared differences on real tokens are summed. That is the reference code's loss over
    all calibration samples, with one batch's activations alive at a time.
    """
    losses = torch.zeros(len(candidates), dtype=torch.float64)
    batch = [-1]

    def next_batch(_module, _args):
        batch[0] += 1

    def score(_module, args, kwargs):
        rows = inputs.token_rows(batch[0], here)
        # forward() rather than the module itself: its hooks (this one) must not run again.
        reference = _real(module.forward(*args, **kwargs), rows)
        originals = [m.weight.data for m in layers]
        try:
            for k, weights in enumerate(candidates):
                for m, w in zip(layers, weights, strict=True):
                    m.weight.data = w
                losses[k] += float((_real(module.forward(*args, **kwargs), rows) - reference).square().sum())
        finally:
            for m, w in zip(layers, originals, strict=True):
                m.weight.data = w

    handles = [
        block.register_forward_pre_hook(next_batch),
        module.register_forward_pre_hook(score, with_kwargs=True),
    ]
    try:
        run_batches(block, inputs, here, until=module)
    finally:
        for handle in handles:
            handle.remove()
    return losses


@torch.no_grad()
def quantize_awq(
    model: nn.Module,
    config: AWQConfig,
    *,
    data=None,
    tokenizer=None,
    progress: bool = True,
    store: "BlockStore | None" = None,
    device: torch.device | None = None,
):
    """Quantize ``model`` in place with AWQ on calibration ``data`` (see :func:`calibration_batches`).

    Per block, as the reference code: one pass in full precision gives every group's input
    statistics and the block's outputs for the next block (the full-precision outputs, as in the
    references). The scales of each group are searched by the error at the output of the module
    the group feeds (:func:`_inspected`; a second full-precision pass runs those modules per
    candidate, one batch at a time) or, for a layer alone, through its inputs' Hessian; all scales
    are searched on the unscaled block and then folded (a fold may reach into another group's layer,
    e.g. v_proj for o_proj, so nothing may be rounded before). Then every layer but the query and
    key projections gets the clip search, and every layer is rounded.

    Args:
        device: where to calibrate (see :func:`_walk_blocks`); ``None``: where the model is.
    """

    def quantize_block(prefix, block, groups, inputs, here, last):
        layout = layouts[prefix.rpartition(".")[0]]
        tokens = sum(int(mask.sum()) for mask in inputs.token_masks)
        if tokens == 0:
            raise _no_tokens()
        if not groups:
            return {}, None if last else run_batches(block, inputs, here)
        block_folds = folds(layout, block) if layout else []
        group_folds = [_fold_for(block_folds, group) for group in groups]
        parents = [
            None if fold is None else _inspected(block, g)
            for g, fold in zip(groups, group_folds, strict=True)
        ]
        sample_at = even_sample(tokens, CLIP_SAMPLE_TOKENS)
        stats = [
            _AWQInputStats(sample_at, scaled=fold is not None, needs_hessian=bool(fold) and parent is None)
            for fold, parent in zip(group_folds, parents, strict=True)
        ]
        firsts = _first_layers(groups)
        outputs = run_batches(
            block,
            inputs,
            here,
            modules=firsts,
            on_input=lambda i, x: stats[i].add(x),
            until=firsts[-1] if last else None,
        )
        schemes = [[config.scheme_for(f"{prefix}.{rel}") for rel in group] for group in groups]

        chosen = {}
        for i, (group, fold, parent) in enumerate(zip(groups, group_folds, parents, strict=True)):
            if fold is None:
                continue
            weights = [m.weight.detach() for m in group.values()]
            magnitude = stats[i].abs_sum / stats[i].count
            name = f"{prefix}.{' + '.join(group)}"
            if parent is None:
                chosen[i] = awq_search_scales(
                    stats[i].hessian.value(),
                    magnitude,
                    weights,
                    schemes[i],
                    n_grid=config.n_grid,
                    duo_scaling=config.duo_scaling,
                    name=name,
                ).scales
                continue
            # Scored at the module's output, one group at a time: its n_grid candidates' weights are
            # rounded once and held (one group's weights n_grid times), the calibration batches streamed.
            w_magnitude = weight_magnitude(weights, schemes[i]) if config.duo_scaling else None
            scales = [c.scales for c in scale_candidates(magnitude, w_magnitude, n_grid=config.n_grid)]
            candidates = [
                [
                    scaled_rtn(w, s, scheme, name).to(w.dtype)
                    for w, scheme in zip(weights, schemes[i], strict=True)
                ]
                for s in scales
            ]
            losses = _module_losses(block, inputs, here, parent, list(group.values()), candidates)
            chosen[i] = scales[int(losses.argmin())]  # argmin: the first of equal minima
            del candidates

        samples = [torch.cat(st.sample) for st in stats]
        for i, s in chosen.items():
            _divide_output(block, group_folds[i], s)
            for m in groups[i].values():
                m.weight.data.mul_(s.to(m.weight.dtype))
            samples[i] = samples[i] / s
        done = {}
        for x, group, group_schemes in zip(samples, groups, schemes, strict=True):
            for (rel, linear), scheme in zip(group.items(), group_schemes, strict=True):
                name = f"{prefix}.{rel}.weight"
                w = linear.weight.detach()
                query_key = rel in layout.query_key if layout else rel.endswith(_QUERY_KEY_NAMES)
                if config.clip and not query_key:
                    ratio = awq_search_clip(
                        w, x, scheme, n_grid=config.n_grid, max_shrink=config.max_shrink, name=name
                    )
                    w = clip_weight(w, ratio, scheme)
                done[rel] = rtn_quantize(w, scheme, name=name)
                _round_in_place(linear, done[rel])
        return done, outputs

    layouts = {
        name: block_layout(model.config.to_dict(), name, purpose="AWQ's scaling folds and clipping")
        for name, _ in _block_lists(model, "AWQ")
    }
    return _walk_blocks(model, config, data, tokenizer, progress, "AWQ", quantize_block, store, device)


register("compress", "gptq", GPTQConfig, quantize_gptq)
register("compress", "awq", AWQConfig, quantize_awq)
register("compress", "vptq", VPTQConfig, quantize_vptq)
