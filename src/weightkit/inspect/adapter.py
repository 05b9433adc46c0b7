"""What a PEFT LoRA adapter does to each weight it adapts, read from its factors.

For an adapted module with factors ``A`` (``[r, in]``) and ``B`` (``[out, r]``) the weight change is
``ΔW = s · B A`` with ``s = lora_alpha / r`` ("LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685) or ``s = lora_alpha / sqrt(r)`` with ``use_rslora`` ("A Rank Stabilization Scaling Factor
for Fine-Tuning with LoRA", arXiv 2312.03732), ``r`` and ``lora_alpha`` taken per module from PEFT's
``rank_pattern``/``alpha_pattern`` when a key matches, exactly as PEFT matches them.

``ΔW`` is never formed. With the thin QR factorizations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``,
``ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ`` with orthonormal columns in ``Q_B`` and ``Q_A``, so ``ΔW`` has the singular
values of the ``r x r`` core ``s R_B R_Aᵀ`` (:func:`lora_core`): the rank measures of
:mod:`weightkit.inspect.spectral` applied to the core are those of ``ΔW``, at ``O((in + out) r^2)`` cost.

Only plain LoRA on linear layers is read. Anything that would make ``s · B A`` not the module's weight
change is refused by name: another ``peft_type``, DoRA, ``fan_in_fan_out``, ``modules_to_save``, trained
biases, LoRA on embeddings or convolutions, initialisations that also rewrite the base weights (PiSSA,
OLoRA, LoftQ, CorDA, LoRA-GA ...), and any other set option this module does not know.
"""

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from weightkit.checkpoint import CheckpointReader
from weightkit.checkpoint.files import read_adapter_config
from weightkit.errors import WeightkitError
from weightkit.inspect.change import TOP_SINGULAR_VALUES, Table
from weightkit.inspect.spectral import effective_rank, stable_rank

__all__ = ["lora_scaling", "lora_core", "pattern_value", "adapter_metrics"]

# adapter_config.json fields that do not change ΔW = s·BA given the stored factors (which modules were
# adapted is read from the tensors; dropout only acts in training) or that are handled here.
_HARMLESS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights",
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    # Initialisation settings: init_lora_weights says whether they were used (checked below).
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # Only read when their switch (megatron_config, use_qalora) is on, which is refused.
    "megatron_core", "qalora_group_size",
}  # fmt: skip
# Initialisations that leave the base weights alone, so the adapter's ΔW is the change to the base.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")
_OFF = (None, False, "none", {}, [])
_PREFIX = "base_model.model."


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / sqrt(rank)`` with rsLoRA, else ``alpha / rank``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_core(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The ``r x r`` core ``s R_B R_Aᵀ`` (float64) whose singular values are those of ``ΔW = s B A``.

    Args:
        a: ``[r, in]``, PEFT's ``lora_A.weight``.
        b: ``[out, r]``, PEFT's ``lora_B.weight``.
        scaling: ``s``.
    """
    _, r_b = torch.linalg.qr(b.double())
    _, r_a = torch.linalg.qr(a.double().T)
    return scaling * (r_b @ r_a.T)


def pattern_value(patterns: dict, module: str, default):
    """The value of the first key of PEFT's ``rank_pattern``/``alpha_pattern`` that matches ``module``
    (PEFT's rule: the key, as a regex, matches the whole name or a suffix after a dot), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    config = read_adapter_config(directory)
    if config.get("peft_type") != "LORA":
        raise WeightkitError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only 'LORA')")
    if config.get("init_lora_weights", True) not in _BASE_PRESERVING_INITS:
        raise WeightkitError(
            f"{path}: init_lora_weights {config['init_lora_weights']!r} also rewrites the base weights, so "
            f"s·BA is not the change to the base model; not supported"
        )
    for key, value in config.items():
        if key not in _HARMLESS and value not in _OFF:
            raise WeightkitError(f"{path}: {key} = {value!r} is not supported (s·BA would not be ΔW)")
    return config


def _modules(reader: CheckpointReader, directory: Path) -> list[str]:
    """The adapted modules' names in the base model, checking every tensor is a plain LoRA factor and
    every module has both factors."""
    factors: dict[str, list[str]] = {".lora_A.weight": [], ".lora_B.weight": []}
    for name in reader.names():
        suffix = next((s for s in factors if name.startswith(_PREFIX) and name.endswith(s)), None)
        if suffix is None:
            raise WeightkitError(
                f"{directory}: tensor {name} is not a LoRA factor of a linear layer "
                f"(base_model.model.NAME.lora_A/lora_B.weight); not supported"
            )
        factors[suffix].append(name.removeprefix(_PREFIX).removesuffix(suffix))
    a_modules, b_modules = factors.values()
    unpaired = sorted(set(a_modules) ^ set(b_modules))
    if unpaired:
        raise WeightkitError(f"{directory}: {', '.join(unpaired)} lack(s) lora_A or lora_B")
    return a_modules


def adapter_metrics(adapter_dir: str | Path) -> Table:
    """Per adapted module of the PEFT LoRA adapter in ``adapter_dir``, the metrics of ``ΔW = s B A``.

    Row keys: ``name`` (the adapted weight's name in the base checkpoint, ``NAME.weight``), ``shape``
    (of ``ΔW``), ``status`` (``"compared"``, or ``"zero"`` when ``ΔW = 0``, e.g. an untrained adapter
    with ``B = 0``), ``reason``, ``rank`` (the nominal ``r``), ``alpha``, ``scaling``, ``effective_rank``,
    ``stable_rank`` (None for a zero ``ΔW``), ``frobenius_norm``, ``spectral_norm``, ``singular_values``
    (the largest :data:`~weightkit.inspect.change.TOP_SINGULAR_VALUES` of ``ΔW``, a list).

    Summary keys: ``modules``, ``total_rank`` (sum of ``r``), ``frobenius_norm`` (of all ``ΔW`` as one
    vector).

    Raises:
        WeightkitError: not a LoRA adapter directory, an unsupported option or tensor (module docstring),
            or factors whose shapes disagree with each other or with the configured rank.
    """
    directory = Path(adapter_dir)
    config = _read_config(directory)
    rows = []
    with CheckpointReader(directory / "adapter_model.safetensors") as reader:
        for module in _modules(reader, directory):
            a = reader.get_finite(f"{_PREFIX}{module}.lora_A.weight")
            b = reader.get_finite(f"{_PREFIX}{module}.lora_B.weight")
            rank = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
            alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise WeightkitError(
                    f"{directory}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"expected [{rank}, in] and [out, {rank}] for its configured rank {rank}"
                )
            scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora")))
            core = lora_core(a, b, scaling)
            values = torch.linalg.svdvals(core)
            zero = values[0] == 0
            rows.append(
                {
                    "name": f"{module}.weight",
                    "shape": [b.shape[0], a.shape[1]],
                    "status": "zero" if zero else "compared",
                    "reason": "ΔW is zero (lora_B or lora_A is all zeros)" if zero else None,
                    "rank": rank,
                    "alpha": alpha,
                    "scaling": scaling,
                    "effective_rank": None if zero else effective_rank(core),
                    "stable_rank": None if zero else stable_rank(core),
                    "frobenius_norm": float(torch.linalg.vector_norm(values)),
                    "spectral_norm": float(values[0]),
                    "singular_values": values[:TOP_SINGULAR_VALUES].tolist(),
                }
            )
    summary = {
        "modules": len(rows),
        "total_rank": sum(row["rank"] for row in rows),
        "frobenius_norm": math.sqrt(sum(row["frobenius_norm"] ** 2 for row in rows)),
    }
    return Table(rows, summary)
