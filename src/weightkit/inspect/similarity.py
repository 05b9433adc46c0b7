"""How alike a model's repeated blocks are: by their activations on text, and by their weights.

The pure functions:

- :func:`linear_cka`: linear centred kernel alignment of Kornblith, Norouzi, Lee and Hinton, "Similarity of
  Neural Network Representations Revisited" (arXiv 1905.00414), its linear-kernel form
  ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with ``X_c``, ``Y_c`` the column-centred
  ``n x d`` features of the same ``n`` examples (here: tokens). 1 for identical representations; invariant
  to orthogonal transforms and isotropic scaling of either side; near 0 for independent ones.
- :func:`mean_token_cosine` (in :mod:`weightkit.linalg`, shared with FoldGPT in ``weightkit.compress``): the
  mean over tokens of the cosine similarity of one token's two vectors. This is the similarity behind
  ShortGPT's Block Influence (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
  You Expect", arXiv 2403.03853): ``BI_i = 1 - E_t cos(x_{i,t}, x_{i+1,t})``
  for a block's input ``x_i`` and output ``x_{i+1}``.

Around them, on a model:

- :func:`activation_similarity` runs a model on tokenized batches, captures each block's input and output
  with forward hooks and reports, per block, the CKA and mean token cosine of its output against its input
  (how much the block changes its residual stream: what ShortGPT-style block removal ranks by) and against
  the next block's output (FoldGPT's redundancy signal: Liu et al., "FoldGPT: Simple and Effective Large
  Language Model Compression Scheme", arXiv 2407.00928, observe that the outputs of most layers of an LLM
  are very similar and remove and share blocks on that ground). Two deviations: FoldGPT's own removal
  decision is made by learned gates that it trains, which a report does not do (the candidates here are
  thresholds on the measured similarity, :func:`redundant_blocks`); and only the paper's abstract was
  available while writing this, so its exact similarity measure is not reproduced: the report gives the
  per-token cosine (ShortGPT's measure) and linear CKA (Kornblith et al.'s) side by side. Plus the
  block x block CKA matrix for a heatmap.
  :func:`layer_similarity` does the same from a model directory and a text file.
- :func:`weight_similarity` streams a checkpoint tensor by tensor and compares each linear layer of block
  ``i`` with the same layer (role) of block ``i + 1``: cosine of the flattened weights and relative
  difference.
- :func:`redundant_blocks` turns both into candidates to drop or share, with the reason.

Deliberate choices, each also stated where it is made:

- Consecutive-block CKA is computed exactly over *all* non-padding tokens, streamed: per hidden state the
  ``d x d`` sum of outer products and the feature sums, and per consecutive pair the ``d x d`` cross sum, in
  float64; CKA then follows from the centred (cross-)covariances. Memory, on the run device, is
  ``(2L + 1) d^2`` float64 numbers for ``L`` blocks of width ``d``, independent of the token count: 15 MB
  for MiniLM, 0.12 GB for a 768-wide 12-block model, but 8.7 GB for a 4096-wide 32-block (7B) one.
- The all-pairs block x block matrix would need ``L^2`` cross sums; it is instead computed exactly on a fixed
  token subsample: the first ``heatmap_tokens`` non-padding tokens in batch order (the texts are a seeded
  shuffle, so this is a sample of texts, all tokens of each). Its consecutive entries therefore differ
  slightly from the exact per-pair numbers of the rows.
- In a plain stack block ``i + 1`` reads exactly what block ``i`` wrote, so "output of block ``i`` vs output
  of block ``i + 1``" is the same pair of tensors as "input vs output of block ``i + 1``": both columns are
  reported (the first is FoldGPT's view, the second ShortGPT's) and are equal numbers shifted by one row.
  A model whose blocks do not chain like this (something between them) is refused by name.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from weightkit.arch import block_lists, model_task
from weightkit.checkpoint import CheckpointReader
from weightkit.data import calibration_texts, tokenize_batches
from weightkit.errors import WeightkitError
from weightkit.linalg import mean_token_cosine, paired_features, token_cosines
from weightkit.models import CheckpointNames, load_model, model_auto_class, skeleton
from weightkit.progress import track
from weightkit.quantized.compressed_tensors import is_quantized_checkpoint
from weightkit.runtime.device import resolve_device
from weightkit.select import LINEAR_TYPES

__all__ = [
    "linear_cka",
    "mean_token_cosine",
    "ActivationSimilarity",
    "activation_similarity",
    "layer_similarity",
    "weight_similarity",
    "redundant_blocks",
]


# -- pure functions ----------------------------------------------------------------------------------------


def _cka_from_covariances(cross: Tensor, cov_x: Tensor, cov_y: Tensor) -> float:
    """Linear CKA from the centred cross-covariance ``X_c^T Y_c`` and the two auto-covariances."""
    norm_x, norm_y = torch.linalg.matrix_norm(cov_x), torch.linalg.matrix_norm(cov_y)
    if norm_x == 0 or norm_y == 0:
        raise WeightkitError("a representation is constant over all tokens: its CKA is undefined")
    return float(torch.linalg.matrix_norm(cross).square() / (norm_x * norm_y))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (arXiv 1905.00414) of two representations of the same ``n`` examples.

    Args:
        x: ``n x d1`` features (rows are examples).
        y: ``n x d2`` features of the same examples in the same order.

    Returns:
        A number in [0, 1], computed in float64.

    Raises:
        WeightkitError: shapes that are not two matrices with the same rows, fewer than two examples,
            NaN/Inf, or a representation that is constant (zero variance: CKA is 0/0).
    """
    x, y = paired_features(x, y)
    if x.shape[0] < 2:
        raise WeightkitError("CKA needs at least two examples")
    x, y = x - x.mean(0), y - y.mean(0)
    return _cka_from_covariances(x.T @ y, x.T @ x, y.T @ y)


