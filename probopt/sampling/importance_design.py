r"""The importance design: draw probabilities from (stale) scores, and the table holding them.

**The model.** The training set is a finite population :math:`U = \{1..N\}`; a minibatch is
:math:`b` independent draws with probabilities :math:`q_k` (a PPS design with replacement,
:class:`~probopt.sampling.designs.PPSWithReplacement`), reweighted by Hansen–Hurwitz. The
variance of that estimate is smallest at :math:`q_k \propto \lVert g_k\rVert` (Alain et al.), but
the norms are not known when drawing: they come from a :class:`ScoreTable` of *stale* scores
:math:`s_k` (the norm at the last visit, or from scoring workers, :mod:`probopt.distributed`),
each stored with the parameter version that produced it. The draw probabilities are

.. math::
    q_k = (1 - \lambda)\,\frac{s_k + c}{\sum_U (s_l + c)} + \frac{\lambda}{N}

with additive smoothing :math:`c` (``smoothing``) and mixing with uniform :math:`\lambda`
(``uniform_mix``) (:func:`draw_probabilities`). Never-scored examples get the mean of the known
scores, so every :math:`q_k > 0` and the estimator stays unbiased for the whole population.
Staleness and smoothing only change the variance, never the mean. With :math:`\lambda > 0`
every weight is bounded, :math:`1/(N q_k) \le 1/\lambda`.

The estimators that use this design are in :mod:`probopt.sampling.importance`.

References:
    Alain, Lamb, Sankar, Courville & Bengio, `Variance Reduction in SGD by Distributed Importance
    Sampling <https://arxiv.org/abs/1511.06481>`_, 2015.
    Hansen & Hurwitz, On the theory of sampling from finite populations, Ann. Math. Statist. 14,
    1943.

.. note::
    Alain et al.'s code stamps scores with wall-clock time and gives examples whose score is
    older than a time window probability 0 (their estimator is unbiased only for the mean over
    the recently scored subset); here scores carry the parameter version that produced them,
    stale scores are used as they are and missing ones get the mean score
    (``shared/notes/importance.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ScoreTable", "draw_probabilities"]


# --------------------------------------------------------------------------------------------
# validation (shared with probopt.sampling.importance_tau and probopt.sampling.importance)


def _check_nonneg(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0)")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    return float(value)


def _check_unit(name: str, value: float, *, closed: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value <= 1 if closed else 0 <= value < 1)
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (must lie in [0, 1{']' if closed else ')'})")
    return float(value)


# --------------------------------------------------------------------------------------------
# the design


def draw_probabilities(
    scores: Tensor, *, smoothing: float = 0.0, uniform_mix: float = 0.0
) -> Tensor:
    r"""Draw probabilities :math:`q_k = (1-\lambda)(s_k + c)/\sum_U(s_l + c) + \lambda/N`.

    Missing scores (NaN: never scored) are replaced by the mean of the known ones (1 when none
    is known), so every example stays drawable. Note that additive smoothing by
    :math:`c = \gamma \bar s` equals mixing with :math:`\lambda = \gamma/(1 + \gamma)`: the two
    knobs span the same family, ``smoothing`` in the units of the scores (Alain et al.'s
    constant), ``uniform_mix`` scale-free.

    Args:
        scores: :math:`s_k \ge 0` or NaN, shape (N,).
        smoothing: :math:`c \ge 0`.
        uniform_mix: :math:`\lambda \in [0, 1]`.

    Returns:
        float64 probabilities of shape (N,), summing to 1, all positive.

    Raises:
        ValueError: a score is negative or infinite, or some :math:`q_k = 0` (a zero score with
            ``smoothing = uniform_mix = 0``: that example could never be drawn, and the
            estimator would be unbiased only for the others).

    Example:
        >>> draw_probabilities(torch.tensor([1.0, 3.0, float("nan"), 0.0]), uniform_mix=0.2)
        tensor([0.2000, 0.5000, 0.2500, 0.0500], dtype=torch.float64)
    """
    s = torch.as_tensor(scores).detach().to(device="cpu", dtype=torch.float64).clone()
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"Invalid scores: expected a non-empty (N,) vector, got {tuple(s.shape)}")
    c = _check_nonneg("smoothing", smoothing)
    lam = _check_unit("uniform_mix", uniform_mix)
    bad = torch.isinf(s) | (s < 0)
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"Invalid scores: example {k} has score {float(s[k])} (need >= 0)")
    return _mix(_fill(s), c, lam)


def _fill(s: Tensor) -> Tensor:
    """NaN (never scored) -> mean of the known scores (1 when none is known); a new tensor."""
    known = ~torch.isnan(s)
    count = int(known.sum())
    if count == s.numel():
        return s.clone()
    fill = float(torch.where(known, s, 0.0).sum()) / count if count else 1.0
    return torch.where(known, s, fill)


def _mix(s: Tensor, c: float, lam: float) -> Tensor:
    r""":math:`(1-\lambda)(s + c)/\sum(s + c) + \lambda/N` for filled scores, checked > 0."""
    n = s.numel()
    s = s + c
    total = float(s.sum())
    base = s / total if total > 0 else torch.full_like(s, 1.0 / n)
    q = base.mul_(1.0 - lam).add_(lam / n)
    if not bool((q > 0).all()):
        k = int(torch.nonzero(q <= 0)[0])
        raise ValueError(
            f"example {k} would have draw probability 0 (score 0 with smoothing = "
            f"uniform_mix = 0); set smoothing > 0 or uniform_mix > 0 to keep the estimator "
            f"unbiased for the whole population"
        )
    return q


class ScoreTable:
    """Per-example scores with the parameter version that produced each (freshest wins).

    ``versions[k] = -1`` and ``scores[k] = NaN`` until example k is scored. :meth:`update` only
    overwrites an entry with a score of the same or a later version, so late results from a slow
    worker never replace fresher ones.

    Example:
        >>> table = ScoreTable(4)
        >>> table.update(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), version=3)
        2
        >>> table.update(torch.tensor([2, 3]), torch.tensor([9.0, 4.0]), version=1)  # 2 is newer
        1
        >>> table.scores, table.versions
        (tensor([1., nan, 2., 4.], dtype=torch.float64), tensor([ 3, -1,  3,  1]))
    """

    def __init__(self, population_size: int) -> None:
        if isinstance(population_size, bool) or not isinstance(population_size, int):
            raise ValueError(f"Invalid population_size: {population_size!r}")
        if population_size < 1:
            raise ValueError(f"Invalid population_size: {population_size!r} (must be >= 1)")
        self.scores = torch.full((population_size,), math.nan, dtype=torch.float64)
        self.versions = torch.full((population_size,), -1, dtype=torch.int64)
        self.revision = 0
        """Incremented by every :meth:`update` that writes (for caches of derived values)."""

    @property
    def population_size(self) -> int:
        return self.scores.numel()

    def update(self, indices: Tensor, scores: Tensor, version: int) -> int:
        """Write ``scores`` of ``indices`` computed with parameters ``version``; return how many
        entries were written (an entry with a later version is kept)."""
        idx = torch.as_tensor(indices).detach().to("cpu", torch.int64).reshape(-1)
        s = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
        if idx.shape != s.shape:
            raise ValueError(f"indices {tuple(idx.shape)} and scores {tuple(s.shape)} differ")
        if idx.numel() == 0:
            return 0
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= self.population_size:
            raise ValueError(f"indices outside [0, {self.population_size - 1}]")
        if not bool(((s >= 0) & (s < math.inf)).all()):  # NaN fails s >= 0
            raise ValueError("scores must be finite and >= 0")
        keep = self.versions[idx] <= int(version)
        written = int(keep.sum())
        if written == idx.numel():
            self.scores[idx] = s
            self.versions[idx] = int(version)
        elif written:
            self.scores[idx[keep]] = s[keep]
            self.versions[idx[keep]] = int(version)
        self.revision += written > 0
        return written

    def coverage(self) -> float:
        """Share of examples scored at least once."""
        return float((self.versions >= 0).double().mean())

    def mean_age(self, version: int) -> float:
        """Mean ``version - versions[k]`` over scored examples (NaN when none)."""
        seen = self.versions >= 0
        if not bool(seen.any()):
            return math.nan
        return float((version - self.versions[seen]).double().mean())
