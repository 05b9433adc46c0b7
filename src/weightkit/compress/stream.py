"""Compress a checkpoint directory into a new one without holding the whole model in memory.

DESIGN rule 4: the model is built with its parameters on the meta device, and weights are read from the
safetensors files only when needed. RTN, FP8, FP4 and ternary read, quantize and write one tensor at a
time; SVD and WeLore read each selected weight twice, once for its singular values and, once every rank
is chosen from all of them, again to factor it. GPTQ, AWQ, VPTQ, FlexRound and BitStack hold the embeddings
and the other tensors outside the transformer blocks, plus *one* block: a block's weights are read just before
it is calibrated, and once it is quantized it is written to the output and its memory is freed. Recursive
layer tying reads one linear of every block at a time (each shared weight is made from the layers it
serves). GWQ needs the gradient of the whole model's loss, so it loads the model whole; so do dictionary
sharing (it fits one projection of every block at once) and FoldGPT (it removes and ties whole blocks). The
output equals ``compress`` on the loaded model followed by ``save_quantized`` (tested), written atomically.

**Resuming** (``resume=True``; the state lives in ``<out_dir>.partial/``, see
:class:`weightkit.checkpoint.partial.PartialRun`):

- RTN, FP8, FP4 and ternary: the unit is an output shard, as for merges. A resumed run neither reads nor
  quantizes the weights whose stored tensors are all in finished shards; the layer each of them becomes
  (its type and scheme, which ``config.json`` describes) is had by quantizing a zero tensor of its shape,
  as the layer depends on the config and the shape only.
- GPTQ, AWQ, SparseGPT and Wanda: the unit is a block. Each finished block is kept whole (its state,
  quantized layers included, and each quantized layer's scheme) with its outputs for the next block.
  A resumed run puts the finished blocks back without calibrating them, takes the last one's outputs as
  the next block's inputs, and writes the output from the start. The outputs are stored rather than
  recomputed by replaying the calibration data through the finished blocks: stored, they are the very
  tensors the run would have passed on, with nothing to prove about the replay; they cost one file of
  the size of the captured hidden states (``samples x tokens x hidden size`` floats), replaced at each
  block.
- Other methods (low rank, pruning by magnitude, recursive sharing, whole-model methods, stages) are not
  resumable: ``resume=True`` is refused by name, and a killed run starts again.
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weightkit.arch import block_layout, block_lists, model_task
from weightkit.checkpoint import CheckpointReader, CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.durable import fsync
from weightkit.checkpoint.manifest import data_files
from weightkit.checkpoint.partial import PartialRun, partial_path
from weightkit.checkpoint.writer import check_target
from weightkit.compress.lowrank import BitStackConfig, SVDConfig, WeLoreConfig
from weightkit.compress.lowrank.factor import factor_streamed
from weightkit.compress.model import compress
from weightkit.compress.prune.core import SPARSITY_FILE, PruneFields, measured_sparsity, selected_prunable
from weightkit.compress.prune.magnitude import MagnitudeConfig
from weightkit.compress.prune.random import RandomConfig
from weightkit.compress.prune.sparsegpt import SparseGPTConfig
from weightkit.compress.prune.stages import compress_stages, pruned_source, sparsity_of
from weightkit.compress.prune.wanda import WandaConfig
from weightkit.compress.quant.calibrated import AWQConfig, GPTQConfig
from weightkit.compress.quant.config import CalibrationFields
from weightkit.compress.quant.export import write_generation_config
from weightkit.compress.quant.fp import FP4Config, FP8Config
from weightkit.compress.quant.gwq import GWQConfig, require_causal_lm
from weightkit.compress.quant.module import quantize_linear, selected_linears
from weightkit.compress.quant.rtn import RTNConfig
from weightkit.compress.quant.ternary import TernaryConfig
from weightkit.compress.share.dictionary import DictionaryConfig
from weightkit.compress.share.foldgpt import FoldGPTConfig
from weightkit.errors import WeightkitError
from weightkit.models import CheckpointNames, load_tokenizer, model_auto_class, skeleton
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import check_exportable, refuse_quantized
from weightkit.quantized.formats import (
    LAYER_FORMATS,
    export_tensors,
    plain_model_config,
    quantized_model_config,
    stored_tensors,
)
from weightkit.quantized.grid import QuantizedWeight, QuantScheme
from weightkit.quantized.linear import QuantizedLinear, quantized_layer
from weightkit.registry import config_to_dict, entry_for_config
from weightkit.runtime.device import resolve_device

__all__ = ["compress_checkpoint"]

# Methods that quantize each weight on its own, without data: streamed one tensor at a time.
_TENSOR_WISE = (RTNConfig, FP8Config, FP4Config, TernaryConfig)
# Methods that choose every weight's rank from all the weights' spectra: streamed in two passes.
_LOW_RANK = (SVDConfig, WeLoreConfig)
# Pruning methods that need no data: streamed one tensor at a time too.
_PRUNED_TENSOR_WISE = (MagnitudeConfig, RandomConfig)
# Calibrated methods a run can resume block by block: their blocks hold plain or QuantizedLinear layers.
_RESUMABLE_BLOCKWISE = (GPTQConfig, AWQConfig, SparseGPTConfig, WandaConfig)


class _SparsityRecorder:
    """A checkpoint writer's ``add`` that also measures the sparsity of the pruned layers' weights."""

    def __init__(self, writer: CheckpointWriter, layers: list[str]):
        self.writer = writer
        self.weights = {f"{name}.weight": name for name in layers}
        self.measured: dict[str, tuple[float, int]] = {}  # layer -> (fraction of zeros, weights)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weights:
            self.measured[self.weights[name]] = (measured_sparsity(tensor), tensor.numel())
        self.writer.add(name, tensor)

    def record(self, method: str, config: PruneFields) -> dict:
        """``sparsity.json``: the method, the pattern, and the measured fraction of zeros of each pruned
        layer and of all of them together (``global_sparsity``, weighted by their sizes)."""
        zeros = sum(fraction * size for fraction, size in self.measured.values())
        size = sum(size for _, size in self.measured.values())
        return {
            "method": method,
            "sparsity": config.sparsity,
            "structure": config.structure,
            "global_sparsity": round(zeros / size, 6),
            "layers": {name: round(fraction, 6) for name, (fraction, _) in self.measured.items()},
        }


def _stream_pruned(
    model: nn.Module, config: PruneFields, streamed: "_StreamedModel", progress: bool, device: torch.device
) -> None:
    """Magnitude/random pruning one tensor at a time: each selected weight is read, pruned on ``device`` by
    ``config.prune_weight`` and written in its own dtype; every other tensor is copied."""
    weights = {f"{name}.weight": name for name in selected_prunable(model, config)}

    def write(name: str, tensor: torch.Tensor) -> bool:
        if name not in weights:
            return False
        pruned = config.prune_weight(tensor.to(device), weights[name])
        streamed.writer.add(name, pruned.to("cpu", tensor.dtype))
        return True

    streamed.rewrite(config.LABEL, progress, write)


class _StreamedModel:
    """Fills a meta-device model's modules from a checkpoint, and writes and frees them when done."""

    def __init__(
        self,
        model: nn.Module,
        reader: CheckpointReader,
        writer: CheckpointWriter,
        names: CheckpointNames,
        blocks: "_BlockJournal | None" = None,
    ):
        self.model, self.reader, self.writer, self.names = model, reader, writer, names
        # The model's tensors whose stored form an earlier run of this output wrote: :meth:`rewrite`
        # neither reads nor writes them.
        self.done: set[str] = set(getattr(writer, "resumed", ()))
        self.blocks = blocks  # a calibrated run's finished blocks, when it can resume

    def read(self, model_name: str) -> torch.Tensor | None:
        ckpt_name = self.names.to_ckpt(model_name)
        if ckpt_name not in self.reader:
            return None
        return self.reader.get_finite(ckpt_name)

    def load(self, prefix: str, module: nn.Module, *, skip: tuple[str, ...] = ()) -> None:
        """Read ``module``'s (named ``prefix``) parameters and saved buffers, except under ``skip``."""
        head = f"{prefix}." if prefix else ""
        skip = tuple(f"{s}." for s in skip)
        state = {}
        for name in module.state_dict():
            if name.startswith(skip):
                continue
            tensor = self.read(head + name)
            if tensor is not None:
                state[name] = tensor
        module.load_state_dict(state, strict=False, assign=True)
        if module is self.model:
            # A tied lm_head is stored once, as the embeddings: point it at them before checking
            # what is missing (it is the same tensor, not a lack of one).
            self.model.tie_weights()
        missing = [head + n for n, p in module.named_parameters() if p.is_meta and not n.startswith(skip)]
        if missing:
            raise WeightkitError(
                f"{self.reader.path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                f"{', '.join(missing[:5])}"
            )

    def rewrite(self, label: str, progress: bool, write: Callable[[str, torch.Tensor], bool]) -> None:
        """Write every tensor of the checkpoint to the output, one at a time in the model's order: each goes
        first to ``write(name, tensor)``, which writes a selected weight in its compressed form itself and
        returns True; any other tensor is copied as it is."""
        for name in track(list(self.model.state_dict()), label, enabled=progress):
            if name in self.done:
                continue
            tensor = self.read(name)
            if tensor is None:
                continue  # a buffer the model computes itself, or a tied weight stored once
            if not write(name, tensor):
                self.writer.add(name, tensor)

    def save(self, prefix: str, block: nn.Module) -> None:
        """Write a quantized block to the output and free its memory."""
        for name, tensor in export_tensors(block, f"{prefix}."):
            self.writer.add(name, tensor)
        block.to("meta")

    def restore(self, prefix: str, block: nn.Module) -> tuple[bool, list[torch.Tensor] | None]:
        """See :class:`~weightkit.compress.quant.calibrated.ResumableStore`."""
        return (False, None) if self.blocks is None else self.blocks.restore(prefix, block)

    def record(self, prefix: str, block: nn.Module, outputs: list[torch.Tensor] | None) -> None:
        """See :class:`~weightkit.compress.quant.calibrated.ResumableStore`."""
        if self.blocks is not None:
            self.blocks.record(prefix, block, outputs)


