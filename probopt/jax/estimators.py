r"""Design-based estimators of the full-data gradient, as pure JAX functions.

The JAX twin of :mod:`probopt.sampling.estimators` (same names, same arguments, same numbers;
the notation is explained there): the training set is a finite population of N units, unit k
carries the per-example gradient :math:`y_k`, the minibatch s is drawn with inclusion
probabilities :math:`\pi_k` (:mod:`probopt.jax.designs`) and :math:`d_k = 1/\pi_k`.

=====================================  ==============================================  ==========
estimator                              mean form                                       unbiased
=====================================  ==============================================  ==========
:func:`horvitz_thompson`               :math:`N^{-1}\sum_s y_k/\pi_k`                   exactly
:func:`hajek`                          :math:`\sum_s d_k y_k / \sum_s d_k`              O(1/n)
:func:`hansen_hurwitz` (with repl.)    :math:`(nN)^{-1}\sum_{i=1}^n y_{k_i}/p_{k_i}`    exactly
:func:`difference_estimator`           :math:`\bar{\hat y}_U + N^{-1}\sum_s (y_k-\hat    exactly
                                       y_k)/\pi_k`
:func:`greg` / :func:`greg_weights`    :math:`\sum_s w_k y_k`, calibrated on h          O(1/n)
=====================================  ==============================================  ==========

Every estimator is linear in y with weights that do not depend on y, so each is also a set of
*loss weights* (``*_weights``): ``jax.grad`` of :math:`\sum_s w_k \ell_k` is the estimate.

**Fixed shapes under jit.** A random-size design (Poisson sampling) gives samples of varying
size, which ``jit`` cannot trace. Every estimator of the without-replacement family therefore
takes an optional ``mask`` (n,) of booleans: pass all N units (or a padded sample) with
``mask`` marking the sampled ones, and the masked-out units get weight exactly 0
(:func:`probopt.jax.designs.poisson_sample` returns such a mask). Everything else is traced.

Shapes are checked when the function is traced; values are not (a check would need the host).
A singular GREG system gives non-finite weights rather than an error (torch raises on CPU).

References:
    Horvitz & Thompson, `A generalization of sampling without replacement from a finite universe
    <https://doi.org/10.1080/01621459.1952.10483446>`_, JASA, 1952.
    Hansen & Hurwitz, `On the theory of sampling from finite populations
    <https://doi.org/10.1214/aoms/1177731356>`_, Ann. Math. Statist., 1943.
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992.
    Deville & Särndal, `Calibration estimators in survey sampling
    <https://doi.org/10.1080/01621459.1992.10475217>`_, JASA, 1992.

Example:
    >>> import jax.numpy as jnp
    >>> y = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> horvitz_thompson(y, jnp.array([0.5, 0.5]), 4)
    Array([2., 3.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from probopt.sampling.designs import _check_count

__all__ = [
    "difference_estimator",
    "greg",
    "greg_coefficients",
    "greg_weights",
    "hajek",
    "hansen_hurwitz",
    "hansen_hurwitz_weights",
    "horvitz_thompson",
    "horvitz_thompson_weights",
]

Array = jax.Array


# --------------------------------------------------------------------------------------------
# shape checks


def _sample_values(name: str, y: Any) -> Array:
    y = jnp.asarray(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"Invalid {name}: expected shape (n,) or (n, p), got {tuple(y.shape)}")
    return y


def _unit_vector(name: str, v: Any, n: int) -> Array:
    v = jnp.asarray(v)
    if v.shape != (n,):
        raise ValueError(
            f"Invalid {name}: expected shape ({n},) (one value per sampled unit), "
            f"got {tuple(v.shape)}"
        )
    return v


def _mask(mask: Any, n: int) -> Array | None:
    if mask is None:
        return None
    m = _unit_vector("mask", mask, n)
    if m.dtype != jnp.bool_:
        raise ValueError(f"Invalid mask: expected booleans, got dtype {m.dtype}")
    return m


def _masked(w: Array, mask: Array | None) -> Array:
    return w if mask is None else jnp.where(mask, w, jnp.zeros_like(w))


def _weighted_sum(w: Array, y: Array) -> Array:
    dtype = jnp.result_type(w, y)
    return w.astype(dtype) @ y.astype(dtype)


def _aux_matrix(h: Any, n: int) -> Array:
    h = jnp.asarray(h)
    h = h[:, None] if h.ndim == 1 else h
    if h.ndim != 2 or h.shape[0] != n:
        raise ValueError(
            f"Invalid h: expected shape ({n}, q) (auxiliary values of the sampled "
            f"units), got {tuple(h.shape)}"
        )
    return h


# --------------------------------------------------------------------------------------------
# loss weights


def horvitz_thompson_weights(
    pi: Array, population_size: int, *, total: bool = False, mask: Array | None = None
) -> Array:
    r"""Horvitz–Thompson loss weights :math:`w_k = d_k / N` (:math:`d_k` with ``total``).

    Args:
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: weights for the total instead of the mean.
        mask: which of the n units are in the sample (the others get weight 0).

    Example:
        >>> horvitz_thompson_weights(jnp.array([0.5, 0.25]), 4)
        Array([0.5, 1. ], dtype=float32)
    """
    _check_count("population_size", population_size, 1)
    pi = jnp.asarray(pi)
    if pi.ndim != 1:
        raise ValueError(f"Invalid pi: expected shape (n,), got {tuple(pi.shape)}")
    d = _masked(1.0 / pi, _mask(mask, pi.shape[0]))
    return d if total else d / population_size


def hansen_hurwitz_weights(p: Array, population_size: int, *, total: bool = False) -> Array:
    r"""Hansen–Hurwitz loss weights :math:`w_i = 1/(n N p_{k_i})`, one per draw.

    Args:
        p: draw probabilities of the units of the n draws, shape (n,).
        population_size: N.
        total: weights for the total instead of the mean.

    Example:
        >>> hansen_hurwitz_weights(jnp.array([0.25, 0.25]), 4)
        Array([0.5, 0.5], dtype=float32)
    """
    _check_count("population_size", population_size, 1)
    p = jnp.asarray(p)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"Invalid p: expected shape (n,) with n >= 1, got {tuple(p.shape)}")
    w = 1.0 / (p.shape[0] * p)
    return w if total else w / population_size


# --------------------------------------------------------------------------------------------
# point estimators


def horvitz_thompson(
    y: Array,
    pi: Array,
    population_size: int,
    *,
    total: bool = False,
    mask: Array | None = None,
) -> Array:
    r"""Horvitz–Thompson estimator :math:`\hat{\bar y}_{HT} = N^{-1}\sum_{k \in s} y_k/\pi_k`
    (the total without :math:`N^{-1}` with ``total``); design-unbiased whenever every
    :math:`\pi_k > 0`.

    Args:
        y: sample values, shape (n,) or (n, p).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: estimate the total instead of the mean.
        mask: which of the n units are in the sample.

    Returns:
        Shape () or (p,).

    Example:
        >>> horvitz_thompson(jnp.array([1.0, 3.0, 9.0]), jnp.array([0.5, 0.5, 0.5]), 4,
        ...                  mask=jnp.array([True, True, False]))
        Array(2., dtype=float32)
    """
    y = _sample_values("y", y)
    pi = _unit_vector("pi", pi, y.shape[0])
    w = horvitz_thompson_weights(pi, population_size, total=total, mask=mask)
    return _weighted_sum(w, y)


def hajek(y: Array, pi: Array, *, mask: Array | None = None) -> Array:
    r"""Hájek (ratio) estimator :math:`\sum_s d_k y_k / \sum_s d_k`; an empty sample gives 0.

    Args:
        y: sample values, shape (n,) or (n, p).
        pi: inclusion probabilities of the sampled units, shape (n,).
        mask: which of the n units are in the sample.

    Example:
        >>> round(float(hajek(jnp.array([1.0, 3.0]), jnp.array([0.5, 0.25]))), 4)
        2.3333
    """
    y = _sample_values("y", y)
    d = _masked(1.0 / _unit_vector("pi", pi, y.shape[0]), _mask(mask, y.shape[0]))
    s = d.sum()
    w = jnp.where(s > 0, d / jnp.where(s > 0, s, 1.0), jnp.zeros_like(d))
    return _weighted_sum(w, y)


def hansen_hurwitz(y: Array, p: Array, population_size: int, *, total: bool = False) -> Array:
    r"""Hansen–Hurwitz estimator for n draws with replacement,
    :math:`(nN)^{-1}\sum_{i=1}^n y_{k_i}/p_{k_i}`.

    Args:
        y: values of the n draws in draw order, shape (n,) or (n, p).
        p: draw probabilities of the units of the draws, shape (n,).
        population_size: N.
        total: estimate the total instead of the mean.

    Example:
        >>> hansen_hurwitz(jnp.array([6.0, 2.0, 6.0]), jnp.array([0.75, 0.25, 0.75]), 2)
        Array(4., dtype=float32)
    """
    y = _sample_values("y", y)
    p = _unit_vector("p", p, y.shape[0])
    return _weighted_sum(hansen_hurwitz_weights(p, population_size, total=total), y)


def difference_estimator(
    y: Array,
    y_hat: Array,
    y_hat_population_mean: Array,
    pi: Array,
    population_size: int,
    *,
    total: bool = False,
    mask: Array | None = None,
) -> Array:
    r"""Difference estimator :math:`\bar{\hat y}_U + N^{-1}\sum_{k \in s} (y_k - \hat y_k)/\pi_k`;
    exactly unbiased for any predictions :math:`\hat y_k` that do not depend on s.

    Args:
        y: sample values, shape (n,) or (n, p).
        y_hat: predictions for the sampled units, same shape as ``y``.
        y_hat_population_mean: :math:`\bar{\hat y}_U`, shape () or (p,).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: estimate the total instead of the mean.
        mask: which of the n units are in the sample.

    Example:
        >>> y, y_hat = jnp.array([1.0, 3.0]), jnp.array([1.5, 2.5])
        >>> difference_estimator(y, y_hat, jnp.array(2.0), jnp.array([0.5, 0.5]), 4)
        Array(2., dtype=float32)
    """
    y = _sample_values("y", y)
    y_hat = jnp.asarray(y_hat)
    if y_hat.shape != y.shape:
        raise ValueError(
            f"Invalid y_hat: expected the shape of y {tuple(y.shape)}, got {tuple(y_hat.shape)}"
        )
    correction = horvitz_thompson(y - y_hat, pi, population_size, total=total, mask=mask)
    known = jnp.asarray(y_hat_population_mean).astype(correction.dtype)
    if known.shape != correction.shape:
        raise ValueError(
            f"Invalid y_hat_population_mean: expected shape {tuple(correction.shape)}, got "
            f"{tuple(known.shape)}"
        )
    return (known * population_size if total else known) + correction


def _greg_system(
    h: Array, pi: Array, population_size: int, c: Array | None, ridge: float, mask: Array | None
) -> tuple[Array, Array, Array, Array]:
    _check_count("population_size", population_size, 1)
    n, q = h.shape
    if not ridge >= 0.0:
        raise ValueError(f"Invalid ridge: {ridge!r} (must be >= 0)")
    if q > n and not ridge:
        raise ValueError(
            f"GREG: the weighted moment matrix of h is singular (q = {q} auxiliary variables, "
            f"n = {n} sampled units); use ridge > 0, fewer or non-collinear auxiliary variables"
        )
    d = _masked(1.0 / _unit_vector("pi", pi, n).astype(h.dtype), _mask(mask, n))
    c = jnp.ones_like(d) if c is None else _unit_vector("c", c, n).astype(h.dtype)
    m = (h.T * (d / c / population_size)) @ h
    if ridge:
        m = m + ridge * jnp.eye(q, dtype=h.dtype)
    return d, c, m, (d @ h) / population_size


def greg_weights(
    h: Array,
    h_population_mean: Array,
    pi: Array,
    population_size: int,
    *,
    c: Array | None = None,
    ridge: float = 0.0,
    total: bool = False,
    mask: Array | None = None,
) -> Array:
    r"""Generalized-regression (GREG) weights: linear calibration on auxiliary variables h.

    .. math::
        M = \frac{1}{N}\sum_{k \in s} \frac{d_k h_k h_k^T}{c_k} + \lambda I, \qquad
        w_k = \frac{d_k}{N}\Big(1 + \Big(\bar h_U - \frac{1}{N}\sum_{k\in s} d_k h_k\Big)^T
        M^{-1} \frac{h_k}{c_k}\Big)

    (:math:`w_k = d_k g_k` with ``total``); with :math:`\lambda = 0` they satisfy
    :math:`\sum_s w_k h_k = \bar h_U`.

    Args:
        h: auxiliary values of the sampled units, shape (n, q) (or (n,) for q = 1).
        h_population_mean: :math:`\bar h_U`, shape (q,).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        c: heteroscedasticity constants of the sampled units, shape (n,); ``None`` means 1.
        ridge: λ ≥ 0 added to M.
        total: weights for the total instead of the mean.
        mask: which of the n units are in the sample.

    Raises:
        ValueError: when q > n with ``ridge=0`` (singular whatever the values).

    Example:
        >>> h = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
        >>> w = greg_weights(h, jnp.array([1.0, 2.0]), jnp.full(3, 0.5), 6)
        >>> [round(float(v), 4) for v in w]
        [0.1429, 0.2857, 0.5714]
        >>> [round(float(v), 4) for v in w @ h]          # the calibration equations
        [1.0, 2.0]
    """
    pi = jnp.asarray(pi)
    hh = _aux_matrix(h, pi.shape[0] if pi.ndim == 1 else -1)
    dtype = jnp.result_type(hh, pi)
    hh = hh.astype(dtype)
    d, c, m, mean_ht = _greg_system(hh, pi, population_size, c, ridge, mask)
    target = jnp.asarray(h_population_mean, dtype).reshape(-1)
    if target.shape != (hh.shape[1],):
        raise ValueError(
            f"Invalid h_population_mean: expected shape ({hh.shape[1]},), got "
            f"{tuple(jnp.shape(h_population_mean))}"
        )
    lam = jnp.linalg.solve(m, target - mean_ht)
    w = d * (1.0 + (hh @ lam) / c)
    return w if total else w / population_size


def greg_coefficients(
    y: Array,
    h: Array,
    pi: Array,
    population_size: int,
    *,
    c: Array | None = None,
    ridge: float = 0.0,
    mask: Array | None = None,
) -> Array:
    r"""Design-weighted regression coefficients :math:`\hat B = M^{-1} N^{-1}\sum_s d_k h_k
    y_k^T / c_k`, shape (q, p) (or (q,) for y of shape (n,)).

    Example:
        >>> h = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
        >>> b = greg_coefficients(1 + 2 * h[:, 1], h, jnp.full(3, 0.5), 6)
        >>> [round(float(v), 4) for v in b]
        [1.0, 2.0]
    """
    y = _sample_values("y", y)
    hh = _aux_matrix(h, y.shape[0])
    dtype = jnp.result_type(hh, y, jnp.asarray(pi))
    hh, yy = hh.astype(dtype), y.astype(dtype)
    d, c, m, _ = _greg_system(hh, jnp.asarray(pi), population_size, c, ridge, mask)
    rhs = (hh.T * (d / c / population_size)) @ yy
    return jnp.linalg.solve(m, rhs)


def greg(
    y: Array,
    h: Array,
    h_population_mean: Array,
    pi: Array,
    population_size: int,
    *,
    c: Array | None = None,
    ridge: float = 0.0,
    total: bool = False,
    mask: Array | None = None,
) -> Array:
    r"""Generalized-regression (GREG) estimator :math:`\sum_{k \in s} w_k y_k
    = \hat{\bar y}_{HT} + \hat B^T(\bar h_U - \hat{\bar h}_{HT})` with :func:`greg_weights`.

    Example:
        >>> h = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
        >>> y = 1 + 2 * h[:, 1]                        # exactly linear in h: no error left
        >>> round(float(greg(y, h, jnp.array([1.0, 2.0]), jnp.full(3, 0.5), 6)), 4)
        5.0
    """
    y = _sample_values("y", y)
    w = greg_weights(
        h, h_population_mean, pi, population_size, c=c, ridge=ridge, total=total, mask=mask
    )
    return _weighted_sum(w, y)
