"""BitStack's stored form: residual blocks of sign matrices and vectors, the layer that holds a prefix of
them, the universal block order, and weightkit's "bitstack" checkpoint format that loads at any memory budget.

BitStack ("BitStack: Fine-Grained Size Control for Compressed Large Language Models in Variable Memory
Environments", arXiv 2410.23918; the decomposition is :mod:`weightkit.compress.lowrank.bitstack`) writes a
weight ``W [out, in]`` as a sum of residual blocks,
``W ≈ sum_b sign_b ⊙ (u_b @ v_b.T)``, with ``sign_b`` a ±1 matrix (1 bit per weight) and ``u_b [out, k]``,
``v_b [in, k]`` float16 vectors. Blocks of every layer are sorted into one universal order, so loading the
first ``N`` bytes' worth of that order gives a model of any size from one artifact.

The tensors of a BitStack layer ``NAME`` (format "bitstack", ``quant_method`` "weightkit", read only by
:func:`weightkit.load`; transformers refuses ``NAME.weight`` by its shape, see
:mod:`weightkit.quantized.weightkit_format`):

- ``NAME.weight``: the sign matrices, ``uint8``, 1-D: block after block, each ``[out, in]`` row-major as a
  1-bit little-endian stream (:func:`~weightkit.quantized.pack.pack_bits`, bit 1 for +1, bit 0 for -1),
  padded to whole bytes per block;
- ``NAME.weight_stack_u``: ``float16 [blocks, out, k]``; ``NAME.weight_stack_v``: ``float16 [blocks, in, k]``;
- ``NAME.weight_shape``: ``int64 [2]``, ``[out, in]``; ``NAME.bias`` if any.

``config.json``'s ``quantization_config``: ``{"quant_method": "weightkit", "format": "bitstack",
"weightkit_version": ..., "order": [layer, ...], "importance": [score, ...]}``: the universal order, one entry
per stored block (the ``j``-th entry naming a layer is that layer's next block), with each block's importance.

A memory budget counts every byte the loaded model holds: the tensors outside the decomposed layers
(embeddings, norms, an untied head), the decomposed layers' biases, and each loaded block's packed signs and
vectors (:func:`block_bytes`). One MB is 10^6 bytes, as weightkit prints sizes.
"""

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightkit.errors import WeightkitError, require_finite
from weightkit.quantized.pack import pack_bits, packed_bytes

__all__ = [
    "FORMAT",
    "SUFFIXES",
    "VECTOR_DTYPE",
    "BitStackWeight",
    "BitStackLinear",
    "block_bytes",
    "unpack_signs",
    "universal_order",
    "blocks_within",
    "budget_bytes",
    "bitstack_tensors",
    "bitstack_quantization_config",
    "bitstack_block_counts",
    "bitstack_weight_from_stored",
]

FORMAT = "bitstack"
VECTOR_DTYPE = torch.float16
SUFFIXES = ("weight", "weight_stack_u", "weight_stack_v", "weight_shape", "bias")
MB = 10**6


def block_bytes(shape: tuple[int, int], rank: int) -> int:
    """Bytes of one residual block of an ``[out, in]`` weight: its packed signs and its float16 vectors."""
    out_features, in_features = shape
    vector_bytes = (out_features + in_features) * rank * VECTOR_DTYPE.itemsize
    return packed_bytes(out_features * in_features, 1) + vector_bytes


def budget_bytes(budget_mb: float) -> int:
    """A budget in MB as bytes, refusing anything but a positive finite number."""
    if isinstance(budget_mb, bool) or not isinstance(budget_mb, int | float) or not 0 < budget_mb < math.inf:
        raise WeightkitError(f"budget_mb must be a positive number of MB, got {budget_mb!r}")
    return int(budget_mb * MB)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def unpack_signs(signs: Tensor, count: int) -> Tensor:
    """The first ``count`` signs of each packed row (True for +1): 1-bit
    :func:`~weightkit.quantized.pack.unpack_bits`, specialised (bit ``k`` of byte ``i`` is value ``8 i + k``)
    because every forward pass runs it.

    Raises:
        WeightkitError: ``signs`` is not ``uint8`` or its rows have another length than ``count`` bits take.
    """
    if signs.dtype != torch.uint8 or signs.shape[-1] != packed_bytes(count, 1):
        raise WeightkitError(
            f"{count} signs take {packed_bytes(count, 1)} bytes per block, got {signs.dtype} of shape "
            f"{tuple(signs.shape)}"
        )
    bits = (signs.unsqueeze(-1) >> _BIT_SHIFTS.to(signs.device)) & 1
    return bits.reshape(*signs.shape[:-1], signs.shape[-1] * 8)[..., :count].bool()