class _BlockJournal:
    """The finished blocks of a calibrated run, kept in its partial directory (the unit is a block).

    Each block is one safetensors file of its state after calibration (a ``QuantizedLinear``'s grid
    values, scales and zero points, pruned weights, AWQ's rescaled norms ...), recorded with the scheme of
    each quantized layer; the last finished block's outputs (the next block's inputs) are a file of their
    own, replaced by the next block's once that block is recorded.
    """

    def __init__(self, partial: PartialRun):
        self.partial = partial
        self.units = {unit["prefix"]: unit for unit in partial.units}
        self.last = partial.units[-1]["prefix"] if partial.units else None
        outputs = partial.units[-1]["outputs"] if partial.units else None
        if outputs is not None and not partial.file(outputs).is_file():
            raise WeightkitError(
                f"cannot resume from {partial.path}: {outputs}, the inputs of the next block, is missing; "
                f"delete {partial.path} and run without --resume"
            )

    def restore(self, prefix: str, block: nn.Module) -> tuple[bool, list[torch.Tensor] | None]:
        unit = self.units.get(prefix)
        if unit is None:
            return False, None
        state = load_file(self.partial.file(unit["file"]))
        for rel, scheme in unit["layers"].items():
            zero_point = state.get(f"{rel}.weight_zero_point")
            grid = QuantizedWeight(
                state[f"{rel}.qweight"], state[f"{rel}.weight_scale"], zero_point, QuantScheme(**scheme)
            )
            quantize_linear(block, rel, grid)
        block.load_state_dict(state, strict=True, assign=True)
        if prefix != self.last or unit["outputs"] is None:
            return True, None  # the blocks after it were restored too, or it is a last block
        outputs = load_file(self.partial.file(unit["outputs"]))
        return True, [outputs[f"batch{b}"] for b in range(len(outputs))]

    def record(self, prefix: str, block: nn.Module, outputs: list[torch.Tensor] | None) -> None:
        layers = {}
        for rel, module in block.named_modules():
            if type(module) is QuantizedLinear:
                layers[rel] = asdict(module.scheme)
            elif isinstance(module, tuple(LAYER_FORMATS)):  # what restore could not rebuild
                raise WeightkitError(
                    f"{prefix}.{rel} is a {type(module).__name__}: a resumable run keeps QuantizedLinear "
                    "layers only"
                )
        number = len(self.partial.units) + 1
        state = {name: tensor.detach().cpu().clone() for name, tensor in block.state_dict().items()}
        file = self._save(f"block-{number:05d}.safetensors", state)
        saved = None
        if outputs is not None:
            saved = self._save(
                f"outputs-{number:05d}.safetensors", {f"batch{b}": t for b, t in enumerate(outputs)}
            )
        previous = self.partial.units[-1]["outputs"] if self.partial.units else None
        self.partial.journal({"file": file, "prefix": prefix, "layers": layers, "outputs": saved})
        if previous is not None:  # only the last block's outputs are needed
            self.partial.file(previous).unlink(missing_ok=True)

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        path = self.partial.file(name)
        save_file({k: t.contiguous() for k, t in tensors.items()}, path)
        fsync(path)
        return name


