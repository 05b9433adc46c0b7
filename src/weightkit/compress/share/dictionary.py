"""Dictionary sharing of the attention projections: MASA, "Share Your Attention: Transformer Weight Sharing
via Matrix-based Dictionary Learning" (Zhussip, Shopkhoev, Ali and Lefkimmiatis, arXiv 2508.04581).

For each projection type (query, key, value, output) the ``L`` blocks' weights are written as linear
combinations of ``S < L`` shared matrix atoms, ``W_l ~ sum_s c[l, s] D_s``: the atoms are stored once and each
block keeps ``S`` coefficients (and its own bias). The paper trains such models from scratch and, for
pretrained ones, initialises the dictionary training-free by a "matrix PCA" over the stacked layers; this
module is that training-free step (:func:`fit_dictionary`): the ``L`` matrices are flattened into the rows of
an ``L x (out * in)`` matrix ``M`` and the atoms are its top ``S`` right singular vectors (reshaped to
``out x in``), the coefficients the least-squares projection ``c = M D^T`` onto them. By Eckart-Young this is
the ``S``-atom dictionary with the smallest total squared (Frobenius) error over the layers.

Deliberate deviations, and what is not done:

- No fine-tuning of atoms or coefficients afterwards (the paper trains them with a standard optimiser, and
  for pretrained models also describes a data-aware local refinement and a grouping of layers into several
  dictionaries): out of scope here; all ``L`` layers of one projection type share one dictionary.
- No mean matrix is subtracted before the decomposition. Only the paper's abstract was at hand while this
  was written, so whether its matrix PCA centres the stack is not known here; a centred PCA (a mean atom plus
  ``S - 1`` components) can never have a smaller total error than the uncentred rank-``S`` fit, and the
  shared layer's weight is a pure combination of atoms with no separate mean.
- Fused query/key/value layers (GPT-2, Phi-3, GPT-NeoX, Falcon) and GPT-2's ``Conv1D`` layers are refused by
  name, as are model types :mod:`weightkit.arch` has no block layout for.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from weightkit.arch import block_layout, block_lists
from weightkit.errors import WeightkitError, require_finite
from weightkit.linalg import largest_entry_signs
from weightkit.progress import track
from weightkit.quantized.shared import share_linears
from weightkit.registry import register

__all__ = ["DictionaryConfig", "fit_dictionary", "dictionary_share"]

PROJECTIONS = ("q", "k", "v", "o")
# Columns of the flattened stack converted to float64 at a time in fit_dictionary.
_CHUNK_COLUMNS = 2**20


@dataclass
class DictionaryConfig:
    """MASA dictionary sharing (arXiv 2508.04581) of the attention projections across blocks.

    Attributes:
        atoms: shared matrix atoms ``S`` per projection type; at least 1 and fewer than the model's blocks
            (the paper's 66.7% saving is ``S = L / 3``). Each block then stores ``S`` coefficients per
            projection instead of a matrix.
        projections: which projections share a dictionary, each its own: any of ``"q"``, ``"k"``, ``"v"``
            (query, key, value) and ``"o"`` (the attention output).
    """

    atoms: int = 2
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    def __post_init__(self):
        if self.atoms < 1:
            raise WeightkitError(f"atoms must be at least 1, got {self.atoms}")
        unknown = [p for p in self.projections if p not in PROJECTIONS]
        if unknown or not self.projections:
            raise WeightkitError(
                f"projections must be a non-empty list of {', '.join(PROJECTIONS)}; got {self.projections}"
            )
        if len(set(self.projections)) != len(self.projections):
            raise WeightkitError(f"projections lists one twice: {self.projections}")


def fit_dictionary(weights: Tensor, atoms: int) -> tuple[Tensor, Tensor]:
    """The ``atoms``-atom dictionary with the least total squared error for a stack of ``L`` matrices.

    Args:
        weights: ``[L, out, in]``, one matrix per layer.
        atoms: ``S``, from 1 to ``L``.

    Returns:
        ``(dictionary [S, out, in], coefficients [L, S])`` in ``weights``' dtype, with
        ``weights[l] ~ sum_s coefficients[l, s] * dictionary[s]``: the atoms are orthonormal under the
        Frobenius inner product (the top right singular vectors of the flattened stack, computed in float64
        through its ``L x L`` Gram matrix, with a sign fixed by their largest entry), the coefficients the
        projections onto them. Atoms for directions the stack does not have (rank below ``S``) are zero,
        with zero coefficients. ``S = L`` reconstructs the stack.

    Raises:
        WeightkitError: not a 3-D stack, ``atoms`` outside ``[1, L]``, or NaN/Inf weights.
    """
    if weights.dim() != 3:
        raise WeightkitError(
            f"expected a stack of matrices [layers, out, in], got shape {tuple(weights.shape)}"
        )
    layers = weights.shape[0]
    if not 1 <= atoms <= layers:
        raise WeightkitError(f"atoms must be between 1 and the {layers} layers stacked, got {atoms}")
    require_finite(weights, "the stacked weights")
    flat = weights.detach().reshape(layers, -1)
    # In float64 a column chunk at a time, so the extra memory is a chunk, not a float64 copy of the stack.
    chunks = flat.split(_CHUNK_COLUMNS, dim=1)
    # The L x L Gram matrix instead of an SVD of the L x (out * in) stack: L is small (the block count), so
    # this costs one pass over the weights and L^2 numbers.
    gram = sum(chunk.to(torch.float64) @ chunk.to(torch.float64).T for chunk in chunks)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(0)[:atoms], vectors.flip(1)[:, :atoms]
    vectors = vectors * largest_entry_signs(vectors, dim=0)
    # Directions whose share of the spectrum is at rounding level are absent from the stack.
    present = eigenvalues > eigenvalues[0].clamp(min=0) * layers * torch.finfo(torch.float64).eps
    scale = torch.where(present, eigenvalues.clamp(min=0).rsqrt(), torch.zeros_like(eigenvalues))
    dictionary = torch.empty(atoms, flat.shape[1], dtype=weights.dtype, device=weights.device)
    coefficients = torch.zeros(layers, atoms, dtype=torch.float64, device=weights.device)
    for chunk, part in zip(chunks, dictionary.split(_CHUNK_COLUMNS, dim=1), strict=True):
        chunk = chunk.to(torch.float64)
        atoms_part = (vectors * scale).T @ chunk
        part.copy_(atoms_part)
        coefficients += chunk @ atoms_part.T
    return dictionary.reshape(atoms, *weights.shape[1:]), coefficients.to(weights.dtype)


def _projection_names(model: nn.Module, config: DictionaryConfig) -> list[list[str]]:
    """For each list of blocks and chosen projection, the names of that projection's layer in each block."""
    model_config = model.config.to_dict()
    found = []
    for list_name, blocks in block_lists(model):
        layout = block_layout(model_config, list_name)
        if layout is None:
            raise WeightkitError(
                f"weightkit does not know which layers of a {model_config.get('model_type')!r} block are the "
                "attention projections (no block layout in weightkit.arch): dictionary sharing needs them"
            )
        if layout.fused_qkv or layout.transposed:
            raise WeightkitError(
                f"model_type {model_config['model_type']!r} fuses query, key and value into one layer "
                f"({layout.attention[0]}){' stored as GPT-2 Conv1D' if layout.transposed else ''}: "
                "dictionary sharing takes separate q/k/v projection Linear layers"
            )
        if len(blocks) < 2:
            raise WeightkitError(f"{list_name} has {len(blocks)} block: nothing to share across")
        if config.atoms >= len(blocks):
            raise WeightkitError(
                f"atoms must be fewer than the {len(blocks)} blocks of {list_name} (sharing saves nothing "
                f"otherwise), got {config.atoms}"
            )
        roles = dict(zip(PROJECTIONS, (*layout.attention, layout.attention_out), strict=True))
        for projection in config.projections:
            names = [f"{list_name}.{i}.{roles[projection]}" for i in range(len(blocks))]
            for name in names:
                if type(model.get_submodule(name)) is not nn.Linear:
                    raise WeightkitError(
                        f"{name} is a {type(model.get_submodule(name)).__name__}, not an nn.Linear"
                    )
            found.append(names)
    return found


@torch.no_grad()
def dictionary_share(
    model: nn.Module, config: DictionaryConfig, *, data=None, tokenizer=None, progress=True, device=None
) -> nn.Module:
    """Replace the chosen attention projections of every block by
    :class:`~weightkit.quantized.shared.SharedLinear` layers over one dictionary per projection type and list
    of blocks (:func:`fit_dictionary`), in place.

    Data-free: ``data`` and ``tokenizer`` are not used. ``device``: where the decomposition runs (``None``:
    where the weights are); the layers stay where the model is.

    Raises:
        WeightkitError: an architecture without known separate attention projections, ``atoms`` not fewer
            than the blocks, or NaN/Inf weights; the model is unchanged then.
    """
    plan = _projection_names(model, config)
    fits = []  # every fit before the first layer changes, so an error leaves the model as it was
    for names in track(plan, "dictionary", enabled=progress):
        home = model.get_submodule(names[0]).weight.device
        stack = torch.stack([model.get_submodule(name).weight for name in names]).to(device or home)
        dictionary, coefficients = fit_dictionary(stack, config.atoms)
        fits.append((names, nn.Parameter(dictionary.to(home)), coefficients.to(home)))
    for names, dictionary, coefficients in fits:
        share_linears(model, dictionary, dict(zip(names, coefficients, strict=True)))
    return model


register("compress", "dictionary", DictionaryConfig, dictionary_share)
