r"""Slow, readable NumPy references of the survey estimators, and exact enumeration of designs.

The torch implementations in :mod:`probopt.sampling` must match these in float64. They are
written as the textbook sums (explicit loops over units and pairs), independently of the
vectorised code: the GREG estimator here uses the regression form
:math:`\hat t_{HT} + \hat B^T (t_h - \hat t_h)`, not the weights.

Exact enumeration lists every sample a design can draw with its probability, for populations
small enough (N ≤ 10 or so) that design expectations are finite sums:

.. math::
    E_p[\hat\theta] = \sum_s p(s)\, \hat\theta(s), \qquad
    V_p[\hat\theta] = \sum_s p(s)\, (\hat\theta(s) - E_p\hat\theta)(\hat\theta(s) -
    E_p\hat\theta)^T .

Example:
    >>> samples = enumerate_srs(4, 2)
    >>> len(samples), samples[0]
    (6, EnumeratedSample(indices=array([0, 1]), probability=0.16666666666666666))
    >>> y = np.array([1.0, 2.0, 3.0, 6.0])
    >>> mean, var = exact_moments(samples, lambda s: horvitz_thompson(y[s], np.full(2, 0.5), 4))
    >>> float(mean), float(var)
    (3.0, 1.1666666666666665)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "EnumeratedSample",
    "difference_estimator",
    "enumerate_design",
    "enumerate_poisson",
    "enumerate_ppswr",
    "enumerate_srs",
    "enumerate_stratified",
    "exact_moments",
    "greg",
    "greg_weights",
    "hajek",
    "hansen_hurwitz",
    "hansen_hurwitz_design_variance",
    "hansen_hurwitz_variance",
    "horvitz_thompson",
    "horvitz_thompson_design_variance",
    "horvitz_thompson_variance",
    "inclusion_probabilities_from",
    "sen_yates_grundy_variance",
    "srs_variance",
]


def _rows(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y[:, None] if y.ndim == 1 else y


def _shape_like(result: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Drop the coordinate axes again for 1-D y."""
    return np.asarray(result).reshape(()) if np.asarray(y).ndim == 1 else result


# --------------------------------------------------------------------------------------------
# point estimators


def horvitz_thompson(y: np.ndarray, pi: np.ndarray, N: int, total: bool = False) -> np.ndarray:
    """sum_s y_k / pi_k, divided by N unless ``total``."""
    z = _rows(y)
    t = np.zeros(z.shape[1])
    for k in range(z.shape[0]):
        t = t + z[k] / pi[k]
    return _shape_like(t if total else t / N, y)