def _stream_tensor_wise(
    model: nn.Module,
    config: RTNConfig | FP8Config | FP4Config | TernaryConfig,
    streamed: _StreamedModel,
    progress: bool,
    device: torch.device,
) -> None:
    """RTN/FP8/FP4/ternary one tensor at a time: each selected weight is read, quantized on ``device`` by
    ``config.quantize_weight`` (as :func:`~weightkit.compress.quant.module.quantize_each_weight` does in
    memory), packed and written."""
    linears = selected_linears(model, config)
    weights = {f"{name}.weight": name for name in linears}
    done = streamed.done
    if done:
        for name, module_name in weights.items():
            ckpt_name = streamed.names.to_ckpt(name)
            shape, dtype = streamed.reader.shape(ckpt_name), streamed.reader.dtype(ckpt_name)
            zero = config.quantize_weight(torch.zeros(shape, dtype=dtype), module_name, name)
            if {f"{module_name}.{suffix}" for suffix in stored_tensors(zero, None)} <= done:
                model.set_submodule(module_name, quantized_layer(zero, linears[module_name].bias).to("meta"))
                done.add(name)  # written by the earlier run: rewrite skips it

    def write(name: str, tensor: torch.Tensor) -> bool:
        module_name = weights.get(name)
        if module_name is None:
            return False
        quantized = config.quantize_weight(tensor.to(device), module_name, name)
        # The bias is a tensor of its own in the checkpoint (written under the same name); the
        # meta-device layer stays in the model so the config can describe it.
        for suffix, packed in stored_tensors(quantized, None).items():
            if f"{module_name}.{suffix}" not in done:  # a shard boundary may split a layer's tensors
                streamed.writer.add(f"{module_name}.{suffix}", packed)
        model.set_submodule(module_name, quantized_layer(quantized, linears[module_name].bias).to("meta"))
        return True

    streamed.rewrite(config.LABEL, progress, write)


