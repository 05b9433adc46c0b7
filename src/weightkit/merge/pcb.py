"""PCB-merging: weigh every entry of every task vector by its importance within and across tasks.

Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024, arXiv 2410.02396.

With ``N`` task vectors ``tau_i = theta_i - theta_base`` over a *scope* of ``D`` entries, the paper's
method is (softmaxes and ``Norm`` run over the ``D`` entries of the scope; products are elementwise)::

    Norm(x)      = (x - min x) / (max x - min x)                 min-max scaling to [0, 1]
    beta_intra_i = Softmax(N * Norm(tau_i * tau_i))              intra-balancing (self-awareness)
    beta_inter_i = sum_{j=1..N} Softmax(Norm(tau_i * tau_j))     inter-balancing (cross-awareness), j = i too
    beta_i       = beta_intra_i * beta_inter_i                   the PCB matrix
    m_i          = beta_i >= sorted(beta_i)[int((1 - r) * D)]    drop: keep each task's top-r scores
    tau_m        = sum_i m_i beta_i tau_i / sum_i m_i beta_i     rescale: a score-weighted mean per entry
    theta        = theta_base + lambda * tau_m

``r`` is ``ratio`` and ``lambda`` is ``scale``. Intra-balancing favours an entry that is large within its
own task (squared, normalised, sharpened by ``N``); inter-balancing favours one whose products with the
other tasks are high (same sign, large), so an entry one task pushes against the others scores low.

**Scope.** The paper scores the whole flattened model (all tensors concatenated). Both are offered:

- per tensor (``stats=None``): each tensor is its own scope, as mergekit-style methods work. One pass,
  nothing shared between tensors, and every tensor keeps ``r`` of each task's entries.
- whole model: the paper's. Three kinds of constants then span the model: the min and max of every
  ``tau_i * tau_j`` (for ``Norm``), the softmax denominators, and each task's drop threshold.
  :class:`PCBStats` collects them from a stream of tensors, exactly, in passes that each need the
  previous one's result: (1) min/max of the products, (2) sums of exponentials (``Norm`` needs the
  min/max first), (3)+(4) each task's threshold, its score at 0-based ascending position
  ``int((1 - r) * D)``, found exactly by radix selection on the float32 bit patterns of the scores
  (:mod:`weightkit.merge.kth`: two counting passes, 65536 counters per task, no stored values). With
  ``ratio == 1`` nothing is dropped and passes 3 and 4 are skipped. The merge is then one more pass with
  :func:`pcb_merge` (``stats=...``). Cost: every checkpoint is read 5 times (3 with ``ratio == 1``) and
  each pass computes the ``N (N + 1) / 2`` (passes 1-2) or ``N**2`` (passes 3-4 and the merge)
  elementwise products of every tensor.

Per tensor is the recommended default: it streams in one pass, and one tensor with outsized deltas
(embeddings, norms) cannot flatten every other tensor's ``Norm`` to ~0 and so decide alone which
entries of the model survive the drop.

**Memory.** Balancing is inherently across models, so all ``N`` task vectors of a tensor are inputs at
once (like TIES); beyond them the work holds about six tensor-sized float32 temporaries (plus a float32
copy of each input being multiplied when the inputs are not float32), never an ``[N, ...]`` stack: scores
are built one task at a time and the weighted mean is accumulated as they come.

**Numerics.** Products, ``Norm``, exponentials and scores are float32 (float64 inputs included; bf16 and
fp16 are promoted); sums of exponentials are accumulated in float64; the weighted mean is computed in the
inputs' dtype promoted to at least float32 and the result is cast to the base's dtype. Scores are
``D**2 * beta_i`` rather than ``beta_i``: each softmax divides by the *mean* of its exponentials over
the scope, not the sum, and its exponent is shifted by its maximum (``N`` for intra, 1 for inter) as
softmax implementations do. A positive factor per task leaves ``m_i`` unchanged and one common to all
tasks leaves ``tau_m`` unchanged, so the merge is the paper's, while the scores stay near 1 instead of
~``1/D**2`` (1e-20 for a 7B model).

**Deliberate deviations.**

- The authors' released code (github.com/duguodong7/pcb-merging) differs from the paper's equations:
  it clips ``|tau|`` to its 0.01% / 99.99% quantiles before scoring, uses ``exp(N * Norm(tau_i**2))``
  without the softmax denominator, replaces the sum of softmaxes by ``tanh(tau_i * sum_j tau_j)``, and
  min-max rescales each task's kept scores (so the lowest kept score weighs 0). The paper's equations
  are implemented here, not the code.
- ``Norm`` is read as min-max scaling over the scope, which is what the authors' code's ``normalize``
  does (an unmerged mergekit pull request, arcee-ai/mergekit#432, reads it as L2 normalisation). Where
  ``max == min`` (e.g. a task that left a tensor untouched) min-max divides by 0; here ``Norm`` is 0
  there, so that softmax is uniform.
- ``tau_m`` is 0 where no task keeps an entry (0/0 in the formula; the authors' code also gives 0).
- Not a deviation, but worth knowing: as in the paper, a kept entry whose delta is 0 still adds its score
  to the divisor, so it pulls the mean towards 0 (TIES leaves zeros out of its divisor). With ``>=``,
  all scores equal to the threshold are kept, so ties (typically a task's zero entries) may keep more
  than ``r * D`` entries.
- One ``lambda`` for all tasks: the paper's evolutionary search for per-task ``lambda_i`` is not part of
  the math here (it needs evaluation data).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from weightkit.errors import WeightkitError
from weightkit.merge.engine import task_vectors
from weightkit.merge.kth import StreamedKthSmallest, kth_smallest
from weightkit.merge.params import Spec, check_range, check_spec
from weightkit.registry import register

__all__ = ["PCBStats", "pcb_model_stats", "pcb_merge", "PCBConfig"]

_STAGES = ("range", "softmax", "coarse", "fine", "ready")

# Scores lie within about [N exp(-N - 1), N exp(N + 1)]; float32 holds that range for N up to ~80.
_MAX_MODELS = 64


def _check_ratio(ratio: float, where: str) -> None:
    # `not (0 < ratio <= 1)` also refuses NaN.
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise WeightkitError(f"{where}: ratio must be in (0, 1] (1 keeps every entry), got {ratio!r}")


def _drop_position(ratio: float, numel: int) -> int:
    """0-based ascending position of the threshold score: the paper's ``sorted(beta_i)[(1 - r) * D]``.

    At most ``numel - 1``: a ratio so small that ``1 - ratio`` rounds to 1 still keeps the largest score.
    """
    return min(int((1 - ratio) * numel), numel - 1)


def _f32(flat: Tensor) -> Tensor:
    # .to returns the tensor itself when it is already float32: callers must not modify the result in place.
    return flat.to(torch.float32)


class PCBStats:
    """The whole-model constants of PCB-merging, collected exactly from a stream of tensors.

    Feed every tensor of the scope once per pass with :meth:`update` (any order, the same tensors each
    pass), call :meth:`finish_pass` after each pass, and repeat until :attr:`ready`; then merge each
    tensor with ``pcb_merge(..., stats=stats)``. :func:`pcb_model_stats` runs that loop.

    Passes (each needs the previous one's result):

    1. ``"range"``: min and max of ``tau_i * tau_j`` over the scope, every pair ``i <= j``.
    2. ``"softmax"``: mean over the scope of ``exp(N * (Norm(tau_i * tau_i) - 1))`` (intra) and of
       ``exp(Norm(tau_i * tau_j) - 1)`` (inter), the softmax denominators divided by ``D``.
    3. ``"coarse"``: per task, counts of the high 16 bits of its float32 scores.
    4. ``"fine"``: per task, counts of the low 16 bits of the scores in the bucket that holds the
       threshold; with pass 3 this gives exactly the score at 0-based ascending position
       ``int((1 - r) * D)``, the paper's ``sorted(beta_i)[(1 - r) * D]``.

    With ``ratio == 1`` the stats are ready after pass 2 (nothing is dropped).

    Every pass must compute on the same device, so that the scores of passes 3 and 4 and of the merge are
    bit-identical (the threshold is compared with them).

    Attributes:
        n_models: number of task vectors.
        ratio: fraction of each task's entries kept, in (0, 1].
        stage: the pass :meth:`update` feeds next: one of ``"range"``, ``"softmax"``, ``"coarse"``,
            ``"fine"``, ``"ready"``.
        numel: entries in the scope (set by the first pass).
        prod_min, prod_max: ``[N, N]`` float64, min and max of ``tau_i * tau_j`` over the scope.
        intra_mean: ``[N]`` float64, mean of ``exp(N * (Norm(tau_i * tau_i) - 1))``.
        inter_mean: ``[N, N]`` float64, mean of ``exp(Norm(tau_i * tau_j) - 1)``.
        thresholds: ``[N]`` float32 score thresholds (a task keeps scores ``>=`` its threshold), or None
            when ``ratio == 1``.
    """

    def __init__(self, n_models: int, ratio: float):
        """Start empty, at the first pass.

        Args:
            n_models: number of task vectors fed to every :meth:`update`, 1 to 64.
            ratio: fraction of each task's entries kept, in (0, 1].

        Raises:
            WeightkitError: ``n_models`` outside [1, 64] or ``ratio`` outside (0, 1].
        """
        if isinstance(n_models, bool) or not isinstance(n_models, int) or not 1 <= n_models <= _MAX_MODELS:
            raise WeightkitError(
                f"PCBStats: n_models must be an int in [1, {_MAX_MODELS}] (the intra-balancing exponent "
                f"N * Norm overflows float32 beyond), got {n_models!r}"
            )
        _check_ratio(ratio, "PCBStats")
        n = n_models
        self.n_models = n
        self.ratio = float(ratio)
        self.stage = _STAGES[0]
        self.numel = 0
        self.prod_min = torch.full((n, n), float("inf"), dtype=torch.float64)
        self.prod_max = torch.full((n, n), float("-inf"), dtype=torch.float64)
        self.intra_mean = torch.zeros(n, dtype=torch.float64)
        self.inter_mean = torch.zeros(n, n, dtype=torch.float64)
        self.thresholds: Tensor | None = None
        self._seen = 0  # entries fed in the current pass
        self._selects: list[StreamedKthSmallest] = []  # passes 3 and 4: each task's threshold
        # Python copies of the constants, read once per product.
        self._lo: list[list[float]] = []
        self._span: list[list[float]] = []
        self._intra: list[float] = []
        self._inter: list[list[float]] = []

    @property
    def ready(self) -> bool:
        """True once every pass is finished: the stats can be given to :func:`pcb_merge`."""
        return self.stage == "ready"

    # ------------------------------------------------------------------------------------------ feeding

    def update(self, deltas: list[Tensor]) -> None:
        """Feed one tensor's task vectors (one per model, same shape) to the current pass.

        Args:
            deltas: ``n_models`` task vectors of one tensor; not modified. Empty tensors are ignored.

        Raises:
            WeightkitError: the stats are already ready, the number of task vectors is not ``n_models``,
                or their shapes differ.
        """
        if self.ready:
            raise WeightkitError("PCBStats.update: every pass is already finished")
        _check_deltas(deltas, self.n_models, "PCBStats.update")
        numel = deltas[0].numel()
        if numel == 0:
            return
        flats = [d.reshape(-1) for d in deltas]
        n = self.n_models
        if self.stage == "range":
            for i in range(n):
                for j in range(i, n):
                    low, high = torch.aminmax(_f32(flats[i]) * _f32(flats[j]))
                    self.prod_min[i, j] = min(float(self.prod_min[i, j]), float(low))
                    self.prod_max[i, j] = max(float(self.prod_max[i, j]), float(high))
        elif self.stage == "softmax":
            for i in range(n):
                for j in range(i, n):
                    shifted = self._normed(flats, i, j).sub_(1.0)
                    if i == j:
                        self.intra_mean[i] += float(shifted.mul(n).exp_().sum(dtype=torch.float64))
                    self.inter_mean[i, j] += float(shifted.exp_().sum(dtype=torch.float64))
        else:
            for i in range(n):
                self._selects[i].update(self._scores(flats, i))
        self._seen += numel

    def finish_pass(self) -> None:
        """Close the current pass: derive its constants and move to the next pass.

        Raises:
            WeightkitError: the stats are already ready, the first pass saw no entries, or a later pass
                saw a different number of entries than the first (the same tensors must be fed each pass).
        """
        if self.ready:
            raise WeightkitError("PCBStats.finish_pass: every pass is already finished")
        stage = self.stage
        if stage == "range":
            if self._seen == 0:
                raise WeightkitError("PCBStats: the first pass was fed no entries")
            self.numel = self._seen
        elif self._seen != self.numel:
            raise WeightkitError(
                f"PCBStats: pass {stage!r} was fed {self._seen} entries, the first pass {self.numel}; feed "
                "the same tensors in every pass"
            )
        self._seen = 0
        n = self.n_models
        if stage == "range":
            upper = torch.ones(n, n, dtype=torch.bool).triu()
            self.prod_min = torch.where(upper, self.prod_min, self.prod_min.T)
            self.prod_max = torch.where(upper, self.prod_max, self.prod_max.T)
            self._lo = self.prod_min.tolist()
            self._span = (self.prod_max - self.prod_min).tolist()
            self.stage = "softmax"
        elif stage == "softmax":
            self.intra_mean /= self.numel
            self.inter_mean /= self.numel
            self.inter_mean = torch.where(
                torch.ones(n, n, dtype=torch.bool).triu(), self.inter_mean, self.inter_mean.T
            )
            self._intra = self.intra_mean.tolist()
            self._inter = self.inter_mean.tolist()
            self.stage = "ready" if self.ratio >= 1 else "coarse"
            position = _drop_position(self.ratio, self.numel)
            self._selects = [StreamedKthSmallest(position) for _ in range(n)]
        elif stage == "coarse":
            for select in self._selects:
                select.finish_pass()
            self.stage = "fine"
        else:
            for select in self._selects:
                select.finish_pass()
            self.thresholds = torch.stack([select.value for select in self._selects])
            self._selects = []
            self.stage = "ready"

    # ---------------------------------------------------------------------------------------- scoring

    def _normed(self, flats: list[Tensor], i: int, j: int) -> Tensor:
        """``Norm(tau_i * tau_j)`` for this tensor's entries, with the scope's min and max: a new tensor."""
        product = _f32(flats[i]) * _f32(flats[j])
        span = self._span[i][j]
        if span <= 0:
            return product.zero_()
        return product.sub_(self._lo[i][j]).div_(span)

    def _scores(self, flats: list[Tensor], i: int) -> Tensor:
        """Task ``i``'s scores ``D**2 * beta_i`` for this tensor's entries (float32, > 0)."""
        n = self.n_models
        inter = None
        intra = None
        for j in range(n):
            shifted = self._normed(flats, i, j).sub_(1.0)
            if j == i:
                # The same operations as in the "softmax" pass, so the scores are consistent with its means.
                intra = shifted.mul(n).exp_().div_(self._intra[i])
            term = shifted.exp_().div_(self._inter[i][j])
            inter = term if inter is None else inter.add_(term)
        return intra.mul_(inter)


def _check_deltas(deltas: list[Tensor], n_models: int | None, where: str) -> None:
    if n_models is not None and len(deltas) != n_models:
        raise WeightkitError(f"{where}: expected {n_models} task vectors, got {len(deltas)}")
    for i, delta in enumerate(deltas):
        if delta.shape != deltas[0].shape:
            raise WeightkitError(
                f"{where}: task vector {i} has shape {tuple(delta.shape)}, task vector 0 has "
                f"{tuple(deltas[0].shape)}"
            )


def pcb_model_stats(
    delta_stream: Callable[[], Iterable[list[Tensor]]], *, n_models: int, ratio: float
) -> PCBStats:
    """Collect whole-model :class:`PCBStats` by streaming every tensor once per pass.

    Args:
        delta_stream: a callable returning a fresh iterator over per-tensor lists of task vectors
            (``[delta_model_0, delta_model_1, ...]``), the same tensors each call; it is called once per
            pass: 4 times, or 2 when ``ratio == 1``. The tensors are not modified.
        n_models: number of task vectors in each list.
        ratio: fraction of each task's entries kept, in (0, 1].

    Returns:
        Ready stats for ``pcb_merge(..., ratio=ratio, stats=...)``.

    Raises:
        WeightkitError: as :class:`PCBStats` (bad ``ratio``, mismatched shapes or counts, an empty stream).
    """
    stats = PCBStats(n_models, ratio)
    while not stats.ready:
        for deltas in delta_stream():
            stats.update(deltas)
        stats.finish_pass()
    return stats


def pcb_merge(
    base: Tensor,
    deltas: list[Tensor],
    *,
    ratio: float,
    scale: float = 1.0,
    stats: PCBStats | None = None,
) -> Tensor:
    """PCB-merge one tensor: ``base + scale * tau_m`` with the paper's balancing, drop and rescale.

    See the module docstring for the equations. With ``stats=None`` the tensor is its own scope
    (``Norm``, the softmaxes and each task's top-``ratio`` threshold are over this tensor only); with
    whole-model ``stats`` from :func:`pcb_model_stats` they are the model's.

    Args:
        base: the base model's tensor; not modified.
        deltas: one task vector per fine-tuned model, each of ``base``'s shape; not modified.
        ratio: fraction of each task's entries kept (the paper's ``r``), in (0, 1]; 1 drops nothing.
        scale: multiplies the merged task vector (the paper's ``lambda``).
        stats: whole-model constants (ready, for the same number of models and the same ``ratio``), or
            None for the per-tensor scope.

    Returns:
        A new tensor of ``base``'s shape and dtype (a copy of ``base`` when ``deltas`` is empty or the
        tensor has no entries).

    Raises:
        WeightkitError: ``ratio`` outside (0, 1], a task vector whose shape differs from ``base``, or
            ``stats`` that are not ready or were collected for another number of models or ratio.
    """
    _check_ratio(ratio, "pcb_merge")
    for i, delta in enumerate(deltas):
        if delta.shape != base.shape:
            raise WeightkitError(
                f"pcb_merge: task vector {i} has shape {tuple(delta.shape)}, the base has {tuple(base.shape)}"
            )
    if stats is not None:
        if not isinstance(stats, PCBStats):
            raise WeightkitError(f"pcb_merge: stats must be PCBStats or None, got {type(stats).__name__}")
        if not stats.ready:
            raise WeightkitError(f"pcb_merge: the stats are not ready (next pass: {stats.stage!r})")
        if stats.n_models != len(deltas):
            raise WeightkitError(
                f"pcb_merge: the stats were collected for {stats.n_models} task vectors, got {len(deltas)}"
            )
        if stats.ratio != float(ratio):
            raise WeightkitError(f"pcb_merge: the stats were collected for ratio {stats.ratio}, got {ratio}")
    if not deltas or base.numel() == 0:
        return base.clone()

    local = stats is None
    if local:
        # The tensor is the whole scope: its own min/max and softmax denominators; thresholds come below.
        stats = PCBStats(len(deltas), ratio)
        for _ in range(2):
            stats.update(deltas)
            stats.finish_pass()
    flats = [d.reshape(-1) for d in deltas]
    work = torch.promote_types(base.dtype, torch.float32)
    for delta in deltas:
        work = torch.promote_types(work, delta.dtype)
    numerator = torch.zeros(base.numel(), dtype=work, device=base.device)
    divisor = torch.zeros(base.numel(), dtype=torch.float32, device=base.device)
    position = _drop_position(ratio, base.numel())
    for i, flat in enumerate(flats):
        scores = stats._scores(flats, i)
        if ratio < 1:
            if local:
                threshold = kth_smallest(scores, position).to(scores.device)
            else:
                threshold = stats.thresholds[i].to(scores.device)
            scores.masked_fill_(scores < threshold, 0.0)
        divisor.add_(scores)
        numerator.addcmul_(flat, scores)
        del scores
    # Where no task kept the entry the numerator is 0 too: dividing by 1 leaves 0.
    numerator.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if scale != 1:
        numerator.mul_(scale)
    return numerator.add_(base.reshape(-1)).to(base.dtype).view(base.shape)


@dataclass
class PCBConfig:
    """PCB-merging of two or more fine-tunes of a base model (``merge_method: pcb``).

    Attributes:
        density: the paper's ratio ``r``: the fraction of each task vector's entries kept after
            balancing, in (0, 1]. The paper uses 0.1-0.2 on its benchmarks; 0.2 is the default.
        scale: multiplies the merged task vector (the paper's ``lambda``; mergekit's name ``lambda`` is
            accepted in recipes); a number, gradient or filter list.
        scope: "tensor" (default: one streamed pass, every tensor is its own scope) or "model" (the
            paper's: scores and thresholds over the whole model; reads every model four more times).
    """

    density: float = 0.2
    scale: Spec = 1.0
    scope: str = "tensor"

    per_tensor: ClassVar[tuple[str, ...]] = ("scale",)
    model_count: ClassVar[tuple[int, int | None]] = (2, None)
    computes_on_device: ClassVar[bool] = True  # N**2 products and exponentials per tensor (see merge)

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, int | float):
            raise WeightkitError(f"pcb: density must be one number in (0, 1], got {self.density!r}")
        check_range(self.density, "pcb: density", 0.0, 1.0, low_open=True)
        check_spec(self.scale, "pcb: scale (lambda)")
        if self.scope not in ("tensor", "model"):
            raise WeightkitError(f"pcb: scope must be 'tensor' or 'model', got {self.scope!r}")


def _pcb_merger(config: PCBConfig, plan, model_params):
    stats = None
    if config.scope == "model":
        stats = pcb_model_stats(lambda: task_vectors(plan), n_models=len(model_params), ratio=config.density)

    def merge_tensor(inputs):
        deltas = [t.sub_(inputs.base) for t in inputs.tensors]  # the inputs are ours to modify
        return pcb_merge(inputs.base, deltas, ratio=config.density, scale=inputs.values["scale"], stats=stats)

    return merge_tensor


register("merge", "pcb", PCBConfig, _pcb_merger)