def _cka_matrix(features: Sequence[Tensor]) -> Tensor:
    """All-pairs linear CKA of representations of the same ``n`` examples, through their ``n x n`` centred
    Gram matrices: ``CKA = <K_x, K_y>_F / (||K_x||_F ||K_y||_F)`` with ``K = X_c X_c^T`` (the paper's HSIC
    form), one Gram at a time, which is cheaper than ``d x d`` cross-covariances for every pair."""
    grams = []
    for feature in features:
        feature = feature.to(torch.float64)
        centred = feature - feature.mean(0)
        gram = centred @ centred.T
        norm = torch.linalg.matrix_norm(gram)
        if norm == 0:
            raise WeightkitError("a representation is constant over all tokens: its CKA is undefined")
        grams.append((gram / norm).flatten())
    stacked = torch.stack(grams)
    return stacked @ stacked.T


# -- activations ---------------------------------------------------------------------------------------------


class _Moments:
    """Streamed sums for linear CKA and token cosine between consecutive hidden states ``h_0 .. h_L``.

    Per state ``k``: token count, feature sum and ``sum h h^T``; per pair ``(k, k+1)``: ``sum h_k h_{k+1}^T``
    and the sum of the token cosines. Updated one state at a time, so only the previous state of the
    current batch is held.
    """

    def __init__(self, n_states: int):
        self.count = 0
        self.sums: list[Tensor | None] = [None] * n_states
        self.grams: list[Tensor | None] = [None] * n_states
        self.cross: list[Tensor | None] = [None] * (n_states - 1)
        self.cosine_sums = [0.0] * (n_states - 1)

    @staticmethod
    def _add(total: Tensor | None, term: Tensor) -> Tensor:
        return term if total is None else total + term

    def add_state(self, k: int, state: Tensor, previous: Tensor | None) -> None:
        """Add the tokens ``state`` (``n x d`` float64) of hidden state ``k``; ``previous``: state ``k-1``."""
        self.sums[k] = self._add(self.sums[k], state.sum(0))
        self.grams[k] = self._add(self.grams[k], state.T @ state)
        if previous is not None:
            self.cross[k - 1] = self._add(self.cross[k - 1], previous.T @ state)
            self.cosine_sums[k - 1] += float(token_cosines(previous, state).sum())

    def _covariance(self, k: int) -> Tensor:
        mean = self.sums[k] / self.count
        return self.grams[k] - self.count * torch.outer(mean, mean)

    def pair(self, k: int) -> tuple[float, float]:
        """``(linear CKA, mean token cosine)`` of states ``k`` and ``k + 1`` over all tokens added."""
        mean_x, mean_y = self.sums[k] / self.count, self.sums[k + 1] / self.count
        cross = self.cross[k] - self.count * torch.outer(mean_x, mean_y)
        cka = _cka_from_covariances(cross, self._covariance(k), self._covariance(k + 1))
        return cka, self.cosine_sums[k] / self.count


