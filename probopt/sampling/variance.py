r"""Variances of the survey estimators: sample-based estimators and exact design variances.

Two families, named in the survey vocabulary:

* ``*_variance(y, ...)`` *estimate* the design variance of an estimator from the sample alone
  (what a training loop can log at every step);
* ``*_design_variance(y_population, ...)`` compute the exact (true) design variance from the
  values of the whole population, :math:`V_p(\hat{\bar y}) = E_p[(\hat{\bar y} - \bar y_U)
  (\hat{\bar y} - \bar y_U)^T]`, which the tests compare with exact enumeration.

For vector y (one row per unit, p coordinates) every function returns the p×p covariance
matrix, or its trace :math:`E\lVert \hat{\bar y} - \bar y_U \rVert^2` with ``trace=True`` (this
path never forms the p×p matrix, so it scales to gradients of any size). For y of shape (n,)
the result is a scalar. Variances refer to the mean estimator; ``total=True`` multiplies by
:math:`N^2` (the variance of the total).

Notation: :math:`\Delta_{kl} = \pi_{kl} - \pi_k \pi_l`, :math:`\check y_k = y_k / \pi_k`,
:math:`\check\Delta_{kl} = \Delta_{kl} / \pi_{kl}`. ``pi_joint`` is the (n, n) matrix of joint
inclusion probabilities of the sampled units with :math:`\pi_{kk} = \pi_k` on the diagonal
(:meth:`probopt.sampling.designs.SamplingDesign.joint_inclusion_probabilities` with the sample's
indices); for with-replacement samples pass the *distinct* units.

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992.
    Horvitz & Thompson, JASA 47, 1952. Sen, J. Indian Soc. Agric. Statist. 5, 1953.
    Yates & Grundy, JRSS B 15, 1953. Hansen & Hurwitz, Ann. Math. Statist. 14, 1943.
    Särndal, Swensson & Wretman, `The weighted residual technique for estimating the variance
    of the general regression estimator <https://doi.org/10.1093/biomet/76.3.527>`_,
    Biometrika 76, 1989.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from probopt.sampling.designs import PPSWithReplacement, SamplingDesign, _check_count
from probopt.sampling.estimators import (
    _check_population_size,
    _sample_values,
    _unit_vector,
    greg_coefficients,
    greg_weights,
    hajek,
)

__all__ = [
    "design_variance",
    "difference_variance",
    "greg_design_variance",
    "greg_variance",
    "hajek_variance",
    "hansen_hurwitz_design_variance",
    "hansen_hurwitz_variance",
    "horvitz_thompson_design_variance",
    "horvitz_thompson_variance",
    "sen_yates_grundy_design_variance",
    "sen_yates_grundy_variance",
    "srs_design_variance",
    "srs_variance",
]


# --------------------------------------------------------------------------------------------
# helpers


def _rows(y: Tensor, *others: Tensor) -> tuple[Tensor, bool]:
    """y as an (n, p) matrix in the promoted dtype of y and ``others``; whether y was 1-D."""
    y = _sample_values("y", torch.as_tensor(y))
    dtype = y.dtype
    for o in others:
        dtype = torch.promote_types(dtype, torch.as_tensor(o).dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return (y.unsqueeze(-1) if y.dim() == 1 else y).to(dtype), y.dim() == 1


def _quadratic(z: Tensor, a: Tensor, scale: float, scalar: bool, trace: bool) -> Tensor:
    r""":math:`\text{scale}\cdot z^T A z` (p×p), its trace, or the scalar for 1-D y."""
    a = a.to(z)
    if trace or scalar:
        return ((a @ z) * z).sum() * scale
    return (z.T @ a @ z) * scale


def _gram(z: Tensor, scale: float, scalar: bool, trace: bool) -> Tensor:
    r""":math:`\text{scale}\cdot z^T z` (p×p), its trace, or the scalar for 1-D y."""
    if trace or scalar:
        return (z * z).sum() * scale
    return z.T @ z * scale


def _scale(population_size: int, total: bool) -> float:
    return 1.0 if total else 1.0 / population_size**2


def _joint(pi_joint: Tensor, n: int) -> Tensor:
    pi_joint = torch.as_tensor(pi_joint)
    if pi_joint.shape != (n, n):
        raise ValueError(
            f"Invalid pi_joint: expected shape ({n}, {n}) (joint inclusion "
            f"probabilities of the sampled units), got {tuple(pi_joint.shape)}"
        )
    if n and not bool((pi_joint > 0).all()):
        raise ValueError(
            "Invalid pi_joint: the variance estimator needs every joint inclusion "
            "probability of the sample to be > 0"
        )
    return pi_joint


def _check_residual_kind(residuals: str) -> None:
    if residuals not in ("g", "e"):
        raise ValueError(
            f"Invalid residuals: {residuals!r} (choose 'g' for g-weighted or 'e' "
            f"for plain residuals)"
        )


# --------------------------------------------------------------------------------------------
# sample-based variance estimators


def srs_variance(
    y: Tensor, population_size: int, *, total: bool = False, trace: bool = False
) -> Tensor:
    r"""Variance estimator of the minibatch mean under SRSWOR: the closed form.

    .. math::
        \hat V(\hat{\bar y}) = \frac{1 - f}{n}\, s^2, \qquad
        s^2 = \frac{1}{n - 1}\sum_{k \in s} (y_k - \bar y_s)(y_k - \bar y_s)^T, \qquad
        f = \frac{n}{N}.

    Unbiased for :func:`srs_design_variance`; :math:`(1-f)` is the without-replacement gain
    over i.i.d. sampling. It equals :func:`horvitz_thompson_variance` under SRSWOR.

    Args:
        y: sample values, shape (n,) or (n, p), n >= 2.
        population_size: N.
        total: the variance of the total estimator :math:`N \bar y_s` instead.
        trace: return :math:`\operatorname{tr} \hat V` only.

    References:
        Särndal, Swensson & Wretman 1992, section 3.3; Cochran, *Sampling Techniques*, 1977.

    Example:
        >>> srs_variance(torch.tensor([1.0, 2.0, 3.0, 6.0]), 8)
        tensor(0.5833)
    """
    _check_population_size(population_size)
    z, scalar = _rows(y)
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"srs_variance needs at least 2 sampled units, got n = {n}")
    centred = z - z.mean(0)
    scale = (1 - n / population_size) / (n * (n - 1)) * (population_size**2 if total else 1)
    return _gram(centred, scale, scalar, trace)


def horvitz_thompson_variance(
    y: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    population_size: int,
    *,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""The Horvitz–Thompson variance estimator (of the HT mean or total).

    .. math::
        \hat V(\hat t_{HT}) = \sum_{k \in s}\sum_{l \in s} \frac{\Delta_{kl}}{\pi_{kl}}
        \frac{y_k}{\pi_k}\frac{y_l^T}{\pi_l}, \qquad
        \hat V(\hat{\bar y}_{HT}) = \hat V(\hat t_{HT}) / N^2 .

    Unbiased for :func:`horvitz_thompson_design_variance` whenever every :math:`\pi_{kl} > 0`;
    for any design (fixed or random size). Can be negative (not positive semi-definite).

    Args:
        y: sample values, shape (n,) or (n, p).
        pi: inclusion probabilities of the sampled units, shape (n,).
        pi_joint: their joint inclusion probabilities, shape (n, n).
        population_size: N.
        total: the variance of the total estimator.
        trace: return the trace only.

    References:
        Horvitz & Thompson 1952; Särndal, Swensson & Wretman 1992, result 2.8.1.

    Example:
        >>> from probopt.sampling.designs import SimpleRandomSampling
        >>> design, idx = SimpleRandomSampling(8, 4), torch.tensor([0, 1, 2, 3])
        >>> y = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
        >>> horvitz_thompson_variance(y, design.inclusion_probabilities()[idx],
        ...                           design.joint_inclusion_probabilities(idx), 8)
        tensor(0.5833, dtype=torch.float64)
    """
    _check_population_size(population_size)
    z, scalar = _rows(y, pi)
    pi = _unit_vector("pi", pi, z.shape[0]).to(z)
    pij = _joint(pi_joint, z.shape[0]).to(z)
    check = 1 - pi[:, None] * pi[None, :] / pij  # Delta_kl / pi_kl
    return _quadratic(z / pi[:, None], check, _scale(population_size, total), scalar, trace)


