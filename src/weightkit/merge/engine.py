"""The merge engine: plan a merge over the union of tensor names, then stream it tensor by tensor.

Planning reads only headers and ``config.json`` files, so every mismatch (architecture, a missing
tensor, a shape) is reported before anything is computed or written. Streaming then reads one
tensor from each model, merges it, and hands it to the sharded writer, so peak memory is about
(number of models + 2) x the largest tensor plus one output shard, not a model.

Rules the plan follows:

- **Reference model**: the base model if there is one, else the first model. Its ``config.json``,
  tokenizer and tensor names (and order) define the output.
- **Tied embeddings**: a model whose config ties ``lm_head`` to the input embeddings and stores no
  ``lm_head.weight`` contributes its embedding matrix wherever ``lm_head.weight`` is needed. When the
  reference ties them, the output stores no ``lm_head.weight`` either (transformers re-ties it).
- **Vocabularies that differ by added rows**: a tensor whose first dimension is each model's
  ``vocab_size`` (embeddings, ``lm_head``) may differ in that dimension only. The rows every model
  has are merged; the output has the reference's row count, and rows beyond the smallest vocabulary
  are copied from the reference model.
- **tokenizer_source: base** (mergekit's option): the input embedding and ``lm_head`` are cut to the
  reference tokenizer's length, and the output's ``vocab_size`` is that length, as mergekit does. The
  other models' tokenizers must give those tokens the same ids (else mergekit would move rows).

A recipe's ``slices`` (:mod:`weightkit.merge.slices`) are merged by :func:`merge_slices`: one
:class:`MergePart` per slice, each an ordinary plan over the slice's models whose tensors are read at
the slice's layers and written at the output's, streamed into one checkpoint.

**Resuming.** :func:`merge` and :func:`merge_slices` write their shards into ``<out_dir>.partial/``
(:class:`weightkit.checkpoint.partial.PartialRun`), recording each one as it is finished, with the merge's
settings and a fingerprint of its inputs. After a kill or Ctrl-C, ``resume=True`` with the same settings
and inputs skips the tensors of the recorded shards (reading and merging none of them) and goes on from the
next. Every method merges each tensor from its inputs alone (the random sparsifiers' generators are seeded
per tensor and model, and the ``scope: model`` statistics come from a pass over every tensor made again on
resume), so the published output is bit-identical to that of a run that was not interrupted. What a method
reports (TIES's sign-conflict rate) then covers the tensors merged by the resumed run only.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader, CheckpointWriter, ModelCard, Provenance
from weightkit.checkpoint.partial import PartialRun
from weightkit.checkpoint.writer import check_target
from weightkit.errors import WeightkitError, require_finite
from weightkit.merge.chat_template import resolve_chat_template, save_chat_template
from weightkit.merge.params import gradient_position, layer_index, value_at, with_layer_index
from weightkit.merge.slices import (
    MergeSlice,
    before_layers,
    check_layer_range,
    check_slices,
    layer_count,
    layer_count_update,
    slice_config,
    slice_position,
)
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized
from weightkit.registry import config_to_dict, entry_for_config, lookup
from weightkit.runtime.device import resolve_device

__all__ = [
    "MergePlan",
    "MergePart",
    "TensorJob",
    "check_architectures",
    "TensorInputs",
    "WorkBuffers",
    "plan_merge",
    "read_job",
    "task_vectors",
    "run_merge",
    "run_parts",
    "prepare_merge",
    "prepare_slices",
    "merge",
    "merge_slices",
    "merge_device",
    "check_tokenizer_source",
    "split_reference",
    "open_checkpoint",
    "close_plan",
]

_TIED_HEAD = "lm_head.weight"


@dataclass
class TensorJob:
    """One output tensor: where each model's version of it is read from."""

    name: str  # output name
    sources: list[str]  # per model (base first if any): the name to read from that model
    shape: tuple[int, ...]  # output shape
    merged_rows: int | None = None  # vocabulary tensors: rows merged by the method (the rest copied)
    t: float = 0.0  # where a gradient over layers puts the tensor (weightkit.merge.params)
    # Per model: the name its parameters' filters are matched against (mergekit: the tensor's name in
    # that model, so at the source's own layer in a slice); None: ``name``.
    input_names: list[str] | None = None


@dataclass
class MergePlan:
    readers: list[CheckpointReader]  # base first (if any), then the models
    has_base: bool
    jobs: list[TensorJob] = field(default_factory=list)
    num_layers: int = 0  # the layers a gradient spans (a slice's, in a slice merge)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where tensors are merged
    config_updates: dict[str, Any] = field(default_factory=dict)  # what the output's config.json changes

    @property
    def reference(self) -> CheckpointReader:
        return self.readers[0]


def _ties_head(reader: CheckpointReader) -> bool:
    config = reader.config or {}
    return bool(config.get("tie_word_embeddings", True)) and _TIED_HEAD not in reader


def _embedding_name(reader: CheckpointReader) -> str | None:
    """The input-embedding tensor of a causal LM (the one ``lm_head`` is tied to)."""
    vocab = (reader.config or {}).get("vocab_size")
    for name in reader.names():
        is_embedding = "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight"))
        if is_embedding and (vocab is None or reader.shape(name)[0] == vocab):
            return name
    return None


def check_architectures(
    readers: list[CheckpointReader], *, why: str = "only models of one architecture can be merged"
) -> None:
    """Refuse checkpoints whose ``model_type`` or ``architectures`` differ, naming both and saying ``why``."""

    def arch(r):
        config = r.config or {}
        return config.get("model_type"), tuple(config.get("architectures") or ())

    first = arch(readers[0])
    for r in readers[1:]:
        if arch(r) != first:
            raise WeightkitError(
                f"different architectures: {readers[0].path} is {first[0]} {list(first[1])}, "
                f"{r.path} is {arch(r)[0]} {list(arch(r)[1])}; {why}"
            )


def _source(reader: CheckpointReader, name: str) -> str | None:
    if name in reader:
        return name
    if name == _TIED_HEAD and _ties_head(reader):
        return _embedding_name(reader)
    return None