@dataclass
class ActivationSimilarity:
    """What :func:`activation_similarity` measured.

    Attributes:
        rows: one dict per block, in order: ``block`` (its module name), ``index``, ``cka_in_out`` and
            ``cosine_in_out`` (its output against its input), ``cka_next`` and ``cosine_next`` (its output
            against the next block's output; ``None`` for the last block), ``tokens`` (non-padding tokens
            the numbers are over).
        cka_matrix: ``L x L`` float64 linear CKA between every two blocks' outputs, on the first
            ``heatmap_tokens`` tokens (``heatmap_tokens`` gives the count used).
        labels: the block names, the rows and columns of ``cka_matrix``.
        heatmap_tokens: tokens the matrix was computed on.
    """

    rows: list[dict]
    cka_matrix: Tensor
    labels: list[str]
    heatmap_tokens: int


def _hidden_of(output) -> Tensor:
    # Blocks return their hidden states alone (transformers 5) or first in a tuple (older layers, caches).
    return output[0] if isinstance(output, tuple) else output


def _single_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    task = model_task(model.config.to_dict())
    if task not in ("causal-lm", "encoder"):
        raise WeightkitError(
            f"activation similarity runs causal LMs and encoders on text; this model is {task!r} "
            "(compare its weights with weight_similarity instead)"
        )
    lists = block_lists(model)
    if len(lists) != 1:
        names = ", ".join(name for name, _ in lists)
        raise WeightkitError(f"activation similarity needs one list of blocks; this model has {names}")
    return lists[0]