def sen_yates_grundy_variance(
    y: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    population_size: int,
    *,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""Sen–Yates–Grundy variance estimator of the HT estimator (fixed-size designs).

    .. math::
        \hat V_{SYG}(\hat t_{HT}) = -\frac{1}{2}\sum_{k \in s}\sum_{l \in s}
        \frac{\Delta_{kl}}{\pi_{kl}}
        \Big(\frac{y_k}{\pi_k} - \frac{y_l}{\pi_l}\Big)\Big(\frac{y_k}{\pi_k} -
        \frac{y_l}{\pi_l}\Big)^T .

    Unbiased for the design variance when the sample size is fixed; non-negative definite when
    :math:`\pi_k\pi_l - \pi_{kl} \ge 0` for all pairs (the SYG condition, which SRSWOR and
    stratified SRSWOR satisfy). Under a random-size design (Poisson) it is biased: use
    :func:`horvitz_thompson_variance`.

    Args:
        y, pi, pi_joint, population_size, total, trace: as in
            :func:`horvitz_thompson_variance`.

    References:
        Sen 1953; Yates & Grundy 1953; Särndal, Swensson & Wretman 1992, result 2.8.2.

    Example:
        >>> from probopt.sampling.designs import SimpleRandomSampling
        >>> design, idx = SimpleRandomSampling(8, 4), torch.tensor([0, 1, 2, 3])
        >>> y = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
        >>> sen_yates_grundy_variance(y, design.inclusion_probabilities()[idx],
        ...                           design.joint_inclusion_probabilities(idx), 8)
        tensor(0.5833, dtype=torch.float64)
    """
    _check_population_size(population_size)
    z, scalar = _rows(y, pi)
    pi = _unit_vector("pi", pi, z.shape[0]).to(z)
    pij = _joint(pi_joint, z.shape[0]).to(z)
    check = 1 - pi[:, None] * pi[None, :] / pij
    # -1/2 sum_kl A_kl (z_k - z_l)(z_k - z_l)^T = z^T (A - diag(A 1)) z for symmetric A
    a = check - torch.diag(check.sum(1))
    return _quadratic(z / pi[:, None], a, _scale(population_size, total), scalar, trace)


def hansen_hurwitz_variance(
    y: Tensor, p: Tensor, population_size: int, *, total: bool = False, trace: bool = False
) -> Tensor:
    r"""Unbiased variance estimator of the Hansen–Hurwitz estimator (n draws with replacement).

    .. math::
        \hat V(\hat t_{HH}) = \frac{1}{n (n - 1)} \sum_{i=1}^{n}
        \Big(\frac{y_{k_i}}{p_{k_i}} - \hat t_{HH}\Big)
        \Big(\frac{y_{k_i}}{p_{k_i}} - \hat t_{HH}\Big)^T .

    Args:
        y: values of the n draws (repeats included), shape (n,) or (n, p), n >= 2.
        p: draw probabilities of the units of the draws, shape (n,).
        population_size: N.
        total: the variance of the total estimator.
        trace: return the trace only.

    References:
        Hansen & Hurwitz 1943; Särndal, Swensson & Wretman 1992, result 2.9.1.

    Example:
        >>> hansen_hurwitz_variance(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), 2)
        tensor(1.)
    """
    _check_population_size(population_size)
    z, scalar = _rows(y, p)
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"hansen_hurwitz_variance needs at least 2 draws, got n = {n}")
    z = z / _unit_vector("p", p, n).to(z)[:, None]
    centred = z - z.mean(0)
    scale = _scale(population_size, total) / (n * (n - 1))
    return _gram(centred, scale, scalar, trace)


def hajek_variance(
    y: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    population_size: int | None = None,
    *,
    trace: bool = False,
) -> Tensor:
    r"""Linearisation (Taylor) variance estimator of the Hájek mean.

    .. math::
        \hat V(\hat{\bar y}_H) = \frac{1}{\hat N^2} \sum_{k \in s}\sum_{l \in s}
        \frac{\Delta_{kl}}{\pi_{kl}} \frac{u_k}{\pi_k}\frac{u_l^T}{\pi_l}, \qquad
        u_k = y_k - \hat{\bar y}_H,

    with :math:`\hat N = \sum_s 1/\pi_k`, or the known N when ``population_size`` is given.
    Approximately unbiased for large samples (it estimates the HT variance of
    :math:`(y_k - \bar y_U)/N`).

    Args:
        y, pi, pi_joint: as in :func:`horvitz_thompson_variance`.
        population_size: N when known; ``None`` uses :math:`\hat N`.
        trace: return the trace only.

    References:
        Hájek 1971; Särndal, Swensson & Wretman 1992, section 5.7.

    Example:
        >>> pi = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
        >>> hajek_variance(torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64), pi,
        ...                torch.diag(pi) + (1 - torch.eye(3, dtype=torch.float64)) * 0.25)
        tensor(0.7778, dtype=torch.float64)
    """
    z, scalar = _rows(y, pi)
    pi = _unit_vector("pi", pi, z.shape[0]).to(z)
    n_hat = (1 / pi).sum() if population_size is None else _check_population_size(population_size)
    u = z - hajek(z, pi)
    v = horvitz_thompson_variance(u, pi, pi_joint, 1, total=True, trace=trace or scalar)
    return v / n_hat**2


def difference_variance(
    y: Tensor,
    y_hat: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    population_size: int,
    *,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""Variance estimator of the difference estimator: HT on the residuals.

    .. math::
        \hat V(\hat t_D) = \sum_{k \in s}\sum_{l \in s} \frac{\Delta_{kl}}{\pi_{kl}}
        \frac{e_k}{\pi_k}\frac{e_l^T}{\pi_l}, \qquad e_k = y_k - \hat y_k .

    Unbiased (the predictions do not depend on the sample). Under SRSWOR it is
    :math:`\frac{1-f}{n} s_e^2`; the gain over the plain minibatch is
    :math:`\operatorname{tr} s_e^2 / \operatorname{tr} s_y^2`.

    Args:
        y: sample values, shape (n,) or (n, p).
        y_hat: predictions for the sampled units, same shape.
        pi, pi_joint, population_size, total, trace: as in :func:`horvitz_thompson_variance`.

    References:
        Särndal, Swensson & Wretman 1992, result 6.3.1.

    Example:
        >>> pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
        >>> pij = torch.tensor([[0.5, 1 / 6], [1 / 6, 0.5]], dtype=torch.float64)  # SRS 2 of 4
        >>> y, y_hat = torch.tensor([1.0, 3.0]), torch.tensor([1.5, 2.5])
        >>> difference_variance(y, y_hat, pi, pij, 4)  # (1 - f) / n * s_e^2 = 0.25 * 0.5
        tensor(0.1250, dtype=torch.float64)
    """
    y = _sample_values("y", torch.as_tensor(y))
    y_hat = torch.as_tensor(y_hat)
    if y_hat.shape != y.shape:
        raise ValueError(
            f"Invalid y_hat: expected the shape of y {tuple(y.shape)}, got {tuple(y_hat.shape)}"
        )
    return horvitz_thompson_variance(
        y - y_hat, pi, pi_joint, population_size, total=total, trace=trace
    )


