"""GPTQ and AWQ applied to a whole model, block by block on calibration text.

The math is in ``gptq.py`` and ``awq.py`` (pure functions over tensors); this module feeds them the
activations each linear layer sees (``blockwise.py``) and swaps the layers for ``QuantizedLinear``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightkit.compress.quant.awq import awq_search_clip, awq_search_scales
from weightkit.compress.quant.blockwise import capture_block_inputs, input_groups, run_block, stream_inputs
from weightkit.compress.quant.config import CalibrationFields, WeightQuantFields
from weightkit.compress.quant.gptq import add_to_hessian, gptq_quantize
from weightkit.compress.quant.grid import QuantizedWeight, rtn_quantize
from weightkit.compress.quant.module import quantize_linear, selected_linears
from weightkit.data import calibration_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.models import model_kind, transformer_blocks
from weightkit.progress import track
from weightkit.registry import register

__all__ = ["GPTQConfig", "AWQConfig", "quantize_gptq", "quantize_awq", "calibration_batches"]


@dataclass
class GPTQConfig(WeightQuantFields, CalibrationFields):
    """GPTQ (arXiv 2210.17323): quantize column by column, pushing each rounding error onto the
    columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

    Attributes (besides the grid and calibration fields):
        damp: fraction of the mean Hessian diagonal added to its diagonal; more is more stable,
            less follows the data more closely. The paper uses 0.01.
        block_size: columns per lazy batch update (speed only, the result is the same).
        act_order: quantize the most-activated input columns first (helps at 3 bits and below).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

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
    then search a clipping range per group.

    Attributes (besides the grid and calibration fields):
        n_grid: points of the grid search over the scaling exponent alpha in [0, 1) and over clip ratios.
        clip: search a per-group clipping ratio after scaling (AWQ's weight clipping).
        max_shrink: the clip search tries ranges down to ``1 - max_shrink`` of the full range.
    """

    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5

    def __post_init__(self):
        WeightQuantFields.__post_init__(self)
        CalibrationFields.__post_init__(self)
        if self.n_grid < 1:
            raise WeightkitError(f"n_grid must be at least 1, got {self.n_grid}")
        if not 0 <= self.max_shrink < 1:
            raise WeightkitError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


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


def _blocks_with_linears(
    model: nn.Module, linears: dict[str, nn.Module]
) -> list[tuple[str, nn.Module, dict]]:
    """``(prefix, block, {relative name: linear})`` for each transformer block, in order."""
    blocks = transformer_blocks(model, model_kind(model.config.to_dict()))
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    out, seen = [], set()
    for i, block in enumerate(blocks):
        head = f"{prefix}.{i}."
        inner = {n[len(head) :]: m for n, m in linears.items() if n.startswith(head)}
        seen.update(head + n for n in inner)
        out.append((f"{prefix}.{i}", block, inner))
    outside = sorted(set(linears) - seen)
    if outside:
        raise WeightkitError(
            f"calibrated methods quantize layers inside transformer blocks only; {', '.join(outside[:5])} "
            f"lie outside (add them to ignore, or use method rtn)"
        )
    return out


def _walk_blocks(model, config, data, tokenizer, progress, label, quantize_block) -> nn.Module:
    """Shared block walk: quantize each block's layers, then compute the block's output for the next.

    ``quantize_block(prefix, block, groups, inputs)`` gets the block's selected layers as a list of
    input groups (``{relative name: linear}``, in call order), returns each layer's quantized weight,
    and leaves the layers holding their rounded weights so that the block's output is the quantized one.
    """
    linears = selected_linears(model, config)
    plan = _blocks_with_linears(model, linears)
    batches = calibration_batches(config, data, tokenizer)
    inputs = capture_block_inputs(model, plan[0][1], batches)
    for prefix, block, inner in track(plan, label, enabled=progress):
        done = {}
        if inner:
            groups = [{n: inner[n] for n in g} for g in input_groups(block, inner, inputs)]
            done = quantize_block(prefix, block, groups, inputs)
        inputs.hidden = run_block(block, inputs)
        for rel, quantized in done.items():
            quantize_linear(block, rel, quantized)
    return model


def _round_in_place(linear: nn.Module, quantized: QuantizedWeight) -> None:
    """Give a still-plain ``nn.Linear`` its rounded weight (fast to run; swapped when the block is done)."""
    linear.weight.data.copy_(quantized.dequantize())


@torch.no_grad()
def quantize_gptq(model: nn.Module, config: GPTQConfig, *, data=None, tokenizer=None, progress: bool = True):
    """Quantize ``model`` in place with GPTQ on calibration ``data`` (see :func:`calibration_batches`).

    Groups are quantized in call order, each calibrated on the inputs the already-rounded groups
    before it produce, so later layers compensate earlier layers' error.
    """

    def quantize_block(prefix, block, groups, inputs):
        done = {}
        for group in groups:
            state = [None, 0]

            def accumulate(_i, x, state=state):
                state[0], state[1] = add_to_hessian(state[0], state[1], x)

            stream_inputs(block, [next(iter(group.values()))], inputs, accumulate)
            if state[0] is None:
                raise WeightkitError("calibration data has no tokens (all padding?)")
            for rel, linear in group.items():
                name = f"{prefix}.{rel}"
                done[rel] = gptq_quantize(
                    linear.weight.detach(),
                    state[0],
                    config.scheme_for(name),
                    damp=config.damp,
                    block_size=config.block_size,
                    act_order=config.act_order,
                    name=f"{name}.weight",
                )
                _round_in_place(linear, done[rel])
        return done

    return _walk_blocks(model, config, data, tokenizer, progress, "GPTQ", quantize_block)


# The op whose output is exactly a group's input, with every layer reading it. AWQ's scale folds into
# it (its output divided by s, the readers' weight columns multiplied by s), leaving the function
# unchanged. Post-norm encoders (BERT) are absent for q/k/v and the MLP input: there the norm's
# output is also the residual, so scaling it would change the model; those layers get clipping only.
_FOLDS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.v_proj": ("self_attn.o_proj",),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.up_proj": ("mlp.down_proj",),
    "attention.self.value": ("attention.output.dense",),
}


def _fold_target(block: nn.Module, group: dict[str, nn.Module]) -> nn.Module | None:
    for source, readers in _FOLDS.items():
        if set(readers) == set(group):
            op = block.get_submodule(source)
            width = op.weight.shape[0]
            if all(m.in_features == width for m in group.values()):  # e.g. v->o fails under GQA
                return op
    return None


def _divide_output(op: nn.Module, s: Tensor) -> None:
    """Divide ``op``'s output channels by ``s`` (a norm's affine weight/bias, or a linear's rows)."""
    weight = op.weight.data
    shape = (-1, 1) if weight.dim() == 2 else (-1,)
    weight.div_(s.view(shape).to(weight.dtype))
    if getattr(op, "bias", None) is not None:
        op.bias.data.div_(s.to(op.bias.dtype))


@torch.no_grad()
def quantize_awq(model: nn.Module, config: AWQConfig, *, data=None, tokenizer=None, progress: bool = True):
    """Quantize ``model`` in place with AWQ on calibration ``data`` (see :func:`calibration_batches`).

    As in the paper's reference code, each block's inputs are captured once in full precision, the
    scales of every group are searched and folded first (a fold may reach into an earlier group's
    layer, e.g. v_proj for o_proj, so nothing may be rounded yet), then every layer is clipped and
    rounded.
    """

    def quantize_block(prefix, block, groups, inputs):
        chunks: list[list[Tensor]] = [[] for _ in groups]
        firsts = [next(iter(group.values())) for group in groups]
        stream_inputs(block, firsts, inputs, lambda i, x: chunks[i].append(x.float()))
        xs = [torch.cat(c) for c in chunks]
        if xs[0].shape[0] == 0:
            raise WeightkitError("calibration data has no tokens (all padding?)")
        for i, group in enumerate(groups):
            op = _fold_target(block, group)
            if op is None:
                continue
            scheme = config.scheme_for(f"{prefix}.{next(iter(group))}")
            weights = [m.weight.detach().float() for m in group.values()]
            s, _alpha = awq_search_scales(xs[i], weights, scheme, n_grid=config.n_grid)
            _divide_output(op, s)
            for m in group.values():
                m.weight.data.mul_(s.to(m.weight.dtype))
            xs[i] = xs[i] / s
        done = {}
        for x, group in zip(xs, groups, strict=True):
            for rel, linear in group.items():
                name = f"{prefix}.{rel}"
                scheme = config.scheme_for(name)
                w = linear.weight.detach()
                ratio = None
                if config.clip:
                    ratio = awq_search_clip(w, x, scheme, n_grid=config.n_grid, max_shrink=config.max_shrink)
                done[rel] = rtn_quantize(w, scheme, clip_ratio=ratio, name=f"{name}.weight")
                _round_in_place(linear, done[rel])
        return done

    return _walk_blocks(model, config, data, tokenizer, progress, "AWQ", quantize_block)


register("compress", "gptq", GPTQConfig, quantize_gptq)
register("compress", "awq", AWQConfig, quantize_awq)