def _needs_whole_model(config) -> bool:
    """GWQ (the gradient of the whole model's loss), dictionary sharing (one projection of every block fitted
    at once; it could stream those L matrices per projection type, not done yet), FoldGPT (it removes and
    ties whole blocks) and BitStack with the paper's perplexity importance (the whole decomposed model
    evaluated per block) cannot go block by block."""
    return isinstance(config, GWQConfig | DictionaryConfig | FoldGPTConfig) or (
        isinstance(config, BitStackConfig) and config.importance == "perplexity"
    )


def _compress_whole(model_dir: Path, auto_cls, config, data, tokenizer, progress, device) -> nn.Module:
    """The model of ``model_dir`` loaded whole by transformers and compressed in memory.

    For GWQ, whose gradients are of the whole model's loss, and for checkpoints some of whose tensors
    transformers merges into one parameter when it loads them (a mixture of experts' experts, fused into
    3-D parameters by transformers 5): they have no one-to-one name in the model to stream by. The output
    holds the tensors under the model's names, which transformers and :func:`weightkit.load` read back as
    they are.
    """
    model = auto_cls.from_pretrained(model_dir, local_files_only=True, dtype="auto").eval()
    return compress(model, config, data, tokenizer=tokenizer, progress=progress, device=device)


def _output_config(model: nn.Module, config) -> dict:
    """``config.json`` of the output: with its ``quantization_config``, except for a model that FoldGPT only
    removed blocks from (no shared layers): a plain checkpoint with fewer layers that any loader reads."""
    removed_only = not any(isinstance(m, tuple(LAYER_FORMATS)) for m in model.modules())
    if isinstance(config, FoldGPTConfig) and removed_only:
        return plain_model_config(model)
    return quantized_model_config(model)


