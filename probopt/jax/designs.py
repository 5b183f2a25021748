r"""Finite-population sampling designs as pure JAX functions of an explicit PRNG key.

The JAX twin of :mod:`probopt.sampling.designs` (same designs, same argument names, same
inclusion probabilities; the draws come from ``jax.random``, so they differ from torch's for a
given seed). Each sampler is a function ``(key, ...) -> sample`` that works under ``jit`` and
``vmap``: sizes that fix array shapes (``population_size``, ``sample_size``, ``num_draws``,
``strata`` and ``sample_sizes``) must be concrete, everything else may be traced.

=======================================  =========================================  ============
sampler                                  minibatch                                  estimator
=======================================  =========================================  ============
:func:`simple_random_sample`             n distinct units, all subsets equally      HT = mean
                                         likely (SRSWOR)
:func:`poisson_sample`                   unit k independently with prob. π_k,       HT / Hájek
                                         returned as a mask over U (fixed shape)    with ``mask``
:func:`pps_with_replacement_sample`      n independent draws, p_k ∝ size x_k        Hansen–
                                                                                    Hurwitz
:func:`stratified_sample`                SRSWOR of n_h units in each stratum h      HT
=======================================  =========================================  ============

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992, chapters 2–3.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from probopt.jax.estimators import horvitz_thompson
    >>> y = jnp.arange(10.0)
    >>> s = simple_random_sample(jax.random.PRNGKey(0), 10, 4)
    >>> s.indices.shape, s.inclusion_probabilities[0]
    ((4,), Array(0.4, dtype=float32))
    >>> est = horvitz_thompson(y[s.indices], s.inclusion_probabilities, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from probopt.sampling.designs import _check_count, _proportional_allocation

__all__ = [
    "PoissonSample",
    "Sample",
    "WithReplacementSample",
    "poisson_sample",
    "pps_with_replacement_inclusion_probabilities",
    "pps_with_replacement_sample",
    "simple_random_sample",
    "stratified_allocation",
    "stratified_inclusion_probabilities",
    "stratified_sample",
]


class Sample(NamedTuple):
    """One sample of a fixed-size without-replacement design."""

    indices: jax.Array
    """(n,) int32: the units of s."""
    inclusion_probabilities: jax.Array
    """(n,) float: π_k of those units."""


class PoissonSample(NamedTuple):
    """One Poisson sample, as a mask over the whole population (a fixed shape)."""

    mask: jax.Array
    """(N,) bool: unit k is in s."""
    inclusion_probabilities: jax.Array
    """(N,) float: π_k of every unit."""


class WithReplacementSample(NamedTuple):
    """One sample of a with-replacement design: n ordered draws, repeats allowed."""

    indices: jax.Array
    """(n,) int32: the unit of each draw."""
    draw_probabilities: jax.Array
    """(n,) float: p_k of the unit of each draw."""


def simple_random_sample(key: jax.Array, population_size: int, sample_size: int) -> Sample:
    r"""Simple random sampling without replacement: :math:`\pi_k = n/N`.

    Args:
        key: a PRNG key.
        population_size: N.
        sample_size: n, ``1 <= n <= N``.

    Example:
        >>> s = simple_random_sample(jax.random.PRNGKey(1), 5, 5)
        >>> sorted(s.indices.tolist())
        [0, 1, 2, 3, 4]
    """
    _check_count("population_size", population_size, 1)
    _check_count("sample_size", sample_size, 1)
    if sample_size > population_size:
        raise ValueError(
            f"Invalid sample_size: {sample_size} is larger than the population "
            f"({population_size} units); sampling is without replacement"
        )
    idx = jax.random.permutation(key, population_size)[:sample_size]
    pi = jnp.full((sample_size,), sample_size / population_size, jnp.result_type(float))
    return Sample(idx.astype(jnp.int32), pi)


def poisson_sample(key: jax.Array, inclusion_probabilities: jax.Array) -> PoissonSample:
    r"""Poisson sampling: unit k enters independently with probability :math:`\pi_k`.

    The sample size is random, so the sample is a mask over U; pass it as ``mask`` to the
    estimators of :mod:`probopt.jax.estimators` together with the values of all N units.

    Args:
        key: a PRNG key.
        inclusion_probabilities: :math:`\pi_k \in (0, 1]`, shape (N,) (not checked: it may be
            traced).

    Example:
        >>> s = poisson_sample(jax.random.PRNGKey(0), jnp.array([1.0, 1.0, 1e-9]))
        >>> s.mask.tolist()
        [True, True, False]
    """
    pi = jnp.asarray(inclusion_probabilities)
    if pi.ndim != 1 or pi.size == 0:
        raise ValueError(
            f"Invalid inclusion_probabilities: expected a non-empty 1-D vector, got shape "
            f"{tuple(pi.shape)}"
        )
    u = jax.random.uniform(key, pi.shape, dtype=jnp.result_type(pi, float))
    return PoissonSample(u < pi, pi)


def pps_with_replacement_inclusion_probabilities(
    draw_probabilities: jax.Array, num_draws: int
) -> jax.Array:
    r""":math:`\pi_k = 1 - (1 - p_k)^n` of n independent draws with probabilities p_k."""
    p = jnp.asarray(draw_probabilities)
    return -jnp.expm1(num_draws * jnp.log1p(-p))


def pps_with_replacement_sample(
    key: jax.Array, sizes: jax.Array, num_draws: int
) -> WithReplacementSample:
    r"""Probability-proportional-to-size sampling with replacement (importance sampling):
    ``num_draws`` independent draws, each picking unit k with :math:`p_k = x_k / \sum_U x_l`.

    Args:
        key: a PRNG key.
        sizes: positive sizes :math:`x_k`, shape (N,).
        num_draws: n.

    Example:
        >>> s = pps_with_replacement_sample(jax.random.PRNGKey(0), jnp.array([0.0, 1.0]), 3)
        >>> s.indices.tolist(), s.draw_probabilities.tolist()
        ([1, 1, 1], [1.0, 1.0, 1.0])
    """
    _check_count("num_draws", num_draws, 1)
    x = jnp.asarray(sizes)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"Invalid sizes: expected a non-empty 1-D vector, got {tuple(x.shape)}")
    p = x / x.sum()
    idx = jax.random.choice(key, x.shape[0], (num_draws,), replace=True, p=p)
    return WithReplacementSample(idx.astype(jnp.int32), p[idx])


def stratified_allocation(
    strata: Sequence[int] | np.ndarray,
    sample_size: int | None = None,
    *,
    sample_sizes: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Concrete labels (N,) and the allocation n_h (proportional for ``sample_size``), checked
    as :class:`probopt.sampling.StratifiedSampling` checks them."""
    labels = np.asarray(strata)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(
            f"Invalid strata: expected a non-empty 1-D vector of labels, got shape "
            f"{tuple(labels.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Invalid strata: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"Invalid strata: labels must be >= 0, got {int(labels.min())}")
    if (sample_size is None) == (sample_sizes is None):
        raise ValueError(
            "give exactly one of sample_size (proportional allocation) or sample_sizes"
        )
    num = len(sample_sizes) if sample_sizes is not None else int(labels.max()) + 1
    if int(labels.max()) >= num:
        raise ValueError(
            f"Invalid strata: label {int(labels.max())} has no entry in sample_sizes (length {num})"
        )
    counts = np.bincount(labels, minlength=num).tolist()
    for h, size in enumerate(counts):
        if size == 0:
            raise ValueError(f"Invalid strata: stratum {h} is empty (no unit has label {h})")
    if sample_sizes is None:
        _check_count("sample_size", sample_size, 1)
        sample_sizes = _proportional_allocation(counts, sample_size)
    sizes = [int(n) for n in sample_sizes]
    for h, n_h in enumerate(sizes):
        if not 1 <= n_h <= counts[h]:
            raise ValueError(
                f"Invalid sample size of stratum {h}: {n_h} (must be in [1, {counts[h]}])"
            )
    return labels, sizes


def stratified_inclusion_probabilities(
    strata: Sequence[int] | np.ndarray, sample_sizes: Sequence[int]
) -> jax.Array:
    r""":math:`\pi_k = n_h / N_h` for every unit (shape (N,))."""
    labels, sizes = stratified_allocation(strata, sample_sizes=sample_sizes)
    counts = np.bincount(labels, minlength=len(sizes))
    return jnp.asarray(np.asarray(sizes, np.float64)[labels] / counts[labels])


def stratified_sample(
    key: jax.Array,
    strata: Sequence[int] | np.ndarray,
    sample_size: int | None = None,
    *,
    sample_sizes: Sequence[int] | None = None,
) -> Sample:
    r"""Stratified simple random sampling: SRSWOR of :math:`n_h` units in each stratum,
    :math:`\pi_k = n_h/N_h`.

    Args:
        key: a PRNG key.
        strata: concrete integer labels ``0 .. H-1`` of every unit, shape (N,).
        sample_size: total n with proportional allocation (largest remainders), or
        sample_sizes: the allocation :math:`n_h`.

    Example:
        >>> s = stratified_sample(jax.random.PRNGKey(0), [0, 0, 0, 0, 1, 1], 3)
        >>> s.indices.shape, [round(float(p), 4) for p in s.inclusion_probabilities]
        ((3,), [0.5, 0.5, 0.5])
    """
    labels, sizes = stratified_allocation(strata, sample_size, sample_sizes=sample_sizes)
    counts = np.bincount(labels, minlength=len(sizes))
    keys = jax.random.split(key, len(sizes))
    parts, pis = [], []
    for h, n_h in enumerate(sizes):
        members = jnp.asarray(np.flatnonzero(labels == h), jnp.int32)
        parts.append(jax.random.permutation(keys[h], members)[:n_h])
        pis.append(jnp.full((n_h,), n_h / counts[h], jnp.result_type(float)))
    return Sample(jnp.concatenate(parts), jnp.concatenate(pis))