def greg_variance(
    y: Tensor,
    h: Tensor,
    h_population_mean: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    population_size: int,
    *,
    c: Tensor | None = None,
    ridge: float = 0.0,
    residuals: Literal["g", "e"] = "g",
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""Variance estimator of the GREG estimator (weighted-residual technique).

    With the sample residuals :math:`e_k = y_k - \hat B^T h_k` and the g-weights of
    :func:`~probopt.sampling.estimators.greg_weights`,

    .. math::
        \hat V_g(\hat t_{GREG}) = \sum_{k \in s}\sum_{l \in s} \frac{\Delta_{kl}}{\pi_{kl}}
        \frac{g_k e_k}{\pi_k} \frac{g_l e_l^T}{\pi_l}
        \quad (\texttt{residuals="g"}), \qquad
        \hat V_e: g_k \equiv 1 \quad (\texttt{residuals="e"}).

    :math:`\hat V_g` (Särndal, Swensson & Wretman 1989) is the default: it has better
    conditional properties; :math:`\hat V_e` is the plain Taylor estimator, often smaller at
    small n. Both estimate :func:`greg_design_variance` (consistent, not exactly unbiased):
    the residuals are fitted to the same n points as the q regressors, so both are biased low,
    badly when q is not much smaller than n (a class one-hot h with many classes in a small
    batch). Measured by exact enumeration of every SRS sample (N = 12, y = exp(x) + noise):
    E[V̂_g] / MSE = 0.21, 0.43, 0.59 at n = 4, 6, 8 with h = (1, x), and 0.09, 0.23, 0.31 with
    h = (1, x, x²); V̂_e is lower still (``test_greg_variance_estimators_are_biased_low``).

    Args:
        y: sample values, shape (n,) or (n, p).
        h, h_population_mean, c, ridge: as in :func:`~probopt.sampling.estimators.greg_weights`.
        pi, pi_joint, population_size, total, trace: as in :func:`horvitz_thompson_variance`.
        residuals: ``"g"`` (g-weighted residuals) or ``"e"`` (plain residuals).

    References:
        Särndal, Swensson & Wretman 1989; Särndal, Swensson & Wretman 1992, section 6.6.

    Example:
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]],
        ...                  dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 6.0, 9.0], dtype=torch.float64)
        >>> pi = torch.full((4,), 0.5, dtype=torch.float64)
        >>> pij = torch.full((4, 4), 3 / 14, dtype=torch.float64).fill_diagonal_(0.5)
        >>> greg_variance(y, h, torch.tensor([1.0, 2.0]), pi, pij, 8)
        tensor(0.0761, dtype=torch.float64)
    """
    _check_residual_kind(residuals)
    z, scalar = _rows(y, h, pi)
    hh = torch.as_tensor(h).to(z)
    hh = hh.unsqueeze(-1) if hh.dim() == 1 else hh
    b = greg_coefficients(z, hh, pi, population_size, c=c, ridge=ridge)
    e = z - hh @ b
    if residuals == "g":
        g = greg_weights(
            hh, h_population_mean, pi, population_size, c=c, ridge=ridge, total=True
        ) * torch.as_tensor(pi).to(z)
        e = g[:, None] * e
    return horvitz_thompson_variance(
        e[:, 0] if scalar else e, pi, pi_joint, population_size, total=total, trace=trace
    )


# --------------------------------------------------------------------------------------------
# exact design variances from the whole population


def srs_design_variance(
    y_population: Tensor, sample_size: int, *, total: bool = False, trace: bool = False
) -> Tensor:
    r"""Exact variance of the minibatch mean under SRSWOR of size n.

    .. math::
        V(\hat{\bar y}) = \frac{1 - f}{n} S^2, \qquad
        S^2 = \frac{1}{N - 1}\sum_U (y_k - \bar y_U)(y_k - \bar y_U)^T .

    Args:
        y_population: values of all N units, shape (N,) or (N, p).
        sample_size: n.
        total, trace: as in :func:`srs_variance`.

    References:
        Särndal, Swensson & Wretman 1992, result 3.3.1.

    Example:
        >>> srs_design_variance(torch.arange(8.0), 4)
        tensor(0.7500)
    """
    z, scalar = _rows(y_population)
    big_n = z.shape[0]
    if big_n < 1 or not 1 <= sample_size <= big_n:
        raise ValueError(f"Invalid sample_size: {sample_size!r} (must be in [1, {big_n}])")
    if big_n == 1:
        return z.new_zeros(()) if trace or scalar else z.new_zeros(z.shape[1], z.shape[1])
    centred = z - z.mean(0)
    scale = (1 - sample_size / big_n) / (sample_size * (big_n - 1)) * (big_n**2 if total else 1)
    return _gram(centred, scale, scalar, trace)


def horvitz_thompson_design_variance(
    y_population: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    *,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""Exact design variance of the Horvitz–Thompson estimator.

    .. math::
        V(\hat t_{HT}) = \sum_U \sum_U \Delta_{kl} \frac{y_k}{\pi_k} \frac{y_l^T}{\pi_l} .

    For the difference estimator pass the residuals :math:`y_k - \hat y_k`. Poisson sampling
    gives :math:`\sum_U (1 - \pi_k)/\pi_k\, y_k y_k^T`.

    Args:
        y_population: values of all N units, shape (N,) or (N, p).
        pi: inclusion probabilities of all units, shape (N,).
        pi_joint: joint inclusion probabilities, shape (N, N).
        total, trace: as in :func:`horvitz_thompson_variance`.

    References:
        Horvitz & Thompson 1952; Särndal, Swensson & Wretman 1992, result 2.8.1.

    Example:
        >>> pi = torch.full((3,), 0.5, dtype=torch.float64)
        >>> horvitz_thompson_design_variance(torch.tensor([1.0, 2.0, 3.0]), pi,
        ...                                  torch.diag(pi) + (1 - torch.eye(3)) * 0.25)
        tensor(1.5556, dtype=torch.float64)
    """
    z, scalar = _rows(y_population, pi)
    big_n = z.shape[0]
    pi = _unit_vector("pi", pi, big_n).to(z)
    pij = _joint_population(pi_joint, big_n).to(z)
    delta = pij - pi[:, None] * pi[None, :]
    return _quadratic(z / pi[:, None], delta, _scale(big_n, total), scalar, trace)