@dataclass
class BitStackWeight:
    """A weight as a stack of residual blocks.

    Attributes:
        signs: ``uint8 [blocks, ceil(out * in / 8)]``, each block's sign matrix packed 1 bit per weight.
        u: ``float16 [blocks, out, k]``.
        v: ``float16 [blocks, in, k]``: the weight is ``sum_b sign_b ⊙ (u_b @ v_b.T)``.
        shape: ``(out, in)``.
        scores: each block's importance (what the universal order sorts by).
    """

    signs: Tensor
    u: Tensor
    v: Tensor
    shape: tuple[int, int]
    scores: tuple[float, ...]

    @property
    def blocks(self) -> int:
        return self.u.shape[0]

    @property
    def rank(self) -> int:
        return self.u.shape[2]

    def dense(self) -> Tensor:
        """The ``[out, in]`` float32 weight the blocks add up to, all at once (zeros without blocks)."""
        out_features, in_features = self.shape
        positive = unpack_signs(self.signs, out_features * in_features)
        positive = positive.reshape(self.blocks, out_features, in_features)
        magnitudes = torch.bmm(self.u.float(), self.v.float().transpose(1, 2))
        return torch.where(positive, magnitudes, -magnitudes).sum(0)

    def truncated(self, blocks: int) -> "BitStackWeight":
        """The first ``blocks`` residual blocks, copied (the others' memory is not kept alive by views)."""
        signs, u, v = (t[:blocks].clone() for t in (self.signs, self.u, self.v))
        return BitStackWeight(signs, u, v, self.shape, self.scores[:blocks])

    @staticmethod
    def pack_signs(positive: Tensor) -> Tensor:
        """``[blocks, out, in]`` booleans (True for +1) as the packed ``signs``."""
        return pack_bits(positive.reshape(positive.shape[0], -1).to(torch.uint8), 1)


class BitStackLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding a prefix of its BitStack residual blocks.

    Buffers: ``weight_signs`` (``uint8 [blocks, bytes per block]``), ``weight_stack_u``
    (``float16 [blocks, out, k]``), ``weight_stack_v`` (``float16 [blocks, in, k]``) and ``bias`` if any.
    The forward pass composes the weight from all held blocks at once (a layer holding no block has a zero
    weight) in the input's dtype.
    """

    def __init__(self, quantized: BitStackWeight, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        self.block_scores = tuple(quantized.scores)  # kept on the meta device too: the order needs them
        self.register_buffer("weight_signs", quantized.signs)
        self.register_buffer("weight_stack_u", quantized.u)
        self.register_buffer("weight_stack_v", quantized.v)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> BitStackWeight:
        return BitStackWeight(
            self.weight_signs,
            self.weight_stack_u,
            self.weight_stack_v,
            (self.out_features, self.in_features),
            self.block_scores,
        )

    def dense_weight(self) -> Tensor:
        """The ``[out, in]`` weight the held blocks represent (float32)."""
        return self.quantized.dense()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias)

    def extra_repr(self) -> str:
        blocks, _, rank = self.weight_stack_u.shape
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, {blocks} blocks of rank {rank}"


def universal_order(scores: Mapping[str, Sequence[float]]) -> list[str]:
    """BitStack's universal order of every layer's residual blocks: level by level (every layer's ``b``-th
    block before any ``(b+1)``-th, so a layer's blocks stay in decomposition order), and within a level by
    importance, highest first (ties by layer name), as the paper's sort of its per-level scores.

    Args:
        scores: layer name -> the importance of each of its blocks, in decomposition order.

    Returns:
        One layer name per block: the ``j``-th occurrence of a name is that layer's ``j``-th block.
    """
    levels = max((len(s) for s in scores.values()), default=0)
    order = []
    for level in range(levels):
        present = [name for name, s in scores.items() if len(s) > level]
        order += sorted(present, key=lambda name: (-float(scores[name][level]), name))
    return order


def blocks_within(order: Sequence[str], sizes: Mapping[str, int], available: int) -> dict[str, int]:
    """How many blocks each layer keeps when the longest prefix of ``order`` whose blocks (``sizes``: layer
    -> bytes per block) fit in ``available`` bytes is kept; every layer of ``sizes`` is listed (0 blocks
    possible)."""
    cumulative = torch.tensor([sizes[name] for name in order], dtype=torch.int64).cumsum(0)
    kept = int((cumulative <= available).sum())
    counts = Counter(order[:kept])
    return {name: counts[name] for name in sizes}


# -- the checkpoint format ------------------------------------------------------------------------------


def bitstack_tensors(quantized: BitStackWeight, bias: Tensor | None) -> dict[str, Tensor]:
    """One BitStack weight (and its layer's bias) as the "bitstack" format stores it (module docstring)."""
    if quantized.u.dtype != VECTOR_DTYPE or quantized.v.dtype != VECTOR_DTYPE:
        raise WeightkitError(
            f"BitStack vectors are stored in {VECTOR_DTYPE}, got {quantized.u.dtype} and {quantized.v.dtype}"
        )
    out = {
        "weight": quantized.signs.detach().cpu().reshape(-1),
        "weight_stack_u": quantized.u.detach().cpu(),
        "weight_stack_v": quantized.v.detach().cpu(),
        "weight_shape": torch.tensor(list(quantized.shape), dtype=torch.int64),
    }
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    return out


def bitstack_quantization_config(layers: Mapping[str, BitStackLinear]) -> dict:
    """The ``quantization_config`` of a checkpoint of BitStack ``layers`` (name -> layer): the universal
    order of the blocks they hold and each block's importance."""
    from weightkit import __version__  # the package imports this module: read its version lazily

    order = universal_order({name: layer.block_scores for name, layer in layers.items()})
    seen: Counter = Counter()
    importance = []
    for name in order:
        importance.append(float(layers[name].block_scores[seen[name]]))
        seen[name] += 1
    return {
        "quant_method": "weightkit",
        "format": FORMAT,
        "weightkit_version": __version__,
        "order": order,
        "importance": importance,
    }


def _stored_order(qc: dict, where: str) -> tuple[list[str], list[float]]:
    order, importance = qc.get("order"), qc.get("importance")
    if (
        not isinstance(order, list)
        or not isinstance(importance, list)
        or len(order) != len(importance)
        or not all(isinstance(name, str) for name in order)
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in importance)
    ):
        raise WeightkitError(
            f"{where}: a bitstack quantization_config needs 'order' (layer names) and 'importance' (numbers) "
            "lists of equal length"
        )
    return order, [float(s) for s in importance]


def bitstack_block_counts(
    qc: dict,
    reader,
    where: str,
    *,
    budget_mb: float | None,
    dtype: torch.dtype | None,
) -> dict[str, tuple[int, tuple[float, ...]]]:
    """Per stored BitStack layer (checkpoint name): how many of its blocks to load and their importances.

    Without a budget every stored block loads. With one, the longest prefix of the stored order that fits
    next to the tensors outside the decomposed layers (read from the checkpoint's header, in ``dtype`` for
    floating-point ones when given, as they will load) and the layers' biases.

    Raises:
        WeightkitError: a malformed order, an order naming a layer the checkpoint does not store or a
            different number of blocks than it stores, a budget that is not positive, or a budget smaller
            than the tensors outside the decomposed layers (naming the MB needed).
    """
    order, importance = _stored_order(qc, where)
    stored = {
        name.removesuffix(".weight_stack_u") for name in reader.names() if name.endswith(".weight_stack_u")
    }
    listed = Counter(order)
    for name in stored | set(listed):
        blocks = reader.shape(f"{name}.weight_stack_u")[0] if name in stored else 0
        if listed[name] != blocks:
            raise WeightkitError(
                f"{where}: the order lists {listed[name]} block(s) of {name}, but the checkpoint stores "
                f"{blocks}"
            )
    scores: dict[str, list[float]] = {name: [] for name in stored}
    for name, score in zip(order, importance, strict=True):
        scores[name].append(score)
    counts = {name: len(s) for name, s in scores.items()}
    if budget_mb is not None:
        available = budget_bytes(budget_mb) - _dense_bytes(reader, stored, dtype)
        if available < 0:
            needed = budget_bytes(budget_mb) - available
            raise WeightkitError(
                f"budget_mb {budget_mb:g} is less than the {needed / MB:.3f} MB that the tensors outside the "
                f"decomposed layers take (embeddings, norms, biases): give at least {needed / MB:.3f}"
            )
        sizes = {}
        for name in stored:
            _, out_features, rank = reader.shape(f"{name}.weight_stack_u")
            sizes[name] = block_bytes((out_features, reader.shape(f"{name}.weight_stack_v")[1]), rank)
        counts = blocks_within(order, sizes, available)
    return {name: (counts[name], tuple(scores[name][: counts[name]])) for name in stored}


def _dense_bytes(reader, layers: set[str], dtype: torch.dtype | None) -> int:
    """Bytes the checkpoint's tensors outside the BitStack layers' blocks take once loaded (biases count)."""
    blocks = {f"{name}.{suffix}" for name in layers for suffix in SUFFIXES if suffix != "bias"}
    total = 0
    for name in reader.names():
        if name in blocks:
            continue
        stored = reader.dtype(name)
        loaded = dtype if dtype is not None and stored.is_floating_point else stored
        numel = 1
        for size in reader.shape(name):
            numel *= size
        total += numel * loaded.itemsize
    return total


def _check(tensor: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise WeightkitError(
            f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, expected {dtype} {shape}"
        )


def bitstack_weight_from_stored(
    stored: Mapping[str, Tensor], shape: tuple[int, int], name: str, blocks: int, scores: tuple[float, ...]
) -> BitStackWeight:
    """The first ``blocks`` residual blocks of the layer ``name`` from its stored tensors, checked against
    the model's ``shape``.

    Raises:
        WeightkitError: a tensor is missing or has the wrong dtype or shape (named), fewer blocks are
            stored than asked for, or a vector is not finite.
    """
    for key in ("weight", "weight_stack_u", "weight_stack_v", "weight_shape"):
        if key not in stored:
            raise WeightkitError(f"{name}.{key} is missing: the checkpoint's format is weightkit bitstack")
    _check(stored["weight_shape"], f"{name}.weight_shape", torch.int64, (2,))
    stored_shape = tuple(int(v) for v in stored["weight_shape"].tolist())
    if stored_shape != tuple(shape):
        raise WeightkitError(
            f"{name}.weight_shape is {list(stored_shape)} but the model's layer is {list(shape)}"
        )
    u, v = stored["weight_stack_u"], stored["weight_stack_v"]
    if u.dim() != 3 or u.dtype != VECTOR_DTYPE:
        raise WeightkitError(
            f"{name}.weight_stack_u is {u.dtype} of shape {tuple(u.shape)}, expected {VECTOR_DTYPE} 3-D"
        )
    count, _, rank = u.shape
    _check(u, f"{name}.weight_stack_u", VECTOR_DTYPE, (count, shape[0], rank))
    _check(v, f"{name}.weight_stack_v", VECTOR_DTYPE, (count, shape[1], rank))
    per_block = packed_bytes(shape[0] * shape[1], 1)
    _check(stored["weight"], f"{name}.weight", torch.uint8, (count * per_block,))
    if blocks > count:
        raise WeightkitError(f"{name}: {blocks} blocks asked for, the checkpoint stores {count}")
    # Copies, not views: the blocks beyond the budget are freed with the tensors read from the file.
    u, v = u[:blocks].clone(), v[:blocks].clone()
    require_finite(u, f"{name}.weight_stack_u")
    require_finite(v, f"{name}.weight_stack_v")
    signs = stored["weight"][: blocks * per_block].reshape(blocks, per_block).clone()
    return BitStackWeight(signs, u, v, tuple(shape), tuple(scores))
