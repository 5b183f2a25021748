r"""Reliability of importance weights (Kish ESS, PSIS Pareto :math:`\hat k`); the variance monitor.

Importance sampling reweights draw :math:`k` by :math:`w_k = 1/(N q_k)`; when a few weights are
huge, the estimate is unbiased but useless. Two diagnostics of a set of weights:

* Kish's effective sample size :math:`(\sum w_i)^2/\sum w_i^2` (:func:`kish_ess`);
* the PSIS Pareto :math:`\hat k` of the weights' upper tail (:func:`pareto_khat`, through
  ArviZ); above 0.7 the weights are too heavy-tailed to be trusted (Vehtari et al.).

:func:`diagnose_weights` returns both and warns (:class:`ImportanceWeightWarning`) above the
threshold. :func:`trace_variances` is Alain et al.'s variance monitor: the trace of the
per-draw covariance of the Hansen–Hurwitz estimate,

.. math::
    \operatorname{tr}\operatorname{Cov}\hat\mu = \sum_U \frac{\lVert g_k\rVert^2}{N^2 q_k}
    - \lVert\mu\rVert^2,

for uniform, the ideal :math:`q \propto \lVert g\rVert` and a given design.

The estimators whose weights these diagnose are in :mod:`probopt.sampling.importance`.

References:
    Kish, *Survey Sampling*, Wiley, 1965 (the effective sample size).
    Vehtari, Simpson, Gelman, Yao & Gabry, `Pareto Smoothed Importance Sampling
    <https://arxiv.org/abs/1507.02646>`_, JMLR 2024.
    Alain, Lamb, Sankar, Courville & Bengio, `Variance Reduction in SGD by Distributed Importance
    Sampling <https://arxiv.org/abs/1511.06481>`_, 2015.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from probopt._optional import require

__all__ = [
    "ImportanceWeightWarning",
    "TraceVariances",
    "WeightDiagnostics",
    "diagnose_weights",
    "kish_ess",
    "pareto_khat",
    "trace_variances",
]


class ImportanceWeightWarning(UserWarning):
    """The Pareto k-hat of a set of importance weights exceeds the reliability threshold."""


class WeightDiagnostics(NamedTuple):
    """Effective sample size and Pareto k-hat of a set of importance weights."""

    ess: float  # Kish (sum w)^2 / sum w^2
    ess_fraction: float  # ess / num_weights
    khat: float  # PSIS Pareto k-hat (NaN: too few weights; -inf: flat tail)
    num_weights: int


def kish_ess(weights: Tensor) -> float:
    r"""Kish's effective sample size :math:`(\sum w_i)^2 / \sum w_i^2`.

    Example:
        >>> kish_ess(torch.ones(8)), kish_ess(torch.tensor([1.0, 0.0, 0.0]))
        (8.0, 1.0)
    """
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    sq = float(w.square().sum())
    return float(w.sum()) ** 2 / sq if sq > 0 else 0.0


def pareto_khat(weights: Tensor) -> float:
    r"""PSIS Pareto :math:`\hat k` of importance weights (ArviZ's ``psislw``).

    Fits a generalised Pareto distribution to the largest weights; :math:`\hat k > 0.7` means the
    weights' distribution is too heavy-tailed for the estimate to be trusted (Vehtari et al.).
    ``arviz_stats``' ``psislw`` is written for leave-one-out and negates its input, so it gets
    :math:`-\log w`. Returns NaN when there are too few weights for a tail fit (ArviZ needs at
    least 5 tail draws: about 25 weights) and :math:`-\infty` when the largest weights are all
    equal (a flat tail, no heavy tail to fit).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.rand(4000, generator=g, dtype=torch.float64) ** -0.9  # tail index 0.9
        >>> 0.7 < pareto_khat(w) < 1.1
        True
    """
    array_stats = require("arviz_stats.base", "the PSIS Pareto k-hat diagnostic").array_stats
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).numpy()
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("pareto_khat needs finite, positive weights")
    if np.all(w == w[0]):
        return -math.inf
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            _, khat = array_stats.psislw(-np.log(w), r_eff=1.0)
    except (ValueError, IndexError) as err:
        if "same" in str(err):
            return -math.inf
        return math.nan
    return float(khat)


def diagnose_weights(
    weights: Tensor, *, warn: bool = True, khat_threshold: float = 0.7
) -> WeightDiagnostics:
    """Kish ESS and Pareto k-hat of ``weights``; warns (:class:`ImportanceWeightWarning`) when
    k-hat exceeds ``khat_threshold``.

    Example:
        >>> d = diagnose_weights(torch.ones(100))
        >>> d.ess, d.khat
        (100.0, -inf)
    """
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    ess = kish_ess(w)
    khat = pareto_khat(w)
    if warn and khat > khat_threshold:
        warnings.warn(
            f"importance weights are unreliable: Pareto k-hat = {khat:.2f} > {khat_threshold} "
            f"(ESS {ess:.1f} of {w.numel()}); increase smoothing or uniform_mix",
            ImportanceWeightWarning,
            stacklevel=2,
        )
    return WeightDiagnostics(ess, ess / max(w.numel(), 1), khat, w.numel())


class TraceVariances(NamedTuple):
    """Trace of the gradient-estimate covariance per single draw (divide by b for a batch)."""

    uniform: float  # mean ||g||^2 - ||mu||^2
    ideal: float  # (mean ||g||)^2 - ||mu||^2 (fresh norms)
    design: float  # sum ||g||^2 / (N^2 q) - ||mu||^2 (the given q, e.g. stale + smoothed)


def trace_variances(
    norms: Tensor, probabilities: Tensor | None = None, mean_sq_norm: float = 0.0
) -> TraceVariances:
    r"""Alain et al.'s variance monitor: :math:`\operatorname{tr}\Sigma` per draw, three designs.

    Args:
        norms: fresh :math:`\lVert g_k\rVert` of the whole population, shape (N,).
        probabilities: the design :math:`q` to evaluate (default uniform).
        mean_sq_norm: :math:`\lVert\mu\rVert^2` of the full gradient (0 gives second moments).

    Example:
        >>> trace_variances(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), 4.0)
        TraceVariances(uniform=1.0, ideal=0.0, design=1.0)
    """
    g = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
    n = g.numel()
    q = torch.full_like(g, 1.0 / n) if probabilities is None else torch.as_tensor(probabilities)
    q = q.to(torch.float64)
    mu2 = float(mean_sq_norm)
    return TraceVariances(
        uniform=float(g.square().mean()) - mu2,
        ideal=float(g.mean()) ** 2 - mu2,
        design=float((g.square() / q).sum()) / n**2 - mu2,
    )