def sen_yates_grundy_design_variance(
    y_population: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    *,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""The Sen–Yates–Grundy form of the design variance of the HT estimator.

    .. math::
        V_{SYG} = -\frac{1}{2}\sum_U\sum_U \Delta_{kl}
        \Big(\frac{y_k}{\pi_k} - \frac{y_l}{\pi_l}\Big)\Big(\frac{y_k}{\pi_k} -
        \frac{y_l}{\pi_l}\Big)^T .

    Equals :func:`horvitz_thompson_design_variance` for fixed-size designs (where
    :math:`\sum_l \Delta_{kl} = 0`); differs otherwise.

    Args:
        y_population, pi, pi_joint, total, trace: as in
            :func:`horvitz_thompson_design_variance`.

    References:
        Sen 1953; Yates & Grundy 1953; Särndal, Swensson & Wretman 1992, result 2.8.2.

    Example:
        >>> pi = torch.full((3,), 2 / 3, dtype=torch.float64)  # SRS, 2 of 3
        >>> sen_yates_grundy_design_variance(torch.tensor([1.0, 2.0, 3.0]), pi,
        ...                                  torch.full((3, 3), 1 / 3).fill_diagonal_(2 / 3))
        tensor(0.1667, dtype=torch.float64)
    """
    z, scalar = _rows(y_population, pi)
    big_n = z.shape[0]
    pi = _unit_vector("pi", pi, big_n).to(z)
    pij = _joint_population(pi_joint, big_n).to(z)
    delta = pij - pi[:, None] * pi[None, :]
    a = delta - torch.diag(delta.sum(1))
    return _quadratic(z / pi[:, None], a, _scale(big_n, total), scalar, trace)


def hansen_hurwitz_design_variance(
    y_population: Tensor, p: Tensor, num_draws: int, *, total: bool = False, trace: bool = False
) -> Tensor:
    r"""Exact design variance of the Hansen–Hurwitz estimator with n draws.

    .. math::
        V(\hat t_{HH}) = \frac{1}{n} \sum_U p_k \Big(\frac{y_k}{p_k} - t\Big)
        \Big(\frac{y_k}{p_k} - t\Big)^T .

    Its trace is minimised by :math:`p_k \propto \lVert y_k \rVert`.

    Args:
        y_population: values of all N units, shape (N,) or (N, p).
        p: draw probabilities of all units, shape (N,), summing to 1.
        num_draws: n.
        total, trace: as in :func:`horvitz_thompson_variance`.

    References:
        Hansen & Hurwitz 1943; Särndal, Swensson & Wretman 1992, result 2.9.1.

    Example:
        >>> hansen_hurwitz_design_variance(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), 2)
        tensor(0.5000)
    """
    z, scalar = _rows(y_population, p)
    big_n = z.shape[0]
    _check_count("num_draws", num_draws, 1)
    p = _unit_vector("p", p, big_n).to(z)
    centred = z / p[:, None] - z.sum(0)
    scale = _scale(big_n, total) / num_draws
    if trace or scalar:
        return (p[:, None] * centred * centred).sum() * scale
    return (centred.T * p) @ centred * scale


def greg_design_variance(
    y_population: Tensor,
    h_population: Tensor,
    pi: Tensor,
    pi_joint: Tensor,
    *,
    c: Tensor | None = None,
    total: bool = False,
    trace: bool = False,
) -> Tensor:
    r"""Approximate (Taylor) design variance of the GREG estimator.

    .. math::
        AV(\hat t_{GREG}) = \sum_U\sum_U \Delta_{kl} \frac{E_k}{\pi_k}\frac{E_l^T}{\pi_l},
        \qquad E_k = y_k - B_U^T h_k, \qquad
        B_U = \Big(\sum_U \frac{h_k h_k^T}{c_k}\Big)^{-1} \sum_U \frac{h_k y_k^T}{c_k},

    the HT variance of the census-fit residuals: exact to first order in 1/n, not for a fixed n.

    Args:
        y_population: values of all N units, shape (N,) or (N, p).
        h_population: auxiliary values of all units, shape (N, q).
        pi, pi_joint, total, trace: as in :func:`horvitz_thompson_design_variance`.
        c: heteroscedasticity constants of all units, shape (N,); ``None`` means 1.

    References:
        Särndal, Swensson & Wretman 1992, result 6.6.1.

    Example:
        >>> h = torch.stack([torch.ones(4), torch.arange(4.0)], 1).double()
        >>> pi = torch.full((4,), 0.5, dtype=torch.float64)
        >>> pij = torch.full((4, 4), 1 / 6, dtype=torch.float64).fill_diagonal_(0.5)
        >>> greg_design_variance(1 + 2 * h[:, 1], h, pi, pij).abs() < 1e-12  # y linear in h
        tensor(True)
    """
    z, scalar = _rows(y_population, h_population, pi)
    big_n = z.shape[0]
    hh = torch.as_tensor(h_population).to(z)
    hh = hh.unsqueeze(-1) if hh.dim() == 1 else hh
    if hh.shape[0] != big_n:
        raise ValueError(f"Invalid h_population: expected {big_n} rows, got {tuple(hh.shape)}")
    inv_c = (
        torch.ones(big_n, dtype=z.dtype, device=z.device)
        if c is None
        else 1 / _unit_vector("c", c, big_n).to(z)
    )
    b = torch.linalg.solve((hh.T * inv_c) @ hh, (hh.T * inv_c) @ z)
    e = z - hh @ b
    return horvitz_thompson_design_variance(
        e[:, 0] if scalar else e, pi, pi_joint, total=total, trace=trace
    )


def design_variance(
    y_population: Tensor, design: SamplingDesign, *, total: bool = False, trace: bool = False
) -> Tensor:
    r"""Exact design variance of the design's natural unbiased estimator.

    Hansen–Hurwitz (:func:`hansen_hurwitz_design_variance`) for
    :class:`~probopt.sampling.designs.PPSWithReplacement`, Horvitz–Thompson
    (:func:`horvitz_thompson_design_variance`) for every without-replacement design (for SRSWOR
    this is :func:`srs_design_variance`).

    Args:
        y_population: values of all N units, shape (N,) or (N, p).
        design: the sampling design.
        total, trace: as in :func:`horvitz_thompson_variance`.

    Example:
        >>> from probopt.sampling.designs import SimpleRandomSampling
        >>> design_variance(torch.arange(8.0, dtype=torch.float64), SimpleRandomSampling(8, 4))
        tensor(0.7500, dtype=torch.float64)
    """
    if isinstance(design, PPSWithReplacement):
        return hansen_hurwitz_design_variance(
            y_population, design.draw_probabilities, design.num_draws, total=total, trace=trace
        )
    return horvitz_thompson_design_variance(
        y_population,
        design.inclusion_probabilities(),
        design.joint_inclusion_probabilities(),
        total=total,
        trace=trace,
    )


def _joint_population(pi_joint: Tensor, big_n: int) -> Tensor:
    pi_joint = torch.as_tensor(pi_joint)
    if pi_joint.shape != (big_n, big_n):
        raise ValueError(
            f"Invalid pi_joint: expected shape ({big_n}, {big_n}), got {tuple(pi_joint.shape)}"
        )
    return pi_joint
