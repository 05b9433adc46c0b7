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
"""

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader, CheckpointWriter
from weightkit.errors import WeightkitError, require_finite
from weightkit.merge.params import layer_index, value_for
from weightkit.progress import track
from weightkit.registry import entry_for_config
from weightkit.runtime.device import resolve_device

__all__ = [
    "MergePlan",
    "TensorJob",
    "check_architectures",
    "TensorInputs",
    "WorkBuffers",
    "plan_merge",
    "read_job",
    "task_vectors",
    "run_merge",
    "prepare_merge",
    "merge",
    "merge_device",
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


@dataclass
class MergePlan:
    readers: list[CheckpointReader]  # base first (if any), then the models
    has_base: bool
    jobs: list[TensorJob] = field(default_factory=list)
    num_layers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where tensors are merged

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


def plan_merge(base: str | Path | None, models: list[str | Path], *, allow_pickle: bool = False) -> MergePlan:
    """Open every checkpoint and check that they can be merged; nothing is computed yet.

    Raises:
        WeightkitError: different architectures, a tensor missing from some model, shapes that differ
            (other than vocabulary rows), or fewer models than a merge needs.
    """
    paths = ([Path(base)] if base is not None else []) + [Path(m) for m in models]
    if base is not None:
        paths = [paths[0]] + [p for p in paths[1:] if p.resolve() != paths[0].resolve()]
    if len(paths) < 2:
        raise WeightkitError("a merge needs at least two models (counting the base model)")
    readers = [CheckpointReader(p, allow_pickle=allow_pickle) for p in paths]
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
            plan.jobs.append(_plan_tensor(readers, name))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return plan


def _plan_tensor(readers: list[CheckpointReader], name: str) -> TensorJob:
    sources = [_source(r, name) for r in readers]
    missing = [str(r.path) for r, s in zip(readers, sources, strict=True) if s is None]
    if missing:
        have = [str(r.path) for r, s in zip(readers, sources, strict=True) if s is not None]
        raise WeightkitError(f"tensor {name} is in {', '.join(have)} but missing from {', '.join(missing)}")
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


def run_merge(
    plan: MergePlan,
    merge_tensor,
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
    start = time.perf_counter()
    total = 0
    buffers = WorkBuffers(plan.device)
    try:
        with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            _write_config(writer, plan, dtype)  # before copy_files, which keeps files already written
            for job in track(plan.jobs, "merging", enabled=progress):
                checked = not propagates_non_finite or job.merged_rows is not None
                merged = merge_tensor(job.name, read_job(plan, job, buffers, check=checked))
                reference = plan.reference.get(job.sources[0]) if job.merged_rows is not None else None
                if reference is not None and job.shape[0] > job.merged_rows:
                    merged = torch.cat(
                        [merged, reference[job.merged_rows :].to(merged.device, torch.float32)]
                    )
                try:
                    require_finite(merged, f"{job.name} (merged)")
                except WeightkitError:
                    if not checked:
                        _require_finite_inputs(plan, job)  # name the input at fault, if one is
                    raise
                merged = merged.to(dtype or plan.reference.dtype(job.sources[0]))
                if buffers.holds(merged):  # the writer keeps it; the next read would overwrite it
                    merged = merged.clone()
                total += merged.numel() * merged.element_size()
                writer.add(job.name, merged)
            if plan.reference.directory is not None:
                writer.copy_files(plan.reference.directory)
    finally:
        for r in plan.readers:
            r.close()
    return {"tensors": len(plan.jobs), "output_bytes": total, "seconds": time.perf_counter() - start}


def _write_config(writer: CheckpointWriter, plan: MergePlan, dtype: torch.dtype | None) -> None:
    config = dict(plan.reference.config or {})
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


def _resolve(spec_source: Any, key: str, name: str, num_layers: int, what: str) -> Any:
    value = value_for(spec_source, name, num_layers)
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
    sources = job.sources[1:] if plan.has_base else job.sources
    params = []
    for model, source in zip(models, sources, strict=True):
        values: dict[str, Any] = {}
        for key in getattr(config, "per_model", ()):
            if key in model.files:  # stored under the model's own name (its embedding for a tied lm_head)
                values[key] = model.files[key].get(source).to(plan.device, torch.float32)
                continue
            own, default = model.overrides.get(key), getattr(config, key)
            value = None if own is None else value_for(own, name, plan.num_layers)
            if value is None and default is not None:  # no value of its own, or none of its filters matched
                value = _resolve(default, key, name, plan.num_layers, str(model.path))
            values[key] = value
        params.append(values)
    shared = {
        key: _resolve(getattr(config, key), key, name, plan.num_layers, "parameters")
        for key in getattr(config, "per_tensor", ())
    }
    return TensorInputs(name, base, merged, params, shared)


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
) -> dict:
    """Merge ``models`` (with ``base``) into one checkpoint at ``out_dir`` with the method ``config`` names.

    Methods whose per-tensor work is heavy (the sparsifying ones: TIES, DARE, Breadcrumbs, DELLA, and PCB,
    SCE and Arcee Fusion: sorts, selections, random masks, many products) merge each tensor on ``device``.
    The others (linear, task arithmetic without a sparsifier, SLERP, NuSLERP, Multi-SLERP, Karcher,
    NearSwap, Model Stock, Fisher, MWA) always merge on the CPU: their
    work is a few passes of elementwise arithmetic, cheaper than moving the tensors to a GPU and back (on
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

    Returns:
        A summary: method, models, tensors, output bytes, seconds, device, and what the method reports
        (e.g. the sign-conflict rate of TIES-like methods).

    Raises:
        WeightkitError: bad models or parameters (see :func:`prepare_merge`), NaN/Inf in a tensor, or a
            device this machine does not have.
    """
    entry = entry_for_config(config)
    compute = merge_device(config, device)
    plan, parsed = prepare_merge(base, models, config, allow_pickle=allow_pickle)
    plan.device = compute
    model_params = [
        {k: m.overrides.get(k, getattr(config, k)) for k in getattr(config, "per_model", ())} for m in parsed
    ]
    try:
        merger = entry.fn(config, plan, model_params)
    except BaseException:
        close_plan(plan, parsed)
        raise

    jobs = {job.name: job for job in plan.jobs}

    def merge_tensor(name: str, tensors: list[Tensor]) -> Tensor:
        return merger(_tensor_inputs(config, plan, parsed, jobs[name], tensors))

    try:
        summary = run_merge(
            plan,
            merge_tensor,
            out_dir,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            progress=progress,
            propagates_non_finite=getattr(config, "propagates_non_finite", False),
        )
    finally:
        close_plan(plan, parsed)
    report = getattr(merger, "report", None)
    return {
        "method": entry.name,
        "models": [str(m.path) for m in parsed],
        "base": str(base) if base is not None and plan.has_base else None,
        **summary,
        "device": str(plan.device),
        **(report() if report else {}),
    }


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
    base: str | Path | None, models: list[ModelSpec], config: Any, *, allow_pickle: bool = False
) -> tuple[MergePlan, list[_Model]]:
    """Validate the models and their parameters and plan the merge (headers only); nothing is read."""
    method = entry_for_config(config).name
    parsed = _models(base, models, config, method)
    try:
        # A method whose base is optional (base_optional) uses one when it is given.
        uses_base = getattr(config, "needs_base", True) and base is not None
        plan = plan_merge(base if uses_base else None, [m.path for m in parsed], allow_pickle=allow_pickle)
        if uses_base:  # plan_merge drops the base from the models if it was listed there too
            parsed = [m for m in parsed if m.path.resolve() != Path(base).resolve()]
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
            wanted = (
                f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
            )
            besides = " besides the base model" if uses_base else ""
            raise WeightkitError(f"{method} merges {wanted} model(s){besides}, got {len(parsed)}")
    except BaseException:
        close_plan(None, parsed)
        raise
    return plan, parsed


def close_plan(plan: MergePlan | None, models: list[_Model]) -> None:
    """Close every reader of a prepared merge (see :func:`prepare_merge`)."""
    for reader in (plan.readers if plan else []) + [r for m in models for r in m.files.values()]:
        reader.close()