def _resumable_unit(config, model: nn.Module, names: CheckpointNames) -> str | None:
    """What a resumable run of ``config`` on ``model`` keeps as it goes ("shard" or "block"), or None for
    a run that cannot resume (see the module docstring)."""
    if names.fused or _needs_whole_model(config):
        return None
    if isinstance(config, _TENSOR_WISE):
        return "shard"
    if isinstance(config, _RESUMABLE_BLOCKWISE):
        # One list of blocks whose first block passes nothing on: an encoder-decoder's decoder is
        # calibrated on inputs computed through its encoder, T5's blocks on the first one's position biases.
        lists = block_lists(model)
        layout = block_layout(model.config.to_dict(), lists[0][0]) if len(lists) == 1 else None
        if len(lists) == 1 and not (layout is not None and layout.carries):
            return "block"
    return None


def _data_setting(data) -> str | dict | None:
    """Calibration ``data`` as a resumed run compares it: a path or dataset name, or the texts' hash."""
    if data is None or isinstance(data, str | os.PathLike):
        return None if data is None else str(data)
    if isinstance(data, list | tuple) and all(isinstance(text, str) for text in data):
        return {"texts_sha256": hashlib.sha256(json.dumps(list(data)).encode()).hexdigest()}
    raise WeightkitError(
        "resume: calibration data given as tokenized batches cannot be compared with the interrupted run's; "
        "give it as a file or as a list of texts"
    )


def _partial_run(
    provenance: Provenance, model_dir: Path, out_dir, data, unit: str | None, resume: bool, **settings
):
    """The resumable state of a run writing ``out_dir`` in ``unit`` (None: a run that cannot resume): the
    run's settings are its manifest's config and ``settings``, its inputs the manifest's.

    Raises:
        WeightkitError: ``resume`` for a run that cannot resume; an unfinished run's state at
            ``<out_dir>.partial`` for a run that cannot take it over; what :class:`PartialRun` refuses.
    """
    method = provenance.method
    if unit is None:
        if resume:
            raise WeightkitError(
                f"{method} cannot resume on {model_dir}: runs of rtn, fp8, fp4 and ternary resume by shard, "
                "runs of gptq, awq, sparsegpt and wanda on a model with one list of blocks by block; run "
                "without --resume"
            )
        if partial_path(out_dir).exists():
            raise WeightkitError(
                f"{partial_path(out_dir)} holds an unfinished run of {out_dir}: resume it with the command "
                "that started it and --resume, or delete it"
            )
        return None
    check_target(out_dir, overwrite=settings.pop("overwrite"))  # before the partial directory is made
    calibrated = unit == "block"
    settings = {
        "verb": "compress",
        "model": str(model_dir),
        "config": provenance.config,
        "data": _data_setting(data) if calibrated else None,
        **settings,
    }
    return PartialRun(out_dir, settings=settings, inputs=list(provenance.inputs), resume=resume, unit=unit)


