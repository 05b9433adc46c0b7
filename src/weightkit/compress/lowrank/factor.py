"""What the spectral low-rank methods (SVD, WeLore) share: read every selected weight's singular values,
let the method choose each weight's rank from all of them at once, then factor each weight.

A method's config supplies ``targets``/``ignore`` (which linear layers) and
``ranks(spectra, shapes) -> {name: rank}``; a rank below ``min(out, in)`` factors the layer into a
:class:`~weightkit.quantized.lowrank.LowRankLinear` of that rank, ``min(out, in)`` keeps it dense.
:func:`factor_linears` does it in memory; :func:`factor_streamed` from a checkpoint, in two passes (the
first keeps only singular values, the second reads each weight again, factors and writes it), so peak memory
is one weight and its SVD (DESIGN rule 4). Both run the same computations on the same tensors, so their
outputs are identical (tested).
"""

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from weightkit.errors import WeightkitError
from weightkit.linalg import largest_entry_signs
from weightkit.progress import track
from weightkit.quantized.lowrank import LowRankLinear, LowRankWeight, lowrank_tensors
from weightkit.select import select_modules

__all__ = ["truncated_factors", "singular_values", "selected_linears", "factor_linears", "factor_streamed"]


class SpectralRanks(Protocol):
    """A low-rank method's config: which layers, and their ranks from their spectra."""

    LABEL: str
    targets: list[str]
    ignore: list[str]

    def ranks(
        self, spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]]
    ) -> dict[str, int]: ...


def singular_values(weight: Tensor) -> Tensor:
    """All ``min(out, in)`` singular values of ``weight``, descending, computed in float32 (a bfloat16 or
    float16 weight is upcast: LAPACK has no half-precision SVD)."""
    return torch.linalg.svdvals(weight.to(torch.float32))


def truncated_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` approximation of ``weight`` (Eckart-Young: its truncated SVD) as two factors.

    ``up = U_k diag(sqrt(s_k))`` ``[out, k]`` and ``down = diag(sqrt(s_k)) V_k^T`` ``[k, in]``: the singular
    values split evenly between the factors, as WeLore's ``LowRankLayer`` does, so both have the same scale
    (a half-precision factor holding all of ``s`` could overflow, and fine-tuning both factors starts
    balanced). The SVD runs in float32; each singular pair's sign is fixed by
    :func:`~weightkit.linalg.largest_entry_signs` on ``U``, so the factors are a function of the weight
    alone, not of the LAPACK build. The factors come back in ``weight``'s dtype.

    Raises:
        WeightkitError: ``rank`` outside ``[1, min(out, in)]``.
    """
    if weight.dim() != 2 or not 1 <= rank <= min(weight.shape):
        raise WeightkitError(
            f"a rank-{rank} factorisation of a {tuple(weight.shape)} weight needs 1 <= rank <= "
            f"{min(weight.shape) if weight.dim() == 2 else 'min(out, in)'}"
        )
    u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
    # Flipping a left singular vector and its right partner together leaves the product unchanged.
    signed_root = s[:rank].sqrt() * largest_entry_signs(u[:, :rank], dim=0)
    up = u[:, :rank] * signed_root
    down = signed_root[:, None] * vh[:rank]
    return up.to(weight.dtype).contiguous(), down.to(weight.dtype).contiguous()


def selected_linears(model: nn.Module, config: SpectralRanks) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers ``config`` selects, checked before any work.

    Raises:
        WeightkitError: nothing selected; or a selected layer's weight is shared with another module (a
            tied ``lm_head``), which a factor pair would silently untie.
    """
    linears = select_modules(model, targets=config.targets, ignore=config.ignore)
    if not linears:
        raise WeightkitError(
            f"no nn.Linear layer selected for {config.LABEL} (targets {config.targets}, ignore "
            f"{config.ignore}); GPT-2-style Conv1D layers are not factored"
        )
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, linear in linears.items():
        tied = [n for n in owners[id(linear.weight)] if n != f"{name}.weight"]
        if tied:
            raise WeightkitError(
                f"{name}.weight is tied to {tied[0]}: factoring it would untie them; leave {name} out "
                "(ignore it) or untie the weights first"
            )
    return linears


def _factored_layer(weight: Tensor, rank: int, bias: Tensor | None) -> LowRankLinear:
    return LowRankLinear(LowRankWeight(*truncated_factors(weight, rank)), bias)


def factor_linears(
    model: nn.Module,
    config: SpectralRanks,
    *,
    progress: bool = True,
    device: torch.device | None = None,
    **_unused,
) -> nn.Module:
    """Replace each selected ``nn.Linear`` of ``model`` the method factors by a ``LowRankLinear``, in place.

    Args:
        model: the model.
        config: the method's config (``SVDConfig``, ``WeLoreConfig``).
        progress: show progress bars.
        device: where the SVDs run; ``None``: where each weight is. Layers stay where they were.

    Raises:
        WeightkitError: nothing selected, or the method's refusals (a budget no layer can meet ...).
    """
    linears = selected_linears(model, config)

    def weight_of(name: str) -> Tensor:
        weight = linears[name].weight.detach()
        return weight.to(device or weight.device)

    spectra = {
        name: singular_values(weight_of(name))
        for name in track(list(linears), f"{config.LABEL} spectra", enabled=progress)
    }
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}
    ranks = config.ranks(spectra, shapes)
    for name in track(list(linears), f"{config.LABEL} factors", enabled=progress):
        if ranks[name] < min(shapes[name]):
            linear = linears[name]
            layer = _factored_layer(weight_of(name), ranks[name], linear.bias)
            model.set_submodule(name, layer.to(linear.weight.device))
    return model


def factor_streamed(model: nn.Module, config: SpectralRanks, streamed, progress: bool, device) -> None:
    """:func:`factor_linears` from a checkpoint, written as it goes.

    Args:
        model: the checkpoint's model with its parameters on the meta device; each factored layer is
            replaced by a meta-device ``LowRankLinear`` (so the output's config can describe it).
        config: the method's config.
        streamed: :class:`weightkit.compress.stream._StreamedModel` (``read(name)``, ``writer``,
            ``rewrite``).
        progress: show progress bars.
        device: where the SVDs run.
    """
    linears = selected_linears(model, config)
    weights = {f"{name}.weight": name for name in linears}

    def read_weight(name: str) -> Tensor:
        tensor = streamed.read(f"{name}.weight")
        if tensor is None:
            raise WeightkitError(f"{streamed.reader.path}: the checkpoint has no {name}.weight")
        return tensor.to(device)

    spectra = {
        name: singular_values(read_weight(name))
        for name in track(list(linears), f"{config.LABEL} spectra", enabled=progress)
    }
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}
    ranks = config.ranks(spectra, shapes)

    def write(name: str, tensor: Tensor) -> bool:
        module_name = weights.get(name)
        if module_name is None or ranks[module_name] >= min(shapes[module_name]):
            return False  # kept dense: copied as it is
        up, down = truncated_factors(tensor.to(device), ranks[module_name])
        # The bias is a tensor of its own in the checkpoint, written under the same name.
        for suffix, factor in lowrank_tensors(LowRankWeight(up, down), None).items():
            streamed.writer.add(f"{module_name}.{suffix}", factor)
        layer = LowRankLinear(LowRankWeight(up, down), linears[module_name].bias)
        model.set_submodule(module_name, layer.to("meta"))
        return True

    streamed.rewrite(f"{config.LABEL} factors", progress, write)
