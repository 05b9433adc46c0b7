"""Comparing checkpoints (``weightkit inspect MODEL --compare OTHER ...``): one entry point, :func:`compare`.

It decides what each OTHER is and returns named tables (:class:`~weightkit.inspect.change.Table`: rows, one
per tensor or layer, each with ``name``, plus a summary) from:

- :func:`~weightkit.inspect.change.compare_checkpoints`: a fine-tune against its base;
- :func:`~weightkit.inspect.quant_error.quantization_error`: a compressed-tensors quantized copy (SQNR);
- :func:`~weightkit.inspect.adapter.adapter_metrics`: a PEFT LoRA adapter's ΔW per module;
- :func:`~weightkit.inspect.task_vectors.task_vector_agreement`: TIES sign conflicts and cosines of several
  fine-tunes of one base.
"""

from pathlib import Path

from weightkit.checkpoint import CheckpointReader
from weightkit.inspect.adapter import adapter_metrics
from weightkit.inspect.change import Table, compare_checkpoints
from weightkit.inspect.quant_error import quantization_error
from weightkit.inspect.task_vectors import task_vector_agreement
from weightkit.quantized.compressed_tensors import is_quantized_checkpoint

__all__ = [
    "compare",
    "Table",
    "compare_checkpoints",
    "quantization_error",
    "adapter_metrics",
    "task_vector_agreement",
]


def _is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def compare(base: str | Path, others: list[str | Path], *, density: float | None = None) -> dict[str, Table]:
    """Compare ``base`` with each of ``others``, each in the way that fits what it is.

    The rule, for each OTHER in order (table names in quotes):

    1. a directory with ``adapter_config.json`` is a PEFT adapter: ``"adapter:OTHER"``, its
       :func:`~weightkit.inspect.adapter.adapter_metrics` (the adapter's own ΔW; ``base`` is not read);
    2. a checkpoint whose ``config.json`` has a compressed-tensors ``quantization_config`` is a quantized
       copy of ``base``: ``"quantization:OTHER"``, :func:`~weightkit.inspect.quant_error.quantization_error`;
    3. anything else is a full checkpoint: ``"change:OTHER"``,
       :func:`~weightkit.inspect.change.compare_checkpoints`.

    With two or more full checkpoints, they are also taken as fine-tunes of ``base``: ``"task_vectors"``,
    :func:`~weightkit.inspect.task_vectors.task_vector_agreement` over them, with ``density``.

    Returns:
        Table name -> :class:`Table`, in the order above.
    """
    tables: dict[str, Table] = {}
    full = []
    for other in others:
        path = Path(other)
        if _is_adapter(path):
            tables[f"adapter:{other}"] = adapter_metrics(path)
            continue
        with CheckpointReader(path) as reader:
            quantized = is_quantized_checkpoint(reader.config)
        if quantized:
            tables[f"quantization:{other}"] = quantization_error(base, path)
        else:
            tables[f"change:{other}"] = compare_checkpoints(base, path)
            full.append(path)
    if len(full) >= 2:
        tables["task_vectors"] = task_vector_agreement(base, full, density=density)
    return tables
