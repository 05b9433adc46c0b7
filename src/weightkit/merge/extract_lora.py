"""LoRA extraction: approximate a fine-tune by a PEFT LoRA adapter on its base model.

For every Linear layer whose weight changed, the difference ``delta = W_finetuned - W_base`` is replaced
by its best rank-``r`` approximation (truncated SVD; Eckart & Young, 1936) written as two LoRA factors,
``delta ~ lora_B @ lora_A`` (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685). The output is an ordinary PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads as is.

Choices, and why:

- **The split is balanced**: with ``delta ~ U_r diag(S_r) V_r^T``, ``lora_B = U_r diag(sqrt(S_r))`` and
  ``lora_A = diag(sqrt(S_r)) V_r^T`` (as PiSSA initialises its adapters, arXiv 2404.02948). The product,
  and so the error, is the same for any split; balanced factors have equal norms, so neither factor's
  range is far from the other's when stored in bf16/fp16, and gradients of further training of the
  adapter are not skewed towards one factor.
- **Scaling is 1**: PEFT applies ``W + (lora_alpha / r) * lora_B @ lora_A``, and ``lora_alpha = r`` (per
  module through ``alpha_pattern`` where the rank had to be capped), so the factors are the delta itself.
- **Targets are full module names** (``model.layers.0.self_attn.q_proj``): PEFT matches a list entry
  by equality or as a dotted suffix, so a full name targets exactly that module. Suffixes such as
  ``q_proj`` would also wrap the layers whose weights did not change (harmless but slower), and a regex
  would be harder to read than the list.
- **Module types come from the model class**: the architecture in ``config.json`` is built on the meta
  device (no memory), so a Linear layer is told apart from an embedding, and GPT-2's ``Conv1D`` (which
  stores its weight transposed) gets transposed factors. When the class cannot be built (unknown
  architecture), types are guessed from names: every 2-D ``*.weight`` except embeddings is a Linear.
- **Other changed modules are saved whole** (``modules_to_save="auto"``): embeddings, norms, an output
  head tied to the embeddings and weights of other layer types get no LoRA factors (PEFT's embedding LoRA
  has other key names and, with tied embeddings, would not reach the output head). A module one of whose
  tensors changed by at least 0.1% of its norm is stored whole as PEFT's ``modules_to_save`` and PEFT
  uses the fine-tune's copy of it (mergekit's extract-lora stores every embedding and every layer it
  cannot factor so, changed or not). Full module names again, so that the unchanged norms of other
  layers are not copied. A tied head is saved with the embeddings (PEFT copies each saved module on its
  own, so the head would otherwise keep the base's weight). Changed tensors left out (below the
  threshold, biases of layers that get LoRA factors, ``"none"``) are listed as skipped, with their
  relative change, and the largest is named in a warning.
"""

import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from weightkit.checkpoint import CheckpointReader, CheckpointWriter, Provenance
from weightkit.checkpoint.files import PEFT_ADAPTER_WEIGHTS, PEFT_KEY_PREFIX
from weightkit.errors import WeightkitError, require_finite
from weightkit.linalg import largest_entry_signs
from weightkit.merge.engine import check_architectures
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import refuse_quantized

__all__ = ["lowrank_delta", "extract_lora"]

_SVD_METHODS = ("auto", "full", "randomized")
# "auto" computes the exact SVD up to this many rows or columns and the randomized one above it. Measured
# on 2 CPU cores, float32 2048 x 2048: exact SVD 2.4 s; randomized (oversample r, 4 power iterations)
# 0.06 s at rank 16, 0.2 s at rank 64, 0.4 s at rank 128, with errors 0.1-0.2% above the optimum on a
# flat (Gaussian) spectrum and 0.002% on a decaying one. The exact SVD scales as n^3 (~0.3 s at 1024).
_FULL_SVD_MAX_DIM = 1024
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "shared")
_SAVE_MODES = ("auto", "none")
# modules_to_save="auto" saves a module whole when one of its tensors changed by at least this fraction of
# its norm. bfloat16 rounds each value by up to 2^-9 (0.2%), about 0.1% of a tensor's norm: a smaller
# change is that of storing the weights once more in bfloat16, not of training, and not worth a copy of an
# embedding table (vocabulary x hidden size) in the adapter.
_SAVE_THRESHOLD = 1e-3