def split_reference(text: str) -> tuple[str, str | None]:
    """mergekit's ``model+adapter`` reference -> ``("model", "adapter")`` (split at the last ``+``); a plain
    path, or one containing ``+`` that exists as a whole -> ``(path, None)``."""
    if "+" not in text or Path(text).exists():
        return text, None
    model, _, adapter = text.rpartition("+")
    return model, adapter


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> CheckpointReader:
    """A model's reader; for a ``model+adapter`` reference, the model read with the PEFT LoRA adapter merged
    in (mergekit's LoRA references; :class:`weightkit.adapt.LoRAMergedReader`, found in the registry)."""
    model, adapter = split_reference(str(path))
    refuse_quantized(
        model, verb="weightkit merge", instead="merge the full-precision models, then compress the result"
    )
    if adapter is None:
        return CheckpointReader(path, allow_pickle=allow_pickle)
    entry = lookup("reader", "model+lora")
    return entry.fn(model, entry.config_cls(adapter=adapter), allow_pickle=allow_pickle)


def plan_merge(base: str | Path | None, models: list[str | Path], *, allow_pickle: bool = False) -> MergePlan:
    """Open every checkpoint and check that they can be merged; nothing is computed yet.

    Raises:
        WeightkitError: different architectures, a tensor missing from some model, shapes that differ
            (other than vocabulary rows), or no model.
    """
    paths = ([Path(base)] if base is not None else []) + [Path(m) for m in models]
    if base is not None:
        paths = [paths[0]] + [p for p in paths[1:] if p.resolve() != paths[0].resolve()]
    if not paths:  # how many models a method merges is its config's to check (passthrough copies one)
        raise WeightkitError("a merge needs at least one model")
    readers = [open_checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    plan = MergePlan(readers, has_base=base is not None)
    try:
        check_architectures(readers)
        reference = readers[0]
        # From the tensors themselves, whatever the config calls it (n_layer, num_layers ...).
        layers = {layer_index(name) for name in reference.names()} - {None}
        plan.num_layers = max(layers) + 1 if layers else 0
        names = list(reference.names())
        names += sorted({n for r in readers[1:] for n in r.names()} - set(names) - {_TIED_HEAD})
        if _ties_head(reference) and _TIED_HEAD in names:
            names.remove(_TIED_HEAD)
        for name in names:
            job = _plan_tensor(readers, name)
            job.t = gradient_position(name, plan.num_layers)
            plan.jobs.append(job)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return plan


def _plan_tensor(readers: list[CheckpointReader], name: str, wanted: list[str] | None = None) -> TensorJob:
    """Output tensor ``name``, read as ``wanted[i]`` from ``readers[i]`` (default: ``name`` from each)."""
    wanted = wanted or [name] * len(readers)
    sources = [_source(r, w) for r, w in zip(readers, wanted, strict=True)]
    missing = [(r, w) for r, w, s in zip(readers, wanted, sources, strict=True) if s is None]
    if missing:
        have = [str(r.path) for r, s in zip(readers, sources, strict=True) if s is not None]
        raise WeightkitError(
            f"tensor {missing[0][1]} is in {', '.join(have) or 'none of the models'} but missing from "
            f"{', '.join(str(r.path) for r, _ in missing)}"
        )
    shapes = [tuple(r.shape(s)) for r, s in zip(readers, sources, strict=True)]
    if len(set(shapes)) == 1:
        return TensorJob(name, sources, shapes[0])
    vocabs = [(r.config or {}).get("vocab_size") for r in readers]
    rows_are_vocab = all(s[0] == v for s, v in zip(shapes, vocabs, strict=True))
    by_vocab = rows_are_vocab and len({s[1:] for s in shapes}) == 1
    if not by_vocab:
        listed = ", ".join(f"{r.path}: {list(s)}" for r, s in zip(readers, shapes, strict=True))
        raise WeightkitError(f"tensor {name} has different shapes ({listed})")
    return TensorJob(name, sources, shapes[0], merged_rows=min(s[0] for s in shapes))


class WorkBuffers:
    """Float32 buffers that receive each model's version of a tensor, reused from one tensor to the next.

    A tensor allocated per read is fresh memory, and the kernel maps fresh memory one 4 KiB page at a
    time, on first write: on the 134M-parameter bench set those page faults were over half of a task
    arithmetic merge's time. A reused buffer is faulted in once, for the largest tensor.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._flat: list[Tensor] = []

    def take(self, slot: int, numel: int) -> Tensor:
        """A flat float32 buffer of ``numel`` elements for ``slot`` (one slot per model); its contents are
        overwritten by the next :meth:`take` of the same slot."""
        while len(self._flat) <= slot:
            self._flat.append(torch.empty(0, device=self.device))
        if self._flat[slot].numel() < numel:
            self._flat[slot] = torch.empty(0, device=self.device)  # free the smaller one first
            self._flat[slot] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._flat[slot][:numel]

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` shares memory with one of the buffers (a result that must be copied out)."""
        pointer = tensor.untyped_storage().data_ptr()
        return any(flat.numel() and flat.untyped_storage().data_ptr() == pointer for flat in self._flat)


def read_job(plan: MergePlan, job: TensorJob, buffers: WorkBuffers, *, check: bool = True) -> list[Tensor]:
    """Each model's version of the job's tensor in float32 (base first), cut to the merged vocabulary rows.

    The tensors are views of ``buffers``: valid until the next read into them.

    Args:
        check: refuse a tensor holding NaN or Inf (False: the caller checks, see :func:`run_merge`).

    Raises:
        WeightkitError: a tensor holds NaN or Inf (the message names it and its checkpoint).
    """
    work = []
    for slot, (reader, source) in enumerate(zip(plan.readers, job.sources, strict=True)):
        tensor = reader.read_into(source, buffers.take(slot, math.prod(reader.shape(source))))
        if check:
            require_finite(tensor, f"{source} of {reader.path}")
        work.append(tensor if job.merged_rows is None else tensor[: job.merged_rows])
    return work


def _require_finite_inputs(plan: MergePlan, job: TensorJob) -> None:
    """Read the job's tensors again, as stored, and refuse the first one holding NaN or Inf."""
    for reader, source in zip(plan.readers, job.sources, strict=True):
        require_finite(reader.get(source), f"{source} of {reader.path}")


def task_vectors(plan: MergePlan) -> Iterator[list[Tensor]]:
    """Stream the plan's task vectors, one tensor at a time: ``[model_i - base for each model]``.

    For methods that need statistics over the whole model before merging (a pass of their own). The
    tensors are reused buffers on ``plan.device``, valid until the next step of the iteration.
    """
    buffers = WorkBuffers(plan.device)
    for job in plan.jobs:
        base, *tensors = read_job(plan, job, buffers)
        yield [t.sub_(base) for t in tensors]


MergeFn = Callable[[str, list[Tensor]], Tensor]


def run_merge(
    plan: MergePlan,
    merge_tensor: MergeFn,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    propagates_non_finite: bool = False,
) -> dict:
    """Stream the plan: for each job, read every model's tensor, merge it and write the result.

    Tensors are read into float32 buffers on ``plan.device`` and merged there; the writer brings the
    results back to the CPU.

    Args:
        plan: from :func:`plan_merge` (its readers are closed at the end).
        merge_tensor: ``merge_tensor(name, tensors) -> Tensor`` with ``tensors`` in float32, base first
            when the plan has one; returns the merged tensor. The tensors are reused buffers: it may
            modify them, but must not keep them after it returns.
        out_dir: the output model directory (written atomically).
        dtype: output dtype (default: the reference model's dtype of each tensor).
        propagates_non_finite: ``merge_tensor`` carries every NaN/Inf of its inputs into its result (a
            weighted sum does: ``NaN * w``, ``Inf * 0`` and ``Inf - Inf`` are NaN), so the inputs are not
            checked one by one: when a result is not finite, they are read again to name the one at fault,
            with the same message. Inputs with rows beyond the merged vocabulary are checked as they are
            read (their extra rows are not merged).

    Returns:
        A summary: tensors merged, output bytes, seconds.

    Raises:
        WeightkitError: an input or a merged tensor holds NaN or Inf (the message names it).
    """
    return run_parts(
        [(plan, merge_tensor)],
        out_dir,
        reference=plan.reference,
        config_updates=plan.config_updates,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
        propagates_non_finite=propagates_non_finite,
    )


def run_parts(
    parts: list[tuple[MergePlan, MergeFn]],
    out_dir: str | Path,
    *,
    reference: CheckpointReader,
    config_updates: dict[str, Any],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    propagates_non_finite: bool = False,
    chat_template: str | None = None,
    card: ModelCard | None = None,
    provenance: Provenance | None = None,
    partial: PartialRun | None = None,
) -> dict:
    """Stream several plans into one checkpoint (the slices of a slice merge), as :func:`run_merge` does one.

    Args:
        parts: each plan with the function that merges its tensors (see :func:`run_merge`).
        reference: the model whose config (with ``config_updates``) and tokenizer files the output gets.
        config_updates: values that replace the reference's in the output's ``config.json``.
        chat_template: a template to write into the output's tokenizer (the reference's, copied).
        card: the output's README.md (None: the output has none; the reference's is not copied).
        provenance: what the output's integrity manifest records (None: no manifest).
        partial: write the shards into this resumable run's directory, and skip the tensors of the shards
            it already holds (see the module docstring).

    Every reader of the parts, and ``reference``, is closed at the end.
    """
    start = time.perf_counter()
    total = 0
    buffers = WorkBuffers(parts[0][0].device)
    jobs = [(plan, merge_tensor, job) for plan, merge_tensor in parts for job in plan.jobs]
    resumed = 0
    try:
        with CheckpointWriter(
            out_dir,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            provenance=provenance,
            partial=partial,
        ) as writer:
            # Before copy_files, which keeps the files already written.
            _write_config(writer, {**(reference.config or {}), **config_updates}, dtype)
            if writer.resumed:
                done = [(plan, job) for plan, _, job in jobs if job.name in writer.resumed]
                total += sum(
                    math.prod(job.shape) * _output_dtype(plan, job, dtype).itemsize for plan, job in done
                )
                jobs, resumed = [item for item in jobs if item[2].name not in writer.resumed], len(done)
            for plan, merge_tensor, job in track(jobs, "merging", enabled=progress):
                checked = not propagates_non_finite or job.merged_rows is not None
                merged = merge_tensor(job.name, read_job(plan, job, buffers, check=checked))
                if job.merged_rows is not None and job.shape[0] > job.merged_rows:
                    rows = plan.reference.get(job.sources[0])[job.merged_rows :]
                    merged = torch.cat([merged, rows.to(merged.device, torch.float32)])
                try:
                    require_finite(merged, f"{job.name} (merged)")
                except WeightkitError:
                    if not checked:
                        _require_finite_inputs(plan, job)  # name the input at fault, if one is
                    raise
                merged = merged.to(_output_dtype(plan, job, dtype))
                if buffers.holds(merged):  # the writer keeps it; the next read would overwrite it
                    merged = merged.clone()
                total += merged.numel() * merged.element_size()
                writer.add(job.name, merged)
            if reference.directory is not None:
                writer.copy_files(reference.directory)
            if card is not None:
                writer.write_model_card(card)
            if chat_template is not None:
                save_chat_template(writer.path, chat_template)
    finally:
        for reader in [reference] + [r for plan, _ in parts for r in plan.readers]:
            reader.close()
    summary = {"tensors": len(jobs) + resumed, "output_bytes": total, "seconds": time.perf_counter() - start}
    return {**summary, "resumed_tensors": resumed} if partial is not None else summary


def _output_dtype(plan: MergePlan, job: TensorJob, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or plan.reference.dtype(job.sources[0])


def _write_config(writer: CheckpointWriter, config: dict, dtype: torch.dtype | None) -> None:
    if not config:
        return
    if dtype is not None:  # transformers 5 writes "dtype", older versions "torch_dtype"
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = str(dtype).removeprefix("torch.")
    writer.write_json("config.json", config)


# ---------------------------------------------------------------------------------------------- merge()

ModelSpec = str | Path | dict


@dataclass
class TensorInputs:
    """What a merge method sees for one output tensor (all float32).

    ``base`` and ``tensors`` are the engine's reused read buffers: a method may modify or replace them
    while it merges the tensor, but must not keep a reference after it returns (the next tensor is read
    into the same memory).
    """

    name: str
    base: Tensor | None  # the base model's tensor (methods that use a base)
    tensors: list[Tensor]  # one per merged model, in the order given; the method may modify or replace them
    params: list[dict[str, Any]]  # one per merged model: its per-model parameters' values for this tensor
    values: dict[str, Any]  # the config's per-tensor parameters' values for this tensor


@dataclass
class _Model:
    path: Path
    overrides: dict[str, Any]  # per-model parameters given for this model
    files: dict[str, CheckpointReader] = field(default_factory=dict)  # per-model tensor files (fisher)


def _parse_model(item: ModelSpec) -> tuple[Path, dict[str, Any]]:
    """``"path"`` or ``{"model": "path", "parameters": {...}}`` (the shape of a mergekit recipe entry)."""
    if isinstance(item, str | Path):
        return Path(item), {}
    if not isinstance(item, dict) or "model" not in item or set(item) - {"model", "parameters"}:
        raise WeightkitError(f"a model is a path or {{model: path, parameters: {{...}}}}, got {item!r}")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WeightkitError(f"parameters of {item['model']} must be a mapping, got {parameters!r}")
    return Path(item["model"]), dict(parameters)


def _models(base: str | Path | None, models: list[ModelSpec], config: Any, method: str) -> list[_Model]:
    """Parse and validate the model entries against the method's per-model parameters."""
    parsed = [_parse_model(m) for m in models]
    per_model = getattr(config, "per_model", ())
    files = getattr(config, "files", ())
    out = []
    for path, overrides in parsed:
        unknown = set(overrides) - set(per_model)
        if unknown:
            takes = ", ".join(per_model) or "none"
            raise WeightkitError(
                f"{method}: unknown parameter(s) {', '.join(sorted(unknown))} for model {path} "
                f"(per-model parameters of {method}: {takes})"
            )
        numeric = {k: v for k, v in overrides.items() if k not in files}
        try:  # the config's own validation (ranges, spec shapes) applied to this model's values
            dataclasses.replace(config, **numeric)
        except (TypeError, ValueError, WeightkitError) as err:
            raise WeightkitError(f"{method}, model {path}: {err}") from None
        model = _Model(path, overrides)
        for key in files:
            file = overrides.get(key, getattr(config, key, None))
            if not file:
                raise WeightkitError(
                    f"{method}: model {path} needs a {key!r} file (parameters: {{{key}: path}})"
                )
            model.files[key] = CheckpointReader(file)
        out.append(model)
    # needs_base (default True): the method reads a base model; False: it merges the models listed only.
    # base_optional: a method that reads a base model when one is given and merges without one otherwise.
    needs_base = getattr(config, "needs_base", True)
    if needs_base and base is None and not getattr(config, "base_optional", False):
        raise WeightkitError(f"{method} merges task vectors against a base model; give base_model")
    if not needs_base and base is not None:
        listed = [m for m in out if m.path.resolve() == Path(base).resolve()]
        if not listed:
            raise WeightkitError(
                f"{method} does not use a base model: it merges the models listed. base_model {base} is "
                "not among them; list it under models (with its weight) or leave base_model out"
            )
        out = listed + [m for m in out if m not in listed]  # the base is the reference (config, tokenizer)
    return out


def _resolve(spec_source: Any, key: str, name: str, t: float, what: str) -> Any:
    value = value_at(spec_source, name, t)
    if value is None:
        raise WeightkitError(
            f"{what}: no {key!r} filter entry matches tensor {name} (add an entry without filter)"
        )
    return value


def _tensor_inputs(
    config, plan: MergePlan, models: list[_Model], job: TensorJob, tensors: list[Tensor]
) -> TensorInputs:
    name = job.name
    # The method gets the list itself (not a copy): replacing an entry frees the tensor it held.
    base = tensors.pop(0) if plan.has_base else None
    merged = tensors
    offset = 1 if plan.has_base else 0
    sources = job.sources[offset:]
    filtered_as = job.input_names[offset:] if job.input_names else [name] * len(sources)
    params = []
    for model, source, filter_name in zip(models, sources, filtered_as, strict=True):
        values: dict[str, Any] = {}
        for key in getattr(config, "per_model", ()):
            if key in model.files:  # stored under the model's own name (its embedding for a tied lm_head)
                values[key] = model.files[key].get(source).to(plan.device, torch.float32)
                continue
            own, default = model.overrides.get(key), getattr(config, key)
            value = None if own is None else value_at(own, filter_name, job.t)
            if value is None and default is not None:  # no value of its own, or none of its filters matched
                value = _resolve(default, key, filter_name, job.t, str(model.path))
            values[key] = value
        params.append(values)
    shared = {
        key: _resolve(getattr(config, key), key, name, job.t, "parameters")
        for key in getattr(config, "per_tensor", ())
    }
    return TensorInputs(name, base, merged, params, shared)


@dataclass
class MergePart:
    """Output tensors merged from the same models with the same parameters: a whole merge, or a slice."""

    plan: MergePlan
    models: list[_Model]  # the merged models (not the base), as the plan's readers after the base
    config: Any  # the method's config, with the slice's parameters in a slice merge


def merge(
    base: str | Path | None,
    models: list[ModelSpec],
    config: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    tokenizer_source: str | None = None,
    chat_template: str | None = None,
    resume: bool = False,
) -> dict:
    """Merge ``models`` (with ``base``) into one checkpoint at ``out_dir`` with the method ``config`` names.

    Methods whose per-tensor work is heavy (the sparsifying ones: TIES, DARE, Breadcrumbs, DELLA, and PCB,
    SCE and Arcee Fusion: sorts, selections, random masks, many products) merge each tensor on ``device``.
    The others (linear, task arithmetic without a sparsifier, SLERP, NuSLERP, Multi-SLERP, Karcher,
    NearSwap, Model Stock, Fisher, MWA) always merge on the CPU: their work is a few passes of elementwise
    arithmetic, cheaper than moving the tensors to a GPU and back (on
    the 134M bench set, 1 thread, task arithmetic's arithmetic is 0.36 s of 1.2 s and linear's 0.10 of
    0.81 s, where copying the float32 inputs over PCIe alone would take ~0.2-0.4 s; TIES's is 7.3 of 8.1 s
    and DARE's 3.5 of 4.5 s). The summary's ``device`` says where the tensors were merged.

    Args:
        base: the base model directory (task-vector methods, SLERP, Model Stock ...), or None. NuSLERP and
            Multi-SLERP merge task vectors when given one and the models themselves otherwise; Karcher
            averages it with the models.
        models: model directories, or ``{"model": dir, "parameters": {"weight": 0.5, ...}}`` entries
            whose parameters override the config's per-model defaults for that model.
        config: a merge config, e.g. ``TaskArithmeticConfig`` from ``config_from_dict("merge",
            {"method": "ties", "density": 0.5})``.
        out_dir: the output model directory, written atomically.
        dtype: output dtype (default: each tensor's dtype in the reference model).
        device: where heavy methods merge (see above): None for the GPU when there is one (see
            :func:`weightkit.runtime.device.resolve_device`), or ``"cpu"``, ``"cuda:1"`` ...
        tokenizer_source: None (the reference's tokenizer is copied, vocabulary tensors merged as they
            are) or ``"base"`` (mergekit's: they are also cut to the reference tokenizer's length; see the
            module docstring).
        chat_template: mergekit's ``chat_template`` (``"auto"`` or a Jinja template), written into the
            output's tokenizer (:mod:`weightkit.merge.chat_template`).
        resume: continue the interrupted run recorded in ``<out_dir>.partial/`` (see the module
            docstring); without it, such a directory is refused rather than lost.

    Returns:
        A summary: method, models, tensors, output bytes, seconds, device, ``resumed_tensors`` (those an
        earlier run had merged), and what the method reports (e.g. the sign-conflict rate of TIES-like
        methods).

    Raises:
        WeightkitError: bad models or parameters (see :func:`prepare_merge`), NaN/Inf in a tensor, a device
            this machine does not have, or what :class:`~weightkit.checkpoint.partial.PartialRun` refuses
            (an unfinished run without ``resume``; with it, none, or one with other settings or inputs).
    """
    compute = merge_device(config, device)
    plan, parsed = prepare_merge(
        base, models, config, allow_pickle=allow_pickle, tokenizer_source=tokenizer_source
    )
    provenance = _provenance(
        config,
        base,
        parsed,
        {"models": [{"model": str(m.path), "parameters": m.overrides} for m in parsed]},
        dtype=dtype,
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
    )
    summary = _merge_parts(
        [MergePart(plan, parsed, config)],
        plan.reference,
        plan.config_updates,
        out_dir,
        compute,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
        chat_template=(chat_template, [r.path for r in plan.readers]),
        card=_card(config, [str(base)] if plan.has_base else [], {str(m.path): m.overrides for m in parsed}),
        provenance=provenance,
        resumable=_resumable(provenance, resume, max_shard_bytes=max_shard_bytes, device=compute),
    )
    return {
        "method": entry_for_config(config).name,
        "models": [str(m.path) for m in parsed],
        "base": str(base) if base is not None and plan.has_base else None,
        **summary,
    }


def merge_slices(
    base: str | Path | None,
    slices: list[MergeSlice],
    config: Any,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    tokenizer_source: str | None = None,
    chat_template: str | None = None,
    resume: bool = False,
) -> dict:
    """Merge a recipe's ``slices`` into one checkpoint at ``out_dir``: mergekit's layer stacking.

    Each slice's layers are merged from its sources' layer ranges with the method ``config`` names (and
    the slice's parameters) and written as the next layers of the output; see
    :mod:`weightkit.merge.slices` for mergekit's rules. Streamed tensor by tensor like :func:`merge`,
    whose other arguments these are.

    Args:
        base: the recipe's base model (methods that use one; each slice lists it among its sources), or
            None. The reference model (config, tokenizer) is this, else the first slice's first source.
        slices: the output's layers, in order.

    Returns:
        A summary as :func:`merge` gives, with the output's layer count; what the method reports
        (e.g. TIES's sign-conflict rate) is over every slice's tensors.

    Raises:
        WeightkitError: bad slices, models or parameters (see :func:`prepare_slices`), NaN/Inf in a
            tensor, or a device this machine does not have.
    """
    compute = merge_device(config, device)
    parts, reference, updates = prepare_slices(
        base, slices, config, allow_pickle=allow_pickle, tokenizer_source=tokenizer_source
    )
    inputs = [Path(base)] if base is not None else []
    inputs += [source.model for piece in slices for source in piece.sources]
    provenance = _provenance(
        config,
        base,
        [model for part in parts for model in part.models],
        {"slices": [_slice_entry(piece) for piece in slices]},
        dtype=dtype,
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
    )
    summary = _merge_parts(
        parts,
        reference,
        updates,
        out_dir,
        compute,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        progress=progress,
        chat_template=(chat_template, inputs),
        card=_card(config, [str(path) for path in inputs], {}),
        provenance=provenance,
        resumable=_resumable(provenance, resume, max_shard_bytes=max_shard_bytes, device=compute),
    )
    paths = [str(s.model) for piece in slices for s in piece.sources]
    return {
        "method": entry_for_config(config).name,
        "models": list(dict.fromkeys(paths)),
        "base": str(base) if base is not None and getattr(config, "needs_base", True) else None,
        "layers": sum(part.plan.num_layers for part in parts),
        **summary,
    }


def _chat_template(value: str | None, inputs: list[Path], reference: CheckpointReader) -> str | None:
    """The template a recipe's ``chat_template`` writes (None: none), checked before anything is merged:
    the reference model must have a tokenizer to write it into."""
    if value is None:
        return None
    from weightkit.models import has_tokenizer  # imports transformers: only for a recipe with a template

    template = resolve_chat_template(value, [Path(split_reference(str(path))[0]) for path in inputs])
    if template is not None and (reference.directory is None or not has_tokenizer(reference.directory)):
        raise WeightkitError(
            f"chat_template: the reference model {reference.path} has no tokenizer to write the template into"
        )
    return template


def _merge_parts(
    parts: list[MergePart],
    reference: CheckpointReader,
    config_updates: dict[str, Any],
    out_dir: str | Path,
    device: torch.device,
    chat_template: tuple[str | None, list[Path]],
    resumable: tuple[dict[str, Any], list[Path], bool],
    **write_options: Any,
) -> dict:
    """Build each part's merger and stream the parts into ``out_dir``; every reader is closed at the end.
    ``chat_template``: the recipe's value and the input models' directories (see :func:`_chat_template`);
    ``resumable``: the run's settings, its inputs and whether to resume (see :func:`_resumable`)."""
    entry = entry_for_config(parts[0].config)
    streams, reports = [], []
    settings, inputs, resume = resumable
    try:
        template = _chat_template(*chat_template, reference)
        check_target(out_dir, overwrite=write_options["overwrite"])  # before the partial directory is made
        with PartialRun(out_dir, settings=settings, inputs=inputs, resume=resume, unit="shard") as partial:
            for part in parts:
                part.plan.device = device
                per_model = getattr(part.config, "per_model", ())
                model_params = [
                    {k: m.overrides.get(k, getattr(part.config, k)) for k in per_model} for m in part.models
                ]
                merger = entry.fn(part.config, part.plan, model_params)
                streams.append((part.plan, _merge_fn(part, merger)))
                if hasattr(merger, "report"):
                    reports.append((merger.report, sum(math.prod(job.shape) for job in part.plan.jobs)))
            summary = run_parts(
                streams,
                out_dir,
                reference=reference,
                config_updates=config_updates,
                propagates_non_finite=getattr(parts[0].config, "propagates_non_finite", False),
                chat_template=template,
                partial=partial,
                **write_options,
            )
    finally:
        reference.close()
        for part in parts:
            close_plan(part.plan, part.models)
    return {**summary, "device": str(device), **_combined_report(reports)}


def _resumable(
    provenance: Provenance, resume: bool, **options: Any
) -> tuple[dict[str, Any], list[Path], bool]:
    """What a resumed merge must share with the run it continues: the merge as its manifest records it (the
    recipe, and every model, adapter and per-model file it reads) and ``options`` (shard size, device)."""
    settings = {"verb": "merge", **provenance.config, **options}
    return settings, [Path(path) for path in provenance.inputs], resume


def _card(config: Any, inputs: list[str], per_model: dict[str, dict[str, Any]]) -> ModelCard:
    """The merge's model card: the method's settings, then each model's own parameters (by its path)."""
    settings = {k: v for k, v in config_to_dict(config).items() if k != "method"}
    settings.update({path: params for path, params in per_model.items() if params})
    paths = list(dict.fromkeys([*inputs, *per_model]))
    return ModelCard("merge", entry_for_config(config).name, paths, settings)


def _provenance(
    config: Any,
    base: str | Path | None,
    models: list[_Model],
    sources: dict[str, list],
    *,
    dtype: torch.dtype | None,
    tokenizer_source: str | None,
    chat_template: str | None,
) -> Provenance:
    """The manifest's record of a merge: the merge as a mergekit-style recipe (``sources``: its ``models``
    or ``slices``), which :func:`weightkit.merge.recipe.merge_recipe_from_dict` reads back into the same
    merge, and every model, adapter and per-model file (Fisher) it read."""
    method = config_to_dict(config)
    recipe = {
        "merge_method": method.pop("method"),
        "parameters": method,
        "base_model": str(base) if base is not None else None,
        **sources,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "tokenizer_source": tokenizer_source,
        "chat_template": chat_template,
    }
    references = [base] if base is not None else []
    references += [model.path for model in models]
    paths = [part for ref in references for part in split_reference(str(ref)) if part is not None]
    paths += [reader.path for model in models for reader in model.files.values()]
    return Provenance("merge", recipe["merge_method"], recipe, tuple(paths))


def _slice_entry(piece: MergeSlice) -> dict[str, Any]:
    """A slice as a recipe writes it."""
    sources = [
        {"model": str(s.model), "layer_range": list(s.layer_range), "parameters": s.parameters}
        for s in piece.sources
    ]
    entry = {"sources": sources, "parameters": piece.parameters}
    return entry | ({"base_model": str(piece.base)} if piece.base is not None else {})


def _merge_fn(part: MergePart, merger: Callable[[TensorInputs], Tensor]) -> MergeFn:
    jobs = {job.name: job for job in part.plan.jobs}

    def merge_tensor(name: str, tensors: list[Tensor]) -> Tensor:
        return merger(_tensor_inputs(part.config, part.plan, part.models, jobs[name], tensors))

    return merge_tensor


def _combined_report(reports: list[tuple[Callable[[], dict], int]]) -> dict:
    """What the parts' mergers report (rates over the entries each merged, e.g. TIES's sign-conflict rate),
    over all their entries: each part's rate weighted by its entries."""
    if len(reports) == 1:
        return reports[0][0]()
    total = sum(entries for _, entries in reports) or 1
    combined: dict[str, float] = {}
    for report, entries in reports:
        for key, value in report().items():
            combined[key] = combined.get(key, 0.0) + value * entries / total
    return combined


def merge_device(config: Any, device: str | torch.device | None) -> torch.device:
    """Where :func:`merge` merges each tensor with ``config``'s method.

    ``device`` resolved (None: the GPU when there is one) for methods whose per-tensor work is heavy
    (``config.computes_on_device``), else the CPU.

    Raises:
        WeightkitError: a device this machine does not have (even for a method that stays on the CPU).
    """
    resolved = resolve_device(device)
    return resolved if getattr(config, "computes_on_device", False) else torch.device("cpu")


def prepare_merge(
    base: str | Path | None,
    models: list[ModelSpec],
    config: Any,
    *,
    allow_pickle: bool = False,
    tokenizer_source: str | None = None,
) -> tuple[MergePlan, list[_Model]]:
    """Validate the models and their parameters and plan the merge (headers only); nothing is read."""
    check_tokenizer_source(tokenizer_source)
    method = entry_for_config(config).name
    parsed = _models(base, models, config, method)
    plan = None
    try:
        # A method whose base is optional (base_optional) uses one when it is given.
        uses_base = getattr(config, "needs_base", True) and base is not None
        plan = plan_merge(base if uses_base else None, [m.path for m in parsed], allow_pickle=allow_pickle)
        parsed = _check_part(plan, parsed, config, method)
        if tokenizer_source == "base":
            plan.config_updates["vocab_size"] = _cut_to_tokenizer([plan], plan.reference)
    except BaseException:
        close_plan(plan, parsed)
        raise
    return plan, parsed


def check_tokenizer_source(tokenizer_source: str | None) -> None:
    """Refuse a ``tokenizer_source`` other than None and ``"base"``, naming it."""
    if tokenizer_source not in (None, "base"):
        raise WeightkitError(
            f"tokenizer_source: {tokenizer_source!r} is not supported: weightkit does not build tokenizers "
            "(mergekit's 'union' or another model's tokenizer); leave it out (the reference model's "
            "tokenizer is copied) or use 'base'"
        )


def _check_part(plan: MergePlan, parsed: list[_Model], config: Any, method: str) -> list[_Model]:
    """The merged models without the base (listed among them or not), once their Fisher-style files and
    their count are checked against the plan."""
    if plan.has_base:
        parsed = [m for m in parsed if m.path.resolve() != plan.reference.path.resolve()]
    offset = 1 if plan.has_base else 0
    for i, model in enumerate(parsed):
        for key, reader in model.files.items():
            missing = [job.name for job in plan.jobs if job.sources[offset + i] not in reader]
            if missing:
                raise WeightkitError(
                    f"{method}: the {key} file {reader.path} of {model.path} lacks {len(missing)} "
                    f"tensor(s) of the model, e.g. {', '.join(missing[:3])}"
                )
    low, high = getattr(config, "model_count", (1, None))
    if not low <= len(parsed) <= (high or len(parsed)):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
        besides = " besides the base model" if plan.has_base else ""
        raise WeightkitError(f"{method} merges {wanted} model(s){besides}, got {len(parsed)}")
    return parsed


def prepare_slices(
    base: str | Path | None,
    slices: list[MergeSlice],
    config: Any,
    *,
    allow_pickle: bool = False,
    tokenizer_source: str | None = None,
) -> tuple[list[MergePart], CheckpointReader, dict[str, Any]]:
    """Validate a slice merge and plan it (headers only): one part per slice, nothing read yet.

    Returns:
        The parts, the reference model's reader, and the changes to its config (the layer count, and
        ``vocab_size`` with ``tokenizer_source: base``).

    Raises:
        WeightkitError: bad slices (see :func:`weightkit.merge.slices.check_slices`), a layer range beyond
            a model's layers, different architectures, a base model that is not among a slice's sources,
            bad parameters, or what :func:`prepare_merge` refuses; the message names the slice.
    """
    check_tokenizer_source(tokenizer_source)
    method = entry_for_config(config).name
    check_slices(slices)
    if len(slices) > 1 and getattr(config, "scope", "tensor") == "model":
        raise WeightkitError(
            f"{method}: scope 'model' takes statistics over the whole model, which several slices merge "
            "from different models; use scope 'tensor' (mergekit's) with slices"
        )
    readers: dict[Path, CheckpointReader] = {}

    def reader_of(path: Path) -> CheckpointReader:  # one reader per checkpoint, shared by the slices
        key = Path(path).resolve()
        if key not in readers:
            readers[key] = open_checkpoint(path, allow_pickle=allow_pickle)
        return readers[key]

    parts: list[MergePart] = []
    try:
        reference = reader_of(Path(base) if base is not None else slices[0].sources[0].model)
        for piece in slices:
            for source in piece.sources:
                reader_of(source.model)
        check_architectures(list(readers.values()))
        counts = {key: layer_count(r.names(), r.path) for key, r in readers.items()}
        merged_layers = 0
        for i, piece in enumerate(slices):
            try:
                for j, source in enumerate(piece.sources):
                    check_layer_range(source, counts[source.model.resolve()], f"sources[{j}]")
                part_base = (piece.base or base) if getattr(config, "needs_base", True) else None
                part = _plan_slice(
                    piece,
                    part_base,
                    config,
                    method,
                    reader_of,
                    reference,
                    merged_layers,
                    first=i == 0,
                    last=i == len(slices) - 1,
                )
            except WeightkitError as err:
                raise WeightkitError(f"slices[{i}]: {err}") from None
            parts.append(part)
            merged_layers += part.plan.num_layers
        updates = layer_count_update(
            reference.config or {}, counts[reference.path.resolve()], merged_layers, reference.path
        )
        if tokenizer_source == "base":
            updates["vocab_size"] = _cut_to_tokenizer([part.plan for part in parts], reference)
    except BaseException:
        for part in parts:
            close_plan(part.plan, part.models)
        for r in readers.values():
            r.close()
        raise
    return parts, reference, updates


def _plan_slice(
    piece: MergeSlice,
    base: str | Path | None,
    config: Any,
    method: str,
    reader_of: Callable[[Path], CheckpointReader],
    reference: CheckpointReader,
    first_layer: int,
    *,
    first: bool,
    last: bool,
) -> MergePart:
    """A slice as a part whose layers are written from output layer ``first_layer`` on; the ``first``
    slice also merges the tensors before the layers, the ``last`` those after them (both for one slice)."""
    sources = list(piece.sources)
    if base is not None:  # the base's reader comes first, at the layers its source gives
        listed = [s for s in sources if s.model.resolve() == Path(base).resolve()]
        if not listed:
            raise WeightkitError(
                f"the base model {base} is not among the slice's sources; mergekit merges a slice against "
                "the layers its base model's source gives (add it with its layer_range)"
            )
        sources = listed + [s for s in sources if s not in listed]
    part_config = slice_config(config, piece.parameters)
    specs = [{"model": s.model, "parameters": s.parameters} for s in sources]
    parsed = _models(base, specs, part_config, method)
    readers = [reader_of(s.model) for s in sources]
    length = sources[0].layer_range[1] - sources[0].layer_range[0]
    plan = MergePlan(readers, has_base=base is not None, num_layers=length)
    try:
        outside = _names_outside_layers(readers, reference) if first or last else []
        if first:
            plan.jobs += [_plan_tensor(readers, name) for name in outside if before_layers(name)]
        for offset in range(length):
            layers = [s.layer_range[0] + offset for s in sources]
            for name in _layer_names(readers, layers):
                wanted = [with_layer_index(name, layer) for layer in layers]
                job = _plan_tensor(readers, with_layer_index(name, first_layer + offset), wanted)
                job.t, job.input_names = slice_position(offset, length), wanted
                plan.jobs.append(job)
        if last:
            plan.jobs += [_plan_tensor(readers, name) for name in outside if not before_layers(name)]
        parsed = _check_part(plan, parsed, part_config, method)
    except BaseException:
        close_plan(None, parsed)
        raise
    return MergePart(plan, parsed, part_config)


def _names_outside_layers(readers: list[CheckpointReader], reference: CheckpointReader) -> list[str]:
    """The tensors outside the layers any of ``readers`` has: the first's in its order, then the others'.

    ``lm_head.weight`` is among them when the reference model stores it: the output ties ``lm_head`` to
    the embeddings exactly when the reference does (a tied model contributes its embedding matrix).
    """
    names = [n for n in readers[0].names() if layer_index(n) is None and n != _TIED_HEAD]
    others = {n for r in readers[1:] for n in r.names() if layer_index(n) is None}
    names += sorted(others - set(names) - {_TIED_HEAD})
    return names + ([_TIED_HEAD] if _TIED_HEAD in reference else [])


def _layer_names(readers: list[CheckpointReader], layers: list[int]) -> list[str]:
    """The tensors of layer ``layers[i]`` of each reader, named at the first reader's layer: the first
    reader's in its order, then those only the others have (which the plan then refuses as missing)."""
    names = [n for n in readers[0].names() if layer_index(n) == layers[0]]
    others = {
        with_layer_index(n, layers[0])
        for r, layer in zip(readers[1:], layers[1:], strict=True)
        for n in r.names()
        if layer_index(n) == layer
    }
    return names + sorted(others - set(names))


def _cut_to_tokenizer(plans: list[MergePlan], reference: CheckpointReader) -> int:
    """``tokenizer_source: base``: cut the input embedding and ``lm_head`` of ``plans`` to the reference
    tokenizer's length, as mergekit does, and return that length (the output's ``vocab_size``).

    mergekit rebuilds each model's vocabulary tensors in the order of the reference tokenizer's tokens,
    found by text in each model's own tokenizer. When every model's tokenizer gives those tokens the ids
    the reference gives them (or the model has no tokenizer, which mergekit reads as the reference's),
    that is the first rows of each; otherwise the rows would move, which weightkit does not do.

    Raises:
        WeightkitError: the reference has no tokenizer or no ``vocab_size``; its tokenizer is longer than
            its ``vocab_size`` (mergekit then edits the tokenizer); a model's tokenizer gives a token
            another id; a model has fewer rows than the tokenizer has tokens; or another tensor outside
            the layers has ``vocab_size`` rows (weightkit would not know whether its rows are tokens).
    """
    vocabulary = _vocabulary(reference)
    vocab_size = (reference.config or {}).get("vocab_size")
    if vocabulary is None or vocab_size is None:
        raise WeightkitError(
            f"tokenizer_source: base needs the tokenizer and config vocab_size of {reference.path}"
        )
    tokens = len(vocabulary)
    if tokens > vocab_size:
        raise WeightkitError(
            f"tokenizer_source: base: the tokenizer of {reference.path} has {tokens} tokens, more than its "
            f"vocab_size {vocab_size}; mergekit removes the extra tokens from the tokenizer, which "
            "weightkit does not edit"
        )
    names = {_TIED_HEAD, _embedding_name(reference)}
    checked: set[Path] = set()
    for plan in plans:
        for job in plan.jobs:
            if job.name not in names:
                # Tokens index no tensor inside the layers; outside them, a vocab_size-row tensor may be
                # another output head (BERT's cls.predictions, GPT-NeoX's embed_out).
                outside = layer_index(job.name) is None
                if outside and tokens < vocab_size and job.shape[0] == vocab_size:
                    raise WeightkitError(
                        f"tokenizer_source: base: {job.name} has vocab_size ({vocab_size}) rows; weightkit "
                        "cuts only the input embedding and lm_head.weight to the tokenizer's length"
                    )
                continue
            for reader, source in zip(plan.readers, job.sources, strict=True):
                if reader.shape(source)[0] < tokens:
                    raise WeightkitError(
                        f"tokenizer_source: base: {source} of {reader.path} has {reader.shape(source)[0]} "
                        f"rows, fewer than the {tokens} tokens of the tokenizer of {reference.path}"
                    )
                if reader.path.resolve() not in checked:
                    checked.add(reader.path.resolve())
                    _check_same_ids(reader, vocabulary, reference)
            job.shape = (tokens, *job.shape[1:])
            job.merged_rows = tokens
    return tokens


def _vocabulary(reader: CheckpointReader) -> dict[str, int] | None:
    """The token ids of a model's tokenizer, or None when it has none."""
    from weightkit.models import load_tokenizer

    tokenizer = load_tokenizer(reader.directory) if reader.directory is not None else None
    return tokenizer.get_vocab() if tokenizer is not None else None


def _check_same_ids(
    reader: CheckpointReader, vocabulary: dict[str, int], reference: CheckpointReader
) -> None:
    own = _vocabulary(reader)
    if own is None:
        return
    moved = [token for token, i in vocabulary.items() if own.get(token) != i]
    if moved:
        raise WeightkitError(
            f"tokenizer_source: base: the tokenizer of {reader.path} gives {len(moved)} token(s) of the "
            f"tokenizer of {reference.path} another id or none (e.g. {moved[0]!r}); mergekit would move "
            "the embedding rows to the reference's ids, which weightkit does not do"
        )


def close_plan(plan: MergePlan | None, models: list[_Model]) -> None:
    """Close every reader of a prepared merge (see :func:`prepare_merge`)."""
    for reader in (plan.readers if plan else []) + [r for m in models for r in m.files.values()]:
        reader.close()