@torch.no_grad()
def activation_similarity(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    *,
    device: str | torch.device | None = None,
    heatmap_tokens: int = 1024,
    progress: bool = False,
) -> ActivationSimilarity:
    """Similarity of a model's consecutive blocks' activations on ``batches`` (module docstring).

    Each block's input and output are captured with forward hooks (removed afterwards, also on error);
    padding tokens (``attention_mask == 0``) are left out of every number. The model is run in eval mode
    with its KV cache off and restored afterwards (mode, cache flag and device).

    Args:
        model: a causal LM or encoder from transformers (one list of repeated blocks).
        batches: ``{"input_ids", "attention_mask"}`` batches (:func:`weightkit.data.tokenize_batches`).
        device: where to run (moved there for the run); ``None`` runs where the model is.
        heatmap_tokens: how many tokens the block x block CKA matrix is computed on (the first ones
            in batch order; memory ``L * heatmap_tokens * (d + heatmap_tokens)`` float64 numbers: the
            sampled states, then one normalised Gram matrix per block).
        progress: show a progress bar over batches.

    Raises:
        WeightkitError: an unsupported model (see above), no tokens, fewer than two blocks, blocks that do
            not chain (block ``i + 1`` does not read exactly block ``i``'s output), or a degenerate
            representation (constant, or a zero token vector).
    """
    if heatmap_tokens < 2:
        raise WeightkitError(f"heatmap_tokens must be at least 2, got {heatmap_tokens}")
    list_name, blocks = _single_block_list(model)
    if len(blocks) < 2:
        raise WeightkitError(f"{list_name} has {len(blocks)} block: there is nothing to compare it with")
    labels = [f"{list_name}.{i}" for i in range(len(blocks))]
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    run_on = resolve_device(device) if device is not None else home

    moments = _Moments(len(blocks) + 1)
    heatmap: list[list[Tensor]] = [[] for _ in blocks]
    current: dict = {}  # this batch's token mask, the last state added (for the next pair) and its raw tensor

    def tokens_of(hidden: Tensor) -> Tensor:
        return hidden[current["mask"]].to(torch.float64)

    def before(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                current["raw"], current["state"] = hidden, tokens_of(hidden)
                moments.add_state(0, current["state"], None)
            elif not (hidden is current["raw"] or torch.equal(hidden, current["raw"])):
                raise WeightkitError(
                    f"{labels[index]} does not read exactly what {labels[index - 1]} outputs: weightkit "
                    "compares consecutive blocks of plain stacks only"
                )

        return hook

    def after(index: int):
        def hook(_module, _args, output):
            hidden = _hidden_of(output)
            state = tokens_of(hidden)
            moments.add_state(index + 1, state, current["state"])
            current["raw"], current["state"] = hidden, state
            room = heatmap_tokens - sum(len(t) for t in heatmap[index])
            if room > 0:
                heatmap[index].append(state[:room].cpu())

        return hook

    handles = []
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(block.register_forward_hook(after(i)))
        if use_cache is not None:
            model.config.use_cache = False  # a cache is not needed and would only hold memory
        model.eval().to(run_on)
        for batch in track(batches, "layer similarity", enabled=progress):
            mask = batch["attention_mask"].to(run_on).bool()
            current.clear()
            current["mask"] = mask
            moments.count += int(mask.sum())
            model(**{name: tensor.to(run_on) for name, tensor in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.to(home).train(was_training)

    if moments.count < 2:
        raise WeightkitError(f"the data has {moments.count} non-padding tokens; need at least 2")
    rows = []
    for i, label in enumerate(labels):
        cka_in_out, cosine_in_out = moments.pair(i)
        cka_next, cosine_next = moments.pair(i + 1) if i + 1 < len(labels) else (None, None)
        rows.append(
            {
                "block": label,
                "index": i,
                "cka_in_out": cka_in_out,
                "cosine_in_out": cosine_in_out,
                "cka_next": cka_next,
                "cosine_next": cosine_next,
                "tokens": moments.count,
            }
        )
    sampled = [torch.cat(parts) for parts in heatmap]
    return ActivationSimilarity(rows, _cka_matrix(sampled), labels, len(sampled[0]))


def layer_similarity(
    path: str | Path,
    data: str | Path | None = None,
    *,
    n_texts: int = 64,
    max_length: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    heatmap_tokens: int = 1024,
    progress: bool = False,
) -> ActivationSimilarity:
    """:func:`activation_similarity` of the model in directory ``path`` on ``n_texts`` passages of ``data``.

    Args:
        path: a Hugging Face model directory with a tokenizer.
        data: a ``.txt``/``.jsonl``/``.json`` text file (:func:`weightkit.data.load_texts`), or ``None`` for
            the standard-library docstrings; ``n_texts`` passages are picked by a shuffle seeded ``seed``.
        max_length: most tokens per passage.
        batch_size: passages per forward pass.
        device, heatmap_tokens, progress: as for :func:`activation_similarity`.
    """
    model, tokenizer, _ = load_model(path)
    if tokenizer is None:
        raise WeightkitError(f"{path} has no tokenizer: activation similarity needs one to read the text")
    texts = calibration_texts(data, n_texts, seed=seed)
    batches = tokenize_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return activation_similarity(
        model, batches, device=device, heatmap_tokens=heatmap_tokens, progress=progress
    )


# -- weights -------------------------------------------------------------------------------------------------


def _weight_pair(a: Tensor, b: Tensor) -> tuple[float | None, float]:
    """``(cosine, relative difference)`` of two weights of one shape, flattened, in float64.

    The relative difference is ``||b - a||_F / max(||a||_F, ||b||_F)`` (in [0, 2], symmetric, 0 for equal
    weights, defined unless both are zero, then 0); the cosine is ``None`` when either weight is all zeros.
    """
    a, b = a.detach().to(torch.float64).flatten(), b.detach().to(torch.float64).flatten()
    norm_a, norm_b = a.norm(), b.norm()
    scale = max(float(norm_a), float(norm_b))
    difference = float((b - a).norm() / scale) if scale > 0 else 0.0
    cosine = float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else None
    return cosine, difference


def weight_similarity(path: str | Path, *, allow_pickle: bool = False) -> list[dict]:
    """Compare each linear layer of every block with the same layer of the next block, streamed.

    The blocks and their linear layers come from the architecture built on the meta device
    (:func:`weightkit.models.skeleton`, no weights in memory) and :func:`weightkit.arch.block_lists`; the
    weights are read two at a time from the checkpoint. A role is a layer's name inside its block, e.g.
    ``self_attn.q_proj`` or ``attention.self.query``. Biases, norms and weights that are not linear layers
    (a mixture of experts' fused expert tensors) are not compared.

    Returns:
        One dict per consecutive pair and role: ``block``, ``next``, ``role``, ``cosine`` (of the flattened
        weights; ``None`` when either is all zeros), ``relative_difference`` (see :func:`_weight_pair`).

    Raises:
        WeightkitError: an unreadable or quantized checkpoint (its stored weights are packed integers, not
            the weights), a missing tensor, a shape that differs between blocks, NaN/Inf.
    """
    with CheckpointReader(path, allow_pickle=allow_pickle) as reader:
        config = reader.config
        if config is None:
            raise WeightkitError(f"{path} has no config.json: weightkit cannot tell where its blocks are")
        if is_quantized_checkpoint(config):
            raise WeightkitError(
                f"{path} is a quantized checkpoint: its stored weights are packed integers, so weight "
                "similarity would compare codes, not weights"
            )
        model = skeleton(reader.directory, model_auto_class(model_task(config)))
        names = CheckpointNames(model, reader.names())
        rows = []
        for order, (list_name, blocks) in enumerate(block_lists(model)):
            roles = [n for n, m in blocks[0].named_modules() if isinstance(m, LINEAR_TYPES)]
            for role in roles:
                previous = None
                for i in range(len(blocks)):
                    tensor = names.to_ckpt(f"{list_name}.{i}.{role}.weight")
                    if tensor not in reader:
                        raise WeightkitError(f"{path}: the checkpoint has no tensor {tensor}")
                    weight = reader.get_finite(tensor)
                    if previous is not None:
                        if weight.shape != previous.shape:
                            raise WeightkitError(
                                f"{tensor} has shape {tuple(weight.shape)} but the same layer of the block "
                                f"before has {tuple(previous.shape)}: they cannot be compared"
                            )
                        cosine, difference = _weight_pair(previous, weight)
                        rows.append(
                            {
                                "order": (order, i),
                                "block": f"{list_name}.{i - 1}",
                                "next": f"{list_name}.{i}",
                                "role": role,
                                "cosine": cosine,
                                "relative_difference": difference,
                            }
                        )
                    previous = weight
    # Read role by role (two tensors in memory), reported pair by pair in module order (the sort is stable).
    rows.sort(key=lambda row: row["order"])
    for row in rows:
        del row["order"]
    return rows


# -- candidates -------------------------------------------------------------------------------------------


def redundant_blocks(
    activation_rows: Sequence[dict] = (),
    weight_rows: Sequence[dict] = (),
    *,
    drop_cosine: float = 0.95,
    drop_cka: float = 0.95,
    share_cosine: float = 0.9,
) -> list[dict]:
    """Blocks that are candidates to drop or to share, with the reason: one dict per finding.

    * ``drop``: a block whose output is nearly its input (:func:`activation_similarity`'s rows): token cosine
      ``>= drop_cosine`` *and* CKA ``>= drop_cka``. ShortGPT ranks blocks by ``1 - cosine`` and removes a
      chosen number; a threshold is this report's heuristic, not the paper's. 0.95 means the block turns
      the average token by under ~18 degrees (``arccos 0.95``) while keeping the tokens' geometry; a block
      that passes its input through unchanged scores 1 on both. CKA is required too because cosine alone is
      dominated by a large shared component of the residual stream (every token alike).
    * ``share``: consecutive blocks whose weights are nearly equal (:func:`weight_similarity`'s rows): the
      cosine of *every* role ``>= share_cosine``. Independently trained (or initialised) layers have weight
      cosine near 0 (``O(1/sqrt(size))`` at random), so 0.9 is only reached when one block was derived from
      the other (copied, tied, shared and lightly fine-tuned): sharing one set of weights then loses little.
      Near-equal *outputs* of consecutive blocks are not listed again as ``share``: in a plain stack they are
      exactly the next block's input/output similarity, i.e. a ``drop`` of the next block.

    Returns:
        Dicts with ``block``, ``action`` (``"drop"`` or ``"share"``), ``with`` (the neighbour to share with;
        ``None`` for drops) and ``reason``, drops first, each in block order.
    """
    for name, value in (("drop_cosine", drop_cosine), ("drop_cka", drop_cka), ("share_cosine", share_cosine)):
        if not -1 <= value <= 1:
            raise WeightkitError(f"{name} must be in [-1, 1], got {value}")
    found = [
        {
            "block": row["block"],
            "action": "drop",
            "with": None,
            "reason": (
                f"its output is nearly its input: token cosine {row['cosine_in_out']:.4f} >= {drop_cosine} "
                f"and CKA {row['cka_in_out']:.4f} >= {drop_cka}"
            ),
        }
        for row in activation_rows
        if row["cosine_in_out"] >= drop_cosine and row["cka_in_out"] >= drop_cka
    ]
    pairs: dict[tuple[str, str], list[dict]] = {}
    for row in weight_rows:
        pairs.setdefault((row["block"], row["next"]), []).append(row)
    for (block, following), roles in pairs.items():
        cosines = [r["cosine"] for r in roles]
        if any(c is None for c in cosines) or min(cosines) < share_cosine:
            continue
        found.append(
            {
                "block": following,
                "action": "share",
                "with": block,
                "reason": (
                    f"its weights nearly equal {block}'s: cosine >= {share_cosine} for all {len(roles)} "
                    f"layers (lowest {min(cosines):.4f}, largest relative difference "
                    f"{max(r['relative_difference'] for r in roles):.4f})"
                ),
            }
        )
    return found
