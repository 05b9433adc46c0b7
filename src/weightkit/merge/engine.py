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

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader, CheckpointWriter
from weightkit.errors import WeightkitError, require_finite
from weightkit.progress import track

__all__ = ["MergePlan", "TensorJob", "plan_merge", "run_merge"]

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


def _check_architectures(readers: list[CheckpointReader]) -> None:
    def arch(r):
        config = r.config or {}
        return config.get("model_type"), tuple(config.get("architectures") or ())

    first = arch(readers[0])
    for r in readers[1:]:
        if arch(r) != first:
            raise WeightkitError(
                f"different architectures: {readers[0].path} is {first[0]} {list(first[1])}, "
                f"{r.path} is {arch(r)[0]} {list(arch(r)[1])}; only models of one architecture can be merged"
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
        _check_architectures(readers)
        reference = readers[0]
        plan.num_layers = int((reference.config or {}).get("num_hidden_layers", 0))
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


def _read(reader: CheckpointReader, source: str) -> Tensor:
    tensor = reader.get(source)
    require_finite(tensor, f"{source} of {reader.path}")
    return tensor


def run_merge(
    plan: MergePlan,
    merge_tensor,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Stream the plan: for each job, read every model's tensor, merge it and write the result.

    Args:
        plan: from :func:`plan_merge` (its readers are closed at the end).
        merge_tensor: ``merge_tensor(name, tensors) -> Tensor`` with ``tensors`` in float32, base first
            when the plan has one; returns the merged tensor.
        out_dir: the output model directory (written atomically).
        dtype: output dtype (default: the reference model's dtype of each tensor).

    Returns:
        A summary: tensors merged, output bytes, seconds.
    """
    start = time.perf_counter()
    total = 0
    try:
        with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            _write_config(writer, plan, dtype)  # before copy_files, which keeps files already written
            for job in track(plan.jobs, "merging", enabled=progress):
                inputs = [_read(r, s) for r, s in zip(plan.readers, job.sources, strict=True)]
                out_dtype = dtype or inputs[0].dtype
                rows = job.merged_rows
                work = [t.float() if rows is None else t[:rows].float() for t in inputs]
                merged = merge_tensor(job.name, work)
                if rows is not None and job.shape[0] > rows:
                    merged = torch.cat([merged, inputs[0][rows:].float()])
                require_finite(merged, f"{job.name} (merged)")
                merged = merged.to(out_dtype)
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