def hajek(y: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """sum_s y_k / pi_k / sum_s 1 / pi_k."""
    z = _rows(y)
    num, den = np.zeros(z.shape[1]), 0.0
    for k in range(z.shape[0]):
        num, den = num + z[k] / pi[k], den + 1.0 / pi[k]
    return _shape_like(num / den, y)


def hansen_hurwitz(y: np.ndarray, p: np.ndarray, N: int, total: bool = False) -> np.ndarray:
    """(1/n) sum_i y_i / p_i over the n draws, divided by N unless ``total``."""
    z = _rows(y)
    n = z.shape[0]
    t = np.zeros(z.shape[1])
    for i in range(n):
        t = t + z[i] / p[i] / n
    return _shape_like(t if total else t / N, y)


def difference_estimator(
    y: np.ndarray,
    y_hat: np.ndarray,
    y_hat_mean: np.ndarray,
    pi: np.ndarray,
    N: int,
    total: bool = False,
) -> np.ndarray:
    """sum_U y_hat_k + sum_s (y_k - y_hat_k) / pi_k, divided by N unless ``total``."""
    t = N * np.asarray(y_hat_mean, dtype=np.float64) + horvitz_thompson(
        np.asarray(y) - np.asarray(y_hat), pi, N, total=True
    )
    return t if total else t / N


def _greg_parts(
    h: np.ndarray, pi: np.ndarray, c: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h = _rows(h)
    n, q = h.shape
    c = np.ones(n) if c is None else np.asarray(c, dtype=np.float64)
    t_hat = np.zeros((q, q))
    th_ht = np.zeros(q)
    for k in range(n):
        t_hat += np.outer(h[k], h[k]) / (pi[k] * c[k])
        th_ht += h[k] / pi[k]
    return h, c, t_hat, th_ht


def greg(
    y: np.ndarray,
    h: np.ndarray,
    h_mean: np.ndarray,
    pi: np.ndarray,
    N: int,
    c: np.ndarray | None = None,
    total: bool = False,
) -> np.ndarray:
    """Regression form: t_HT + B^T (t_h - t_h,HT), B = T^-1 sum_s h_k y_k^T / (pi_k c_k)."""
    z = _rows(y)
    h, c, t_hat, th_ht = _greg_parts(h, pi, c)
    hy = np.zeros((h.shape[1], z.shape[1]))
    for k in range(z.shape[0]):
        hy += np.outer(h[k], z[k]) / (pi[k] * c[k])
    b = np.linalg.solve(t_hat, hy)
    t = _rows(horvitz_thompson(y, pi, N, total=True)).reshape(-1) + b.T @ (
        N * np.asarray(h_mean, dtype=np.float64) - th_ht
    )
    t = t if total else t / N
    return _shape_like(t, y)


def greg_weights(
    h: np.ndarray,
    h_mean: np.ndarray,
    pi: np.ndarray,
    N: int,
    c: np.ndarray | None = None,
    total: bool = False,
) -> np.ndarray:
    """w_k = d_k g_k (/ N), g_k = 1 + (t_h - t_h,HT)^T T^-1 h_k / c_k."""
    h, c, t_hat, th_ht = _greg_parts(h, pi, c)
    gap = np.linalg.solve(t_hat, N * np.asarray(h_mean, dtype=np.float64) - th_ht)
    w = np.array([(1.0 + gap @ h[k] / c[k]) / pi[k] for k in range(h.shape[0])])
    return w if total else w / N


# --------------------------------------------------------------------------------------------
# variance estimators (double sums over the sample)


def horvitz_thompson_variance(
    y: np.ndarray, pi: np.ndarray, pi_joint: np.ndarray, N: int, total: bool = False
) -> np.ndarray:
    """sum_k sum_l (pi_kl - pi_k pi_l) / pi_kl (y_k / pi_k)(y_l / pi_l)^T (/ N^2)."""
    z = _rows(y)
    n, p = z.shape
    v = np.zeros((p, p))
    for k in range(n):
        for j in range(n):
            pkl = pi[k] if k == j else pi_joint[k, j]
            v += (pkl - pi[k] * pi[j]) / pkl * np.outer(z[k] / pi[k], z[j] / pi[j])
    return _shape_like(v if total else v / N**2, y)


def sen_yates_grundy_variance(
    y: np.ndarray, pi: np.ndarray, pi_joint: np.ndarray, N: int, total: bool = False
) -> np.ndarray:
    """-1/2 sum_k sum_l (pi_kl - pi_k pi_l) / pi_kl (y_k/pi_k - y_l/pi_l)(...)^T (/ N^2)."""
    z = _rows(y)
    n, p = z.shape
    v = np.zeros((p, p))
    for k in range(n):
        for j in range(n):
            if k == j:
                continue
            diff = z[k] / pi[k] - z[j] / pi[j]
            v -= 0.5 * (pi_joint[k, j] - pi[k] * pi[j]) / pi_joint[k, j] * np.outer(diff, diff)
    return _shape_like(v if total else v / N**2, y)


def hansen_hurwitz_variance(
    y: np.ndarray, p: np.ndarray, N: int, total: bool = False
) -> np.ndarray:
    """1 / (n (n - 1)) sum_i (y_i / p_i - t_HH)(...)^T (/ N^2)."""
    z = _rows(y)
    n = z.shape[0]
    t = _rows(hansen_hurwitz(y, p, N, total=True)).reshape(-1)
    v = np.zeros((z.shape[1], z.shape[1]))
    for i in range(n):
        v += np.outer(z[i] / p[i] - t, z[i] / p[i] - t) / (n * (n - 1))
    return _shape_like(v if total else v / N**2, y)


def srs_variance(y: np.ndarray, N: int, total: bool = False) -> np.ndarray:
    """(1 - n/N) / n * s^2 with the ddof-1 sample covariance s^2 (times N^2 for the total)."""
    z = _rows(y)
    n = z.shape[0]
    s2 = np.atleast_2d(np.cov(z, rowvar=False, ddof=1))
    v = (1 - n / N) / n * s2
    return _shape_like(v * N**2 if total else v, y)


# --------------------------------------------------------------------------------------------
# design variances (double sums over the population)


def horvitz_thompson_design_variance(
    y: np.ndarray, pi: np.ndarray, pi_joint: np.ndarray, total: bool = False
) -> np.ndarray:
    """sum_U sum_U (pi_kl - pi_k pi_l)(y_k / pi_k)(y_l / pi_l)^T (/ N^2)."""
    z = _rows(y)
    N, p = z.shape
    v = np.zeros((p, p))
    for k in range(N):
        for j in range(N):
            pkl = pi[k] if k == j else pi_joint[k, j]
            v += (pkl - pi[k] * pi[j]) * np.outer(z[k] / pi[k], z[j] / pi[j])
    return _shape_like(v if total else v / N**2, y)


def hansen_hurwitz_design_variance(
    y: np.ndarray, p: np.ndarray, n: int, total: bool = False
) -> np.ndarray:
    """1/n sum_U p_k (y_k / p_k - t)(y_k / p_k - t)^T (/ N^2)."""
    z = _rows(y)
    N = z.shape[0]
    t = z.sum(0)
    v = np.zeros((z.shape[1], z.shape[1]))
    for k in range(N):
        v += p[k] * np.outer(z[k] / p[k] - t, z[k] / p[k] - t) / n
    return _shape_like(v if total else v / N**2, y)


# --------------------------------------------------------------------------------------------
# exact enumeration of designs


class EnumeratedSample(NamedTuple):
    """One possible sample and its probability under the design."""

    indices: np.ndarray  # the units (distinct, sorted) or, with replacement, the ordered draws
    probability: float


def enumerate_srs(N: int, n: int) -> list[EnumeratedSample]:
    """All C(N, n) subsets, each with probability 1 / C(N, n)."""
    prob = 1.0 / math.comb(N, n)
    return [EnumeratedSample(np.array(s), prob) for s in itertools.combinations(range(N), n)]


def enumerate_poisson(pi: Sequence[float]) -> list[EnumeratedSample]:
    """All 2^N subsets (the empty one included), p(s) = prod_s pi_k prod_{U-s} (1 - pi_k)."""
    pi = np.asarray(pi, dtype=np.float64)
    out = []
    for mask in itertools.product((False, True), repeat=len(pi)):
        m = np.array(mask)
        out.append(EnumeratedSample(np.flatnonzero(m), float(np.prod(np.where(m, pi, 1 - pi)))))
    return out


def enumerate_stratified(
    strata: Sequence[int], sample_sizes: Sequence[int]
) -> list[EnumeratedSample]:
    """Products of SRS subsets of every stratum, p(s) = prod_h 1 / C(N_h, n_h)."""
    strata = np.asarray(strata)
    per_stratum = [
        enumerate_srs(int((strata == h).sum()), n_h) for h, n_h in enumerate(sample_sizes)
    ]
    members = [np.flatnonzero(strata == h) for h in range(len(sample_sizes))]
    out = []
    for combo in itertools.product(*per_stratum):
        idx = np.sort(np.concatenate([members[h][s.indices] for h, s in enumerate(combo)]))
        out.append(EnumeratedSample(idx, float(np.prod([s.probability for s in combo]))))
    return out


def enumerate_ppswr(p: Sequence[float], n: int) -> list[EnumeratedSample]:
    """All N^n ordered draw sequences, p(s) = prod_i p_{k_i}."""
    p = np.asarray(p, dtype=np.float64)
    return [
        EnumeratedSample(np.array(seq), float(np.prod(p[list(seq)])))
        for seq in itertools.product(range(len(p)), repeat=n)
    ]


def enumerate_design(design: object) -> list[EnumeratedSample]:
    """Enumerate a :mod:`probopt.sampling.designs` design (dispatch on its type)."""
    from probopt.sampling import designs as d

    if isinstance(design, d.SimpleRandomSampling):
        return enumerate_srs(design.population_size, design.sample_size)
    if isinstance(design, d.PoissonSampling):
        return enumerate_poisson(design.inclusion_probabilities().numpy())
    if isinstance(design, d.StratifiedSampling):
        return enumerate_stratified(design.strata.numpy(), design.sample_sizes)
    if isinstance(design, d.PPSWithReplacement):
        return enumerate_ppswr(design.draw_probabilities.numpy(), design.num_draws)
    raise TypeError(f"cannot enumerate {type(design).__name__}")


def inclusion_probabilities_from(
    samples: list[EnumeratedSample], N: int
) -> tuple[np.ndarray, np.ndarray]:
    """pi_k and pi_kl (diagonal pi_k) of the distinct units, summed over the enumeration."""
    pi, pij = np.zeros(N), np.zeros((N, N))
    for s in samples:
        units = np.unique(s.indices)
        pi[units] += s.probability
        pij[np.ix_(units, units)] += s.probability
    return pi, pij


def exact_moments(
    samples: list[EnumeratedSample], estimator: Callable[[np.ndarray], object]
) -> tuple[np.ndarray, np.ndarray]:
    """Design expectation and covariance of ``estimator(indices)`` over the enumeration."""
    values = np.array([np.asarray(estimator(s.indices), dtype=np.float64) for s in samples])
    probs = np.array([s.probability for s in samples])
    mean = np.tensordot(probs, values, axes=1)
    centred = values - mean
    flat = centred.reshape(len(samples), -1)
    cov = (flat.T * probs) @ flat
    return mean, (cov.reshape(()) if values.ndim == 1 else cov)