# -- the math -------------------------------------------------------------------------------------------


def _randomized_svd(
    matrix: Tensor, rank: int, width: int, niter: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets from a randomized range finder with ``niter`` power iterations.

    Halko, Martinsson & Tropp, "Finding Structure with Randomness", arXiv 0909.4061 (algorithms 4.4 and
    5.1). Re-orthonormalising after every multiplication keeps small singular directions from being
    lost to rounding. The Gaussian test matrix comes from its own seeded generator, so the result does
    not depend on (or change) the global random state.
    """
    generator = torch.Generator().manual_seed(seed)
    test = torch.randn(matrix.shape[1], width, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ test).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small_u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_u[:, :rank], s[:rank], vh[:rank]


def lowrank_delta(
    delta: Tensor,
    rank: int,
    *,
    method: str = "auto",
    oversample: int | None = None,
    niter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` approximation of a weight difference, as LoRA factors.

    ``lora_B @ lora_A`` is the truncated SVD ``U_r diag(S_r) V_r^T`` of ``delta``, split in balance:
    ``lora_B = U_r diag(sqrt(S_r))`` and ``lora_A = diag(sqrt(S_r)) V_r^T``. By the Eckart-Young theorem
    no rank-``r`` matrix is closer to ``delta`` in Frobenius norm, and the relative error is
    ``sqrt(sum_{i >= r} S_i^2) / ||delta||_F``.

    Args:
        delta: a 2-D tensor ``[out_features, in_features]`` (``W_finetuned - W_base`` of a Linear layer),
            any floating dtype; the work is done in float32. Not modified.
        rank: the rank ``r >= 1``. **Cap rule**: a rank above ``min(out_features, in_features)`` is
            lowered to it (then the factors reproduce ``delta`` up to rounding); the returned shapes show
            the rank used.
        method: ``"full"`` computes the exact SVD (``torch.linalg.svd``); ``"randomized"`` a randomized
            one (a range finder with power iterations) that costs ``O(out * in * (r + oversample))``
            per pass instead of ``O(out * in * min(out, in))`` and is within a fraction of a percent
            of the optimal error at the default settings; ``"auto"`` uses the exact SVD when
            ``min(out, in) <= 1024`` or when ``r + oversample`` is at least half of ``min(out, in)``,
            else the randomized one.
        oversample: extra directions the randomized SVD keeps beyond ``r`` (default ``max(r, 8)``).
        niter: power iterations of the randomized SVD (more is closer to optimal on flat spectra).
        seed: seed of the randomized SVD's test matrix; the same inputs and seed give the same factors.

    Returns:
        ``(lora_A, lora_B, relative_error)``: ``lora_A`` is ``[r, in_features]``, ``lora_B`` is
        ``[out_features, r]``, both float32 on ``delta``'s device; ``relative_error`` is
        ``||delta - lora_B @ lora_A||_F / ||delta||_F``. A zero ``delta`` gives zero factors and 0.0.

    Raises:
        WeightkitError: ``delta`` is not 2-D or holds NaN/Inf; ``rank < 1``; a bad ``method``,
            ``oversample`` or ``niter``.
    """
    if delta.ndim != 2:
        raise WeightkitError(f"lowrank_delta needs a 2-D matrix, got a tensor of shape {list(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WeightkitError(f"rank must be an integer >= 1, got {rank!r}")
    if method not in _SVD_METHODS:
        raise WeightkitError(f"unknown SVD method {method!r}: expected one of {', '.join(_SVD_METHODS)}")
    if oversample is not None and oversample < 0:
        raise WeightkitError(f"oversample must be >= 0, got {oversample}")
    if niter < 0:
        raise WeightkitError(f"niter must be >= 0, got {niter}")
    if not delta.is_floating_point():
        raise WeightkitError(f"lowrank_delta needs a floating-point matrix, got {delta.dtype}")
    require_finite(delta, "delta")

    matrix = delta.detach().float()
    out_features, in_features = matrix.shape
    smaller = min(out_features, in_features)
    r = min(rank, smaller)
    norm = float(torch.linalg.matrix_norm(matrix, ord="fro")) if matrix.numel() else 0.0
    if norm == 0.0:
        zeros_a = torch.zeros(r, in_features, device=matrix.device)
        return zeros_a, torch.zeros(out_features, r, device=matrix.device), 0.0

    width = min(r + (max(r, 8) if oversample is None else oversample), smaller)
    exact = method == "full" or (method == "auto" and (smaller <= _FULL_SVD_MAX_DIM or 2 * width >= smaller))
    if exact:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        power = s.double().square()
        # From the singular values, not a subtraction: the small discarded ones are accurate to
        # eps * S_max, while ||delta - BA|| computed in float32 has rounding noise of eps * ||delta||.
        error = math.sqrt(float(power[r:].sum() / power.sum()))
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, vh = _randomized_svd(matrix, r, width, niter, seed)
    # A singular pair is defined up to a common sign; fixing it makes the factors a function of the delta.
    signs = largest_entry_signs(u, dim=0)
    u, vh = u * signs, vh * signs[:, None]
    root = s.clamp_min(0).sqrt()
    lora_b = (u * root).contiguous()
    lora_a = (root[:, None] * vh).contiguous()
    if not exact:
        error = float(torch.linalg.matrix_norm(matrix - lora_b @ lora_a, ord="fro")) / norm
    return lora_a, lora_b, error


# -- which tensors become LoRA factors --------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    module: str  # the module's name in the model class, as PEFT sees it
    transposed: bool  # Conv1D stores its weight as [in_features, out_features]


@dataclass(frozen=True)
class _Layout:
    """What each checkpoint tensor is, for the adapter."""

    kinds: dict[str, _Target | str]  # per tensor: its LoRA target, or why it gets no LoRA factors
    owners: dict[str, str | None]  # per tensor: the module holding it (model naming), None if no module does
    # The input embedding and the output head sharing its weight, as (embedding, head) module names.
    tied: tuple[str, str] | None
    # Modules that cannot be saved whole (modules_to_save), and why.
    unsavable: dict[str, str]


def _build_skeleton(reader: CheckpointReader) -> nn.Module | None:
    """The model class of ``config.json`` on the meta device, or None when transformers cannot build it."""
    import transformers

    architectures = (reader.config or {}).get("architectures") or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if reader.directory is None or model_cls is None:
        return None
    try:
        hf_config = transformers.AutoConfig.from_pretrained(reader.directory, local_files_only=True)
        with torch.device("meta"):
            return model_cls(hf_config)
    except Exception:  # an architecture this transformers cannot build: fall back to names
        return None


def _get_or_none(getter) -> nn.Module | None:
    try:
        return getter()
    except (NotImplementedError, AttributeError):  # some model classes define no embeddings accessor
        return None


def _layout_by_model(reader: CheckpointReader, model: nn.Module) -> _Layout:
    from transformers.pytorch_utils import Conv1D

    from weightkit.models import CheckpointNames

    names = CheckpointNames(model, reader.names())
    modules = dict(model.named_modules())
    head, embedding = _get_or_none(model.get_output_embeddings), _get_or_none(model.get_input_embeddings)
    tied_head = head is not None and embedding is not None and head.weight is embedding.weight
    tied = None
    if tied_head:
        tied = tuple(next(n for n, m in modules.items() if m is module) for module in (embedding, head))
    arch = type(model).__name__
    kinds: dict[str, _Target | str] = {}
    owners: dict[str, str | None] = {}
    for name in reader.names():
        owner, _, kind = names.to_model(name).rpartition(".")
        module = modules.get(owner)
        owners[name] = owner if owner and module is not None else None  # "" is the model itself
        if module is None or kind != "weight":
            kinds[name] = f"not the weight of a layer of {arch}"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "embedding: not extracted (PEFT's embedding LoRA is not supported here)"
        elif tied_head and module is head:
            kinds[name] = "output head tied to the input embeddings"
        elif isinstance(module, nn.Linear):
            kinds[name] = _Target(owner, transposed=False)
        elif isinstance(module, Conv1D):
            kinds[name] = _Target(owner, transposed=True)
        else:
            kinds[name] = (
                f"weight of a {type(module).__name__} layer: only Linear and Conv1D get LoRA factors"
            )
    return _Layout(kinds, owners, tied, unsavable={})


def _layout_by_name(reader: CheckpointReader) -> _Layout:
    tied = bool((reader.config or {}).get("tie_word_embeddings", False))
    kinds: dict[str, _Target | str] = {}
    owners: dict[str, str | None] = {}
    unsavable: dict[str, str] = {}
    for name in reader.names():
        module, _, kind = name.rpartition(".")
        last = module.rsplit(".", 1)[-1]
        owners[name] = module or None
        if kind != "weight":
            kinds[name] = "not the weight of a layer"
        elif any(hint in last for hint in _EMBEDDING_HINTS):
            kinds[name] = "embedding: not extracted (PEFT's embedding LoRA is not supported here)"
            if tied:
                # A saved copy of the embeddings would not reach the output head, whose name is unknown here.
                unsavable[module] = (
                    "embedding tied to the output head, whose module is unknown without the model class"
                )
        elif tied and last == "lm_head":
            kinds[name] = "output head tied to the input embeddings"
            unsavable[module] = (
                "output head tied to the input embeddings of an architecture transformers cannot build"
            )
        else:
            kinds[name] = _Target(module, transposed=False)
    return _Layout(kinds, owners, tied=None, unsavable=unsavable)


# -- the checkpoint-level job ------------------------------------------------------------------------------


def _check_pair(base: CheckpointReader, finetuned: CheckpointReader) -> None:
    for reader in (base, finetuned):
        refuse_quantized(
            reader.path, verb="weightkit extract-lora", instead="extract from the full-precision models"
        )
    check_architectures(
        [base, finetuned], why="a LoRA can only be extracted from a fine-tune of the same architecture"
    )
    only_base = [n for n in base.names() if n not in finetuned]
    only_ft = [n for n in finetuned.names() if n not in base]
    if only_base or only_ft:
        where, name = (finetuned.path, only_base[0]) if only_base else (base.path, only_ft[0])
        count = len(only_base) + len(only_ft)
        raise WeightkitError(
            f"tensor {name} is missing from {where} ({count} tensor(s) are in only one of the two models); "
            f"the base and the fine-tuned model must have the same tensors"
        )
    for name in base.names():
        if base.shape(name) != finetuned.shape(name):
            raise WeightkitError(
                f"tensor {name} has different shapes ({base.path}: {list(base.shape(name))}, "
                f"{finetuned.path}: {list(finetuned.shape(name))}); a LoRA cannot change a shape"
            )


def _check_out_dir(out_dir: Path, inputs: list[Path]) -> None:
    target = out_dir.resolve()  # through symlinks: a link to an input is that input
    for path in inputs:
        source = path.resolve()
        if target == source or target in source.parents:
            raise WeightkitError(
                f"the output {out_dir} would replace the input {path}; choose another directory"
            )


def _task_type(reader: CheckpointReader) -> str | None:
    # PEFT's task type picks its wrapper class; CAUSAL_LM adds generate() support. Other task types make
    # PEFT add trainable heads (modules_to_save) the adapter has no weights for, so they are left unset.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = (reader.config or {}).get("architectures") or []
    if not architectures:
        return None
    causal = {
        n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)
    }
    return "CAUSAL_LM" if architectures[0] in causal or architectures[0].endswith("ForCausalLM") else None


def _adapter_config(
    base_name: str,
    rank: int,
    targets: list[dict],
    modules_to_save: list[str],
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict:
    # rank_pattern / alpha_pattern keys are regexes matched against the end of a module's name.
    capped = {re.escape(t["module"]): t["rank"] for t in targets if t["rank"] != rank}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": [t["module"] for t in targets],
        "rank_pattern": capped,
        "alpha_pattern": dict(capped),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _equal_values(a: Tensor, b: Tensor) -> bool:
    # Same numbers stored in two dtypes (a fine-tune saved in float32 from a bfloat16 base) are unchanged.
    if a.is_floating_point() and b.is_floating_point():
        return torch.equal(a.double(), b.double())
    return torch.equal(a, b.to(a.dtype))


def _relative_change(base: Tensor, finetuned: Tensor) -> float | None:
    base32, ft32 = base.float(), finetuned.float()
    base_norm = float(torch.linalg.vector_norm(base32))
    change = float(torch.linalg.vector_norm(ft32 - base32))
    return change / base_norm if base_norm > 0 else None


def extract_lora(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int,
    modules_to_save: str | Sequence[str] = "auto",
    dtype: torch.dtype | None = None,
    svd: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict:
    """Write a PEFT LoRA adapter that turns ``base_dir``'s model into (approximately) ``finetuned_dir``'s.

    Streams tensor by tensor: one tensor of each model is in memory at a time, plus the adapter (which
    is written as one ``adapter_model.safetensors``, as PEFT loads no sharded adapters). Every changed
    weight of a Linear (or GPT-2 ``Conv1D``) layer, including an untied output head, gets rank-``rank``
    factors from :func:`lowrank_delta`; other changed modules (embeddings, norms ...) are saved whole as
    PEFT's ``modules_to_save`` as ``modules_to_save`` says; the changed tensors left out are listed as
    skipped and the largest of them is named in a warning; unchanged tensors are left out silently. The
    output directory appears only when complete.

    Args:
        base_dir: the base model's Hugging Face directory (safetensors weights and ``config.json``). It is
            recorded as the adapter's ``base_model_name_or_path`` as given.
        finetuned_dir: the fine-tuned model's directory, same architecture and tensor shapes.
        out_dir: the adapter directory to create.
        rank: the LoRA rank ``r >= 1``. A layer smaller than ``r`` gets its full rank
            (``rank_pattern``/``alpha_pattern`` entries in the config say so).
        modules_to_save: which modules the adapter holds whole (the fine-tune's tensors, in their dtype),
            so that PEFT puts them in place of the base's. ``"auto"``: every module without LoRA factors
            (embeddings, norms, a Linear layer of which only the bias changed ...) one of whose tensors
            changed by at least 0.1% of its norm (any change of a zero tensor). ``"none"``: no module.
            A list of names: those modules instead of LoRA factors for them, changed or not; a name is a
            module's full name or a dotted suffix of it (``"input_layernorm"`` is every layer's), as
            PEFT matches them. An output head tied to the input embeddings is saved with them.
        dtype: dtype of the stored factors; None stores each in its fine-tuned weight's dtype. The
            reported errors are those of the stored factors.
        svd: ``"auto"``, ``"full"`` or ``"randomized"``; see :func:`lowrank_delta`.
        seed: seed of the randomized SVD.
        overwrite: replace an existing ``out_dir`` (only once the new adapter is complete).
        progress: show a progress bar.
        allow_pickle: also read ``.bin``/``.pt`` pickle checkpoints (unpickling can run code: trusted files
            only).

    Returns:
        A JSON-ready summary: ``out_dir``, ``rank``, ``modules`` (one entry per extracted layer:
        ``module``, ``tensor``, ``shape`` ``[out, in]``, ``rank``, ``relative_error``, ``bytes``),
        ``max_relative_error``, ``modules_to_save`` (one entry per module saved whole: ``module``,
        ``tensors``, ``relative_change`` (the largest of its tensors'), ``bytes``), ``save_threshold`` (the
        relative change from which ``"auto"`` saves a module), ``skipped`` (changed tensors that are not in
        the adapter: ``tensor``, ``shape``, ``relative_change`` = ``||W_ft - W_base|| / ||W_base||`` (None
        for a zero base), ``reason``), ``unchanged`` (count), ``adapter_params``, ``adapter_bytes``,
        ``module_types`` (``"model"`` if layer types came from the model class, ``"names"`` if guessed) and
        ``seconds``.

    Raises:
        WeightkitError: ``rank < 1``; a bad ``svd``, ``dtype`` or ``modules_to_save`` (a name no module
            has, or a module that cannot be saved whole); different architectures, tensor names or
            shapes; a quantized checkpoint; NaN/Inf in a weight; ``out_dir`` exists (without
            ``overwrite``) or is one of the inputs; no Linear weight differs. Nothing is written then.
    """
    start = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise WeightkitError(f"rank must be an integer >= 1, got {rank!r}")
    if svd not in _SVD_METHODS:
        raise WeightkitError(f"unknown SVD method {svd!r}: expected one of {', '.join(_SVD_METHODS)}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise WeightkitError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(modules_to_save, str) and modules_to_save not in _SAVE_MODES:
        raise WeightkitError(
            f"modules_to_save must be 'auto', 'none' or a list of module names, got {modules_to_save!r}"
        )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, [Path(base_dir), Path(finetuned_dir)])

    base = CheckpointReader(base_dir, allow_pickle=allow_pickle)
    try:
        finetuned = CheckpointReader(finetuned_dir, allow_pickle=allow_pickle)
    except BaseException:
        base.close()
        raise
    try:
        _check_pair(base, finetuned)
        skeleton = _build_skeleton(base)
        module_types = "names" if skeleton is None else "model"
        layout = _layout_by_name(base) if skeleton is None else _layout_by_model(base, skeleton)
        del skeleton
        named = None if isinstance(modules_to_save, str) else _named_modules(modules_to_save, layout)
        settings = {
            "rank": rank,
            "modules_to_save": modules_to_save if named is None else list(modules_to_save),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "svd": svd,
            "seed": seed,
        }
        provenance = Provenance("extract-lora", "lora", settings, (base_dir, finetuned_dir))
        summary = _stream(
            base, finetuned, layout, modules_to_save if named is None else named, out_dir, str(base_dir),
            rank, dtype, svd, seed, overwrite, progress, provenance,
        )  # fmt: skip
    finally:
        base.close()
        finetuned.close()
    if summary["skipped"]:
        _warn_left_out(summary["skipped"])
    summary["module_types"] = module_types
    summary["seconds"] = time.perf_counter() - start
    return summary


def _named_modules(names: Sequence[str], layout: _Layout) -> set[str]:
    """The modules ``names`` stands for: each name is a module's full name or a dotted suffix of it."""
    if not names or not all(isinstance(name, str) and name for name in names):
        raise WeightkitError(f"modules_to_save needs module names, got {list(names)!r}")
    modules = {owner for owner in layout.owners.values() if owner is not None} | set(layout.tied or ())
    chosen: set[str] = set()
    for name in names:
        matched = {module for module in modules if module == name or module.endswith("." + name)}
        if not matched:
            examples = ", ".join(sorted(modules, key=len)[:4])
            raise WeightkitError(
                f"modules_to_save: no module of the model is named {name!r} or ends with '.{name}' "
                f"(modules are named like {examples})"
            )
        refused = sorted(matched & layout.unsavable.keys())
        if refused:
            raise WeightkitError(
                f"modules_to_save: {refused[0]} cannot be saved whole: {layout.unsavable[refused[0]]}"
            )
        chosen |= matched
    return _with_tied(chosen, layout.tied)


def _with_tied(modules: set[str], tied: tuple[str, str] | None) -> set[str]:
    # PEFT gives each saved module its own copy: a saved embedding alone would leave the head tied to it on
    # the base's weight, so the embedding and the head sharing its weight are saved together.
    return modules | set(tied) if tied and modules & set(tied) else modules


def _auto_modules(left_out: list[dict], lora_modules: set[str], layout: _Layout) -> set[str]:
    """The modules ``"auto"`` saves whole: without LoRA factors, with a tensor changed by the threshold."""
    chosen = set()
    for item in left_out:
        module, change = layout.owners[item["tensor"]], item["relative_change"]
        if module is None or module in lora_modules or module in layout.unsavable:
            continue
        if change is None or change >= _SAVE_THRESHOLD:
            chosen.add(module)
    return _with_tied(chosen, layout.tied)


def _why_not_saved(tensor: str, mode: str | set[str], lora_modules: set[str], layout: _Layout) -> str:
    module = layout.owners[tensor]
    if mode == "none":
        return "modules_to_save is 'none'"
    if not isinstance(mode, str):
        return "its module is not in modules_to_save"
    if module is None:
        return "no module of the model holds it"
    if module in lora_modules:
        return "its layer gets LoRA factors (name it in modules_to_save to save it whole instead)"
    if module in layout.unsavable:
        return layout.unsavable[module]
    return f"changed by less than the {_SAVE_THRESHOLD:.1%} from which modules_to_save 'auto' saves a module"


def _tensors_to_save(modules: set[str], layout: _Layout) -> dict[str, str]:
    """``{adapter key (the model's naming): checkpoint tensor}`` for the modules saved whole."""
    keys = {}
    for name, owner in layout.owners.items():
        if owner in modules:
            keys[f"{owner}.{name.rpartition('.')[2]}"] = name
    if layout.tied and set(layout.tied) <= modules:  # the head holds the embedding's weight
        embedding, head = (f"{module}.weight" for module in layout.tied)
        keys[embedding] = keys[head] = keys.get(embedding, keys.get(head))
    return keys


def _warn_left_out(skipped: list[dict]) -> None:
    # A zero tensor that changed (relative change None) is the largest change.
    largest = max(
        skipped, key=lambda item: math.inf if item["relative_change"] is None else item["relative_change"]
    )
    change = largest["relative_change"]
    by = "changed from zero" if change is None else f"changed by {change:.2%} of its norm"
    warnings.warn(
        f"{len(skipped)} changed tensor(s) are not in the adapter, so PEFT will not reproduce the fine-tune "
        f"there; the largest change: {largest['tensor']} ({by}; {largest['reason']})",
        stacklevel=3,
    )


def _stream(
    base: CheckpointReader,
    finetuned: CheckpointReader,
    layout: _Layout,
    save_mode: str | set[str],
    out_dir: Path,
    base_name: str,
    rank: int,
    dtype: torch.dtype | None,
    svd: str,
    seed: int,
    overwrite: bool,
    progress: bool,
    provenance: Provenance,
) -> dict:
    modules: list[dict] = []
    left_out: list[dict] = []  # changed tensors without LoRA factors
    unchanged = 0
    params = 0
    conv1d = False
    named = save_mode if isinstance(save_mode, set) else set()
    # One file however large: PEFT loads adapter_model.safetensors only, never shards.
    writer = CheckpointWriter(
        out_dir, max_shard_bytes=sys.maxsize, overwrite=overwrite, weights_name=PEFT_ADAPTER_WEIGHTS,
        provenance=provenance,
    )  # fmt: skip
    try:
        for name in track(base.names(), "extracting LoRA", enabled=progress):
            w_base, w_ft = base.get_finite(name), finetuned.get_finite(name)
            same = torch.equal(w_base, w_ft) if w_base.dtype == w_ft.dtype else _equal_values(w_base, w_ft)
            if same:
                unchanged += 1
                continue
            kind = layout.kinds[name] if layout.owners[name] not in named else "named in modules_to_save"
            if w_base.ndim != 2:
                kind = "1-D tensor (norm or bias)" if w_base.ndim == 1 else f"{w_base.ndim}-D tensor"
                kind += ": LoRA changes only the weight matrices of layers"
            elif not (w_base.is_floating_point() and w_ft.is_floating_point()):
                kind = f"{w_base.dtype} tensor: not a floating-point weight"
            if isinstance(kind, str):
                left_out.append(
                    {
                        "tensor": name,
                        "shape": list(w_base.shape),
                        "relative_change": _relative_change(w_base, w_ft),
                        "reason": kind,
                    }
                )
                continue
            delta = w_ft.float() - w_base.float()
            del w_base
            if kind.transposed:
                delta = delta.T
            lora_a, lora_b, error = lowrank_delta(delta, rank, method=svd, seed=seed)
            out_dtype = dtype or w_ft.dtype
            del w_ft
            if out_dtype != torch.float32:
                lora_a, lora_b = lora_a.to(out_dtype), lora_b.to(out_dtype)
                # Report the error of what is stored, not of the float32 factors.
                residual = delta - lora_b.float() @ lora_a.float()
                error = float(torch.linalg.matrix_norm(residual)) / float(torch.linalg.matrix_norm(delta))
            del delta
            writer.add(f"{PEFT_KEY_PREFIX}{kind.module}.lora_A.weight", lora_a)
            writer.add(f"{PEFT_KEY_PREFIX}{kind.module}.lora_B.weight", lora_b)
            params += lora_a.numel() + lora_b.numel()
            conv1d = conv1d or kind.transposed
            modules.append(
                {
                    "module": kind.module,
                    "tensor": name,
                    "shape": [lora_b.shape[0], lora_a.shape[1]],
                    "rank": lora_a.shape[0],
                    "relative_error": error,
                    "bytes": lora_a.numel() * lora_a.element_size() + lora_b.numel() * lora_b.element_size(),
                }
            )
        lora_modules = {m["module"] for m in modules}
        saved = _auto_modules(left_out, lora_modules, layout) if save_mode == "auto" else named
        skipped = []
        for item in left_out:
            if layout.owners[item["tensor"]] not in saved:
                why = _why_not_saved(item["tensor"], save_mode, lora_modules, layout)
                skipped.append({**item, "reason": f"{item['reason']}; not saved whole: {why}"})
        if not modules:
            listed = f" (changed but not extractable: {', '.join(s['tensor'] for s in left_out[:5])})"
            raise WeightkitError(
                f"no Linear layer weight differs between {base.path} and {finetuned.path}; there is no "
                f"LoRA to extract{listed if left_out else ''}"
            )
        changes = {item["tensor"]: item["relative_change"] for item in left_out}
        whole: dict[str, dict] = {}
        for key, name in sorted(_tensors_to_save(saved, layout).items()):
            tensor = finetuned.get_finite(name)
            writer.add(PEFT_KEY_PREFIX + key, tensor)
            params += tensor.numel()
            entry = whole.setdefault(
                key.rpartition(".")[0], {"tensors": [], "relative_change": 0.0, "bytes": 0}
            )
            entry["tensors"].append(name)
            entry["bytes"] += tensor.numel() * tensor.element_size()
            change = changes.get(name, 0.0)
            if change is None or entry["relative_change"] is None:
                entry["relative_change"] = None
            else:
                entry["relative_change"] = max(entry["relative_change"], change)
        config = _adapter_config(base_name, rank, modules, sorted(whole), _task_type(base), conv1d)
        writer.write_json("adapter_config.json", config)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    adapter_bytes = (Path(out_dir) / PEFT_ADAPTER_WEIGHTS).stat().st_size
    return {
        "out_dir": str(out_dir),
        "rank": rank,
        "modules": modules,
        "max_relative_error": max(m["relative_error"] for m in modules),
        "modules_to_save": [{"module": module, **entry} for module, entry in whole.items()],
        "save_threshold": _SAVE_THRESHOLD,
        "skipped": skipped,
        "unchanged": unchanged,
        "adapter_params": params,
        "adapter_bytes": adapter_bytes,
    }