def compress_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config,
    data=None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    resume: bool = False,
) -> Path:
    """Compress the model in ``model_dir`` with ``config`` into the directory ``out_dir``, streamed.

    Args:
        model_dir: a Hugging Face model directory.
        out_dir: the quantized model directory to create (atomically), in the format of the layers
            ``config`` makes (:mod:`weightkit.quantized.formats`).
        config: ``RTNConfig``, ``FP8Config``, ``FP4Config``, ``TernaryConfig``, ``GPTQConfig``,
            ``AWQConfig``, ``VPTQConfig``, ``GWQConfig``, ``FlexRoundConfig``, ``SVDConfig``,
            ``WeLoreConfig``, ``RecursiveConfig``, ``DictionaryConfig``, ``FoldGPTConfig`` or
            ``BitStackConfig`` (whose ``budget_mb`` holds its decomposed layers back until every layer is
            done, see :func:`~weightkit.compress.lowrank.bitstack.compress_bitstack`).
        data: calibration data for GPTQ/AWQ/VPTQ/GWQ/FlexRound/FoldGPT/BitStack, as for
            :func:`weightkit.compress.compress`.
        progress: show progress bars.
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: largest output shard.
        allow_pickle: accept ``.bin`` pickle weights (read with ``weights_only``).
        device: where to compute: ``None`` for the GPU when there is one, else the CPU (see
            :func:`weightkit.runtime.device.resolve_device`). Weights are read to the CPU; RTN/FP8/FP4/ternary
            move one weight at a time to ``device``, GPTQ/AWQ/VPTQ/FlexRound the embeddings (to capture the
            first block's inputs) and then one block at a time, recursive one linear of every block at a
            time. GWQ (causal LMs only), dictionary sharing, FoldGPT and a checkpoint whose tensors
            transformers fuses on load (a mixture of experts) are loaded whole instead
            (:func:`_compress_whole`): GWQ's peak memory is the model plus the gradients of the selected
            weights.
        resume: continue the interrupted run recorded in ``<out_dir>.partial/`` (see the module
            docstring); without it, such a directory is refused rather than lost.

    Pruning configs (``MagnitudeConfig``, ``RandomConfig`` streamed tensor by tensor; ``WandaConfig``,
    ``SparseGPTConfig`` block by block like GPTQ) write an ordinary checkpoint in the model's dtype, its
    ``config.json`` unchanged, plus ``sparsity.json`` (the pattern and every pruned layer's measured
    sparsity). A list of configs runs them as stages (:mod:`weightkit.compress.prune.stages`): pruning
    stages, then at most one quantization stage that keeps the zeros.

    Returns:
        ``out_dir``.

    Raises:
        WeightkitError: bad input (not a model directory, a quantized checkpoint, unsupported architecture,
            NaN/Inf weights, shapes the grid cannot take, no calibration text, a grid compressed-tensors
            cannot store such as FP8 E5M2 ...); nothing is left at ``out_dir``. With ``resume``: a method
            that cannot resume, or what :class:`~weightkit.checkpoint.partial.PartialRun` refuses.
    """
    if isinstance(config, list | tuple):
        if resume:
            raise WeightkitError("a run of several stages cannot resume; run without --resume")
        return compress_stages(
            model_dir,
            out_dir,
            list(config),
            data,
            run=compress_checkpoint,
            progress=progress,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            allow_pickle=allow_pickle,
            device=device,
        )
    refuse_quantized(
        model_dir, verb="weightkit compress", instead="compress the full-precision model it was made from"
    )
    if isinstance(config, FP8Config):
        check_exportable(config.scheme_for(""), f"fp8_format {config.fp8_format!r}")
    entry = entry_for_config(config)
    device = resolve_device(device)
    model_dir = Path(model_dir)
    with CheckpointReader(model_dir, allow_pickle=allow_pickle) as reader:
        if reader.config is None:
            raise WeightkitError(f"{model_dir} has no config.json: it is not a Hugging Face model directory")
        if isinstance(config, GWQConfig):  # before loading it whole
            require_causal_lm(reader.config, str(model_dir))
        auto_cls = model_auto_class(model_task(reader.config))
        model = skeleton(model_dir, auto_cls)
        # Only methods that calibrate on text need the tokenizer.
        tokenizer = load_tokenizer(model_dir) if isinstance(config, CalibrationFields) else None
        names = CheckpointNames(model, reader.names())
        pruning = isinstance(config, PruneFields)
        source_sparsity = None if pruning else pruned_source(model_dir, config)
        pruned_layers = list(selected_prunable(model, config)) if pruning else []  # checked before writing
        full_config = config_to_dict(config)
        provenance = Provenance("compress", entry.name, full_config, (model_dir, *data_files(data)))
        unit = _resumable_unit(config, model, names)
        resumable = dict(overwrite=overwrite, max_shard_bytes=max_shard_bytes, device=str(device))
        partial = _partial_run(provenance, model_dir, out_dir, data, unit, resume, **resumable)
        with (
            partial if partial is not None else contextlib.nullcontext(),
            CheckpointWriter(
                out_dir,
                max_shard_bytes=max_shard_bytes,
                overwrite=overwrite,
                provenance=provenance,
                partial=partial if unit == "shard" else None,
            ) as out,
        ):
            writer = _SparsityRecorder(out, pruned_layers) if pruning else out
            out.copy_files(model_dir)
            settings = {k: v for k, v in full_config.items() if k != "method"}
            out.write_model_card(ModelCard("compress", entry.name, [str(model_dir)], settings))
            journal = _BlockJournal(partial) if unit == "block" else None
            streamed = _StreamedModel(model, reader, writer, names, journal)
            if names.fused or _needs_whole_model(config):  # no one-to-one names to stream by, or whole
                model = _compress_whole(model_dir, auto_cls, config, data, tokenizer, progress, device)
                for name, tensor in export_tensors(model):
                    writer.add(name, tensor)
            elif isinstance(config, _TENSOR_WISE):
                _stream_tensor_wise(model, config, streamed, progress, device)
            elif isinstance(config, _LOW_RANK):
                factor_streamed(model, config, streamed, progress, device)
            elif isinstance(config, _PRUNED_TENSOR_WISE):
                _stream_pruned(model, config, streamed, progress, device)
            else:
                blocks = tuple(name for name, _ in block_lists(model))
                streamed.load("", model, skip=blocks)
                entry.fn(
                    model,
                    config,
                    data=data,
                    tokenizer=tokenizer,
                    progress=progress,
                    store=streamed,
                    device=device,
                )
                for name, tensor in export_tensors(model, skip=blocks):
                    writer.add(name, tensor)
            write_generation_config(out, model, model_dir)
            if pruning:  # a dense checkpoint: config.json as copied
                out.write_json(SPARSITY_FILE, writer.record(entry.name, config))
            else:
                model_config = _output_config(model, config)
                if source_sparsity is not None:  # the zeros are kept: say so where compressed-tensors reads
                    model_config["quantization_config"]["sparsity_config"] = sparsity_of(source_sparsity)
                out.write_json("config.json", model_config)
        if unit == "block":  # published: the writer removes a shard run's state itself
            partial.remove()
    return Path(out_dir)
