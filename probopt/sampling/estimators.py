r"""Design-based estimators of the full-data gradient from one minibatch.

The training set is a finite population U of N units; unit k carries the per-example gradient
:math:`y_k = \nabla_\theta \ell(\theta; z_k) \in \mathbb{R}^p`. The target is the population mean
:math:`\bar y_U = N^{-1} \sum_U y_k` (the full-batch gradient), or with ``total=True`` the total
:math:`t = \sum_U y_k`. A minibatch s is a sample from a design with inclusion probabilities
:math:`\pi_k` (:mod:`probopt.sampling.designs`); :math:`d_k = 1/\pi_k` are the design weights.

Every estimator takes the sample values ``y`` of shape (n,) or (n, p) (one row per unit, any
number of gradient coordinates) and is differentiable in ``y``. Each point estimator is linear in
y with weights that do not depend on y, so it is also available as *loss weights*
(``*_weights``): the gradient of :math:`\sum_s w_k \ell_k` is :math:`\sum_s w_k \nabla \ell_k`,
which is the estimate, and any torch optimizer consumes it unchanged.

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

Variance estimators live in :mod:`probopt.sampling.variance`. Shapes are checked; the values of
``pi`` are not (that would synchronise with the device at every step): the designs validate them.

References:
    Horvitz & Thompson, `A generalization of sampling without replacement from a finite universe
    <https://doi.org/10.1080/01621459.1952.10483446>`_, JASA, 1952.
    Hansen & Hurwitz, `On the theory of sampling from finite populations
    <https://doi.org/10.1214/aoms/1177731356>`_, Ann. Math. Statist., 1943.
    Hájek, comment in *Foundations of Statistical Inference* (Godambe & Sprott, eds.), 1971.
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992.
    Deville & Särndal, `Calibration estimators in survey sampling
    <https://doi.org/10.1080/01621459.1992.10475217>`_, JASA, 1992.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


# --------------------------------------------------------------------------------------------
# shape checks (no value checks: they would synchronise with the device)


def _sample_values(name: str, y: Tensor) -> Tensor:
    if y.dim() not in (1, 2):
        raise ValueError(f"Invalid {name}: expected shape (n,) or (n, p), got {tuple(y.shape)}")
    return y


def _unit_vector(name: str, v: Tensor, n: int) -> Tensor:
    v = torch.as_tensor(v)
    if v.shape != (n,):
        raise ValueError(
            f"Invalid {name}: expected shape ({n},) (one value per sampled unit), "
            f"got {tuple(v.shape)}"
        )
    return v


def _check_population_size(population_size: int) -> int:
    return _check_count("population_size", population_size, 1)


def _weighted_sum(w: Tensor, y: Tensor) -> Tensor:
    """:math:`\\sum_s w_k y_k` for y of shape (n,) or (n, p), in the promoted dtype."""
    dtype = torch.promote_types(w.dtype, y.dtype)
    return w.to(device=y.device, dtype=dtype) @ y.to(dtype)


def _aux_matrix(h: Tensor, n: int) -> Tensor:
    h = torch.as_tensor(h)
    h = h.unsqueeze(-1) if h.dim() == 1 else h
    if h.dim() != 2 or h.shape[0] != n:
        raise ValueError(
            f"Invalid h: expected shape ({n}, q) (auxiliary values of the sampled "
            f"units), got {tuple(h.shape)}"
        )
    return h


# --------------------------------------------------------------------------------------------
# loss weights (the linear form of each estimator)


def horvitz_thompson_weights(pi: Tensor, population_size: int, *, total: bool = False) -> Tensor:
    r"""Horvitz–Thompson loss weights :math:`w_k = d_k / N` (:math:`d_k = 1/\pi_k` with ``total``).

    Backpropagating :math:`\sum_s w_k \ell_k` leaves :func:`horvitz_thompson` of the per-example
    gradients in ``.grad``.

    Args:
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: weights for the total instead of the mean.

    Example:
        >>> horvitz_thompson_weights(torch.tensor([0.5, 0.25]), 4)
        tensor([0.5000, 1.0000])
    """
    _check_population_size(population_size)
    pi = torch.as_tensor(pi)
    if pi.dim() != 1:
        raise ValueError(f"Invalid pi: expected shape (n,), got {tuple(pi.shape)}")
    d = 1.0 / pi
    return d if total else d / population_size


def hansen_hurwitz_weights(p: Tensor, population_size: int, *, total: bool = False) -> Tensor:
    r"""Hansen–Hurwitz loss weights :math:`w_i = 1/(n N p_{k_i})`, one per draw (repeats allowed).

    For uniform draws :math:`p_k = 1/N` these are the plain minibatch weights 1/n.

    Args:
        p: draw probabilities of the units of the n draws, shape (n,).
        population_size: N.
        total: weights for the total instead of the mean.

    Example:
        >>> hansen_hurwitz_weights(torch.tensor([0.25, 0.25]), 4)
        tensor([0.5000, 0.5000])
    """
    _check_population_size(population_size)
    p = torch.as_tensor(p)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"Invalid p: expected shape (n,) with n >= 1, got {tuple(p.shape)}")
    w = 1.0 / (p.numel() * p)
    return w if total else w / population_size


# --------------------------------------------------------------------------------------------
# point estimators


def horvitz_thompson(y: Tensor, pi: Tensor, population_size: int, *, total: bool = False) -> Tensor:
    r"""Horvitz–Thompson (π-) estimator of the population mean (or total).

    .. math::
        \hat t_{HT} = \sum_{k \in s} \frac{y_k}{\pi_k}, \qquad
        \hat{\bar y}_{HT} = \frac{\hat t_{HT}}{N}.

    Design-unbiased whenever every :math:`\pi_k > 0`. Under SRSWOR (:math:`\pi_k = n/N`) it is
    the plain minibatch mean.

    Args:
        y: sample values, shape (n,) or (n, p).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: estimate the total :math:`t` instead of the mean.

    Returns:
        Shape () or (p,).

    References:
        Horvitz & Thompson 1952; Särndal, Swensson & Wretman 1992, section 2.8.

    Example:
        >>> y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> horvitz_thompson(y, torch.tensor([0.5, 0.5]), 4)
        tensor([2., 3.])
    """
    y = _sample_values("y", y)
    pi = _unit_vector("pi", pi, y.shape[0])
    return _weighted_sum(horvitz_thompson_weights(pi, population_size, total=total), y)


def hajek(y: Tensor, pi: Tensor) -> Tensor:
    r"""Hájek (ratio) estimator of the population mean.

    .. math::
        \hat{\bar y}_{H} = \frac{\sum_s d_k y_k}{\sum_s d_k}, \qquad d_k = 1/\pi_k .

    It needs no N, is invariant to a rescaling of the :math:`\pi_k`, equals
    :func:`horvitz_thompson` under SRSWOR, and is usually better than it under Poisson or πps
    designs (random sample size). Bias O(1/n). An empty sample gives 0 (as HT does), not NaN.

    Args:
        y: sample values, shape (n,) or (n, p).
        pi: inclusion probabilities of the sampled units, shape (n,).

    References:
        Hájek 1971; Särndal, Swensson & Wretman 1992, section 5.7.

    Example:
        >>> hajek(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.25]))
        tensor(2.3333)
    """
    y = _sample_values("y", y)
    d = 1.0 / _unit_vector("pi", pi, y.shape[0])
    return _weighted_sum(d / d.sum(), y)


def hansen_hurwitz(y: Tensor, p: Tensor, population_size: int, *, total: bool = False) -> Tensor:
    r"""Hansen–Hurwitz estimator for n draws with replacement (importance sampling).

    .. math::
        \hat t_{HH} = \frac{1}{n} \sum_{i=1}^{n} \frac{y_{k_i}}{p_{k_i}}, \qquad
        \hat{\bar y}_{HH} = \frac{\hat t_{HH}}{N},

    where draw i picks unit :math:`k_i` with probability :math:`p_{k_i}`. Unbiased whenever
    every :math:`p_k > 0`; uniform :math:`p_k = 1/N` gives the i.i.d. minibatch mean.

    Args:
        y: values of the n draws in draw order, shape (n,) or (n, p); a unit drawn twice
            appears twice.
        p: draw probabilities of the units of the draws, shape (n,).
        population_size: N.
        total: estimate the total instead of the mean.

    References:
        Hansen & Hurwitz 1943; Särndal, Swensson & Wretman 1992, section 2.9.

    Example:
        >>> # units 0, 1 with y = (2, 6) and p = (0.25, 0.75): y proportional to p, zero variance
        >>> hansen_hurwitz(torch.tensor([6.0, 2.0, 6.0]), torch.tensor([0.75, 0.25, 0.75]), 2)
        tensor(4.)
    """
    y = _sample_values("y", y)
    p = _unit_vector("p", p, y.shape[0])
    return _weighted_sum(hansen_hurwitz_weights(p, population_size, total=total), y)


def difference_estimator(
    y: Tensor,
    y_hat: Tensor,
    y_hat_population_mean: Tensor,
    pi: Tensor,
    population_size: int,
    *,
    total: bool = False,
) -> Tensor:
    r"""Difference estimator: a known prediction total plus the HT estimate of the residuals.

    .. math::
        \hat t_{D} = \sum_U \hat y_k + \sum_{k \in s} \frac{y_k - \hat y_k}{\pi_k}, \qquad
        \hat{\bar y}_{D} = \bar{\hat y}_U + \frac{1}{N} \sum_{k \in s} \frac{y_k - \hat y_k}
        {\pi_k}.

    Exactly design-unbiased for *any* predictions :math:`\hat y_k` that do not depend on the
    sample s (e.g. an auxiliary model fitted on earlier minibatches); its variance is the HT
    variance of the residuals :math:`y_k - \hat y_k`. SVRG and SAGA are difference estimators
    with n = 1.

    Args:
        y: sample values, shape (n,) or (n, p).
        y_hat: predictions for the sampled units, same shape as ``y``.
        y_hat_population_mean: :math:`\bar{\hat y}_U = N^{-1}\sum_U \hat y_k`, shape () or (p,).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        total: estimate the total instead of the mean.

    References:
        Särndal, Swensson & Wretman 1992, section 6.3.

    Example:
        >>> y, y_hat = torch.tensor([1.0, 3.0]), torch.tensor([1.5, 2.5])
        >>> difference_estimator(y, y_hat, torch.tensor(2.0), torch.tensor([0.5, 0.5]), 4)
        tensor(2.)
    """
    y = _sample_values("y", y)
    y_hat = torch.as_tensor(y_hat)
    if y_hat.shape != y.shape:
        raise ValueError(
            f"Invalid y_hat: expected the shape of y {tuple(y.shape)}, got {tuple(y_hat.shape)}"
        )
    correction = horvitz_thompson(y - y_hat, pi, population_size, total=total)
    known = torch.as_tensor(y_hat_population_mean).to(correction)
    if known.shape != correction.shape:
        raise ValueError(
            f"Invalid y_hat_population_mean: expected shape "
            f"{tuple(correction.shape)}, got {tuple(known.shape)}"
        )
    return (known * population_size if total else known) + correction


def _greg_system(
    h: Tensor, pi: Tensor, population_size: int, c: Tensor | None, ridge: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(d, c, M, mean_ht)`` with :math:`M = N^{-1}\sum_s d_k h_k h_k^T / c_k + \lambda I`."""
    _check_population_size(population_size)
    n = h.shape[0]
    d = 1.0 / _unit_vector("pi", pi, n).to(h)
    c = torch.ones_like(d) if c is None else _unit_vector("c", c, n).to(h)
    if not ridge >= 0.0:
        raise ValueError(f"Invalid ridge: {ridge!r} (must be >= 0)")
    dc = d / c
    m = (h.T * (dc / population_size)) @ h
    if ridge:
        m = m + ridge * torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    return d, c, m, (d @ h) / population_size


def _solve(m: Tensor, rhs: Tensor, n: int, ridge: float) -> Tensor:
    q = m.shape[0]
    message = (
        f"GREG: the weighted moment matrix of h is singular (q = {q} auxiliary variables, "
        f"n = {n} sampled units); use ridge > 0, fewer or non-collinear auxiliary variables"
    )
    if q > n and not ridge:  # rank(M) <= n < q: singular whatever the rounding says
        raise ValueError(message)
    if m.device.type != "cpu":
        # Note [probopt: no host sync in the GREG solve]: on an accelerator, checking for a zero
        # pivot would synchronise with the host at every training step; a singular M then gives
        # non-finite weights instead of this error.
        return torch.linalg.solve_ex(m, rhs)[0]
    try:
        return torch.linalg.solve(m, rhs)
    except torch.linalg.LinAlgError as err:
        raise ValueError(message) from err


def greg_weights(
    h: Tensor,
    h_population_mean: Tensor,
    pi: Tensor,
    population_size: int,
    *,
    c: Tensor | None = None,
    ridge: float = 0.0,
    total: bool = False,
) -> Tensor:
    r"""Generalized-regression (GREG) weights: linear calibration on auxiliary variables h.

    For the working model :math:`y_k = B^T h_k + \varepsilon_k`, :math:`V\varepsilon_k \propto
    c_k`, the GREG estimate of the mean is :math:`\sum_s w_k y_k` with

    .. math::
        M = \frac{1}{N}\sum_{k \in s} \frac{d_k h_k h_k^T}{c_k} + \lambda I, \qquad
        g_k = 1 + \Big(\bar h_U - \frac{1}{N}\sum_{k\in s} d_k h_k\Big)^T M^{-1}
              \frac{h_k}{c_k}, \qquad
        w_k = \frac{d_k g_k}{N}

    (:math:`w_k = d_k g_k` with ``total``). The weights depend on h only, so one set serves
    every gradient coordinate, and with :math:`\lambda = 0` they satisfy the calibration
    equations :math:`\sum_s w_k h_k = \bar h_U` (:math:`= t_h` with ``total``): they are the
    chi-square-distance calibration weights of Deville & Särndal (1992). With
    :math:`h_k \equiv 1` they are the plain minibatch weights under SRSWOR; with class one-hot
    h they post-stratify.

    Pseudo-code::

        d = 1 / pi
        M = (1/N) * sum_s d_k h_k h_k^T / c_k + ridge * I        # q x q
        lam = solve(M, h_population_mean - (1/N) * sum_s d_k h_k)
        w_k = d_k * (1 + h_k^T lam / c_k) / N                    # (drop 1/N for the total)

    Args:
        h: auxiliary values of the sampled units, shape (n, q) (or (n,) for q = 1).
        h_population_mean: :math:`\bar h_U = N^{-1} \sum_U h_k`, shape (q,) (a mean also
            when ``total=True``).
        pi: inclusion probabilities of the sampled units, shape (n,).
        population_size: N.
        c: positive heteroscedasticity constants :math:`c_k` of the sampled units, shape (n,);
            ``None`` means 1.
        ridge: :math:`\lambda \ge 0`, added to the mean-scale moment matrix M. It keeps the
            solve well posed when q approaches n, at the price of exact calibration.
        total: weights for the total instead of the mean.

    Returns:
        w, shape (n,).

    Raises:
        ValueError: when M is singular: q > n with ``ridge=0``, or a zero pivot. Nearly
            collinear h passes and gives extreme weights; ``ridge`` is the remedy.

    References:
        Särndal, Swensson & Wretman 1992, sections 6.4–6.7; Deville & Särndal 1992.

    Example:
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> pi = torch.full((3,), 0.5, dtype=torch.float64)
        >>> w = greg_weights(h, torch.tensor([1.0, 2.0], dtype=torch.float64), pi, 6)
        >>> w
        tensor([0.1429, 0.2857, 0.5714], dtype=torch.float64)
        >>> (w @ h).round(decimals=12)                  # the calibration equations
        tensor([1., 2.], dtype=torch.float64)
    """
    pi = torch.as_tensor(pi)
    hh = _aux_matrix(h, pi.shape[0] if pi.dim() == 1 else -1)
    dtype = torch.promote_types(hh.dtype, pi.dtype)
    hh = hh.to(dtype)
    d, c, m, mean_ht = _greg_system(hh, pi, population_size, c, ridge)
    target = torch.as_tensor(h_population_mean, dtype=dtype, device=hh.device).reshape(-1)
    if target.shape != (hh.shape[1],):
        raise ValueError(
            f"Invalid h_population_mean: expected shape ({hh.shape[1]},), got "
            f"{tuple(torch.as_tensor(h_population_mean).shape)}"
        )
    lam = _solve(m, target - mean_ht, hh.shape[0], ridge)
    w = d * (1.0 + (hh @ lam) / c)
    return w if total else w / population_size


def greg_coefficients(
    y: Tensor,
    h: Tensor,
    pi: Tensor,
    population_size: int,
    *,
    c: Tensor | None = None,
    ridge: float = 0.0,
) -> Tensor:
    r"""Design-weighted regression coefficients :math:`\hat B` of the GREG working model.

    .. math::
        \hat B = M^{-1} \frac{1}{N} \sum_{k \in s} \frac{d_k h_k y_k^T}{c_k}, \qquad
        M = \frac{1}{N}\sum_{k \in s} \frac{d_k h_k h_k^T}{c_k} + \lambda I,

    shape (q, p) (one column per gradient coordinate; (q,) for y of shape (n,)). The GREG
    estimate is :math:`\hat{\bar y}_{HT} + \hat B^T(\bar h_U - \hat{\bar h}_{HT})`.

    Args:
        y: sample values, shape (n,) or (n, p).
        h, pi, population_size, c, ridge: as in :func:`greg_weights`.

    Example:
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = 1 + 2 * h[:, 1]
        >>> greg_coefficients(y, h, torch.full((3,), 0.5, dtype=torch.float64), 6)
        tensor([1., 2.], dtype=torch.float64)
    """
    y = _sample_values("y", y)
    hh = _aux_matrix(h, y.shape[0])
    dtype = torch.promote_types(torch.promote_types(hh.dtype, y.dtype), torch.as_tensor(pi).dtype)
    hh, yy = hh.to(dtype), y.to(dtype)
    d, c, m, _ = _greg_system(hh, torch.as_tensor(pi), population_size, c, ridge)
    rhs = (hh.T * (d / c / population_size)) @ yy
    return _solve(m, rhs, hh.shape[0], ridge)


def greg(
    y: Tensor,
    h: Tensor,
    h_population_mean: Tensor,
    pi: Tensor,
    population_size: int,
    *,
    c: Tensor | None = None,
    ridge: float = 0.0,
    total: bool = False,
) -> Tensor:
    r"""Generalized-regression (GREG) estimator of the population mean (or total).

    .. math::
        \hat{\bar y}_{GREG} = \sum_{k \in s} w_k y_k
        = \hat{\bar y}_{HT} + \hat B^T \big(\bar h_U - \hat{\bar h}_{HT}\big),

    with the calibration weights :math:`w_k` of :func:`greg_weights` and the coefficients
    :math:`\hat B` of :func:`greg_coefficients`. Approximately design-unbiased (bias O(1/n))
    whatever the working model; efficient when :math:`B^T h_k` predicts :math:`y_k`. Under
    SRSWOR with an intercept in h and :math:`c_k = 1` it equals the model-based BLUP
    (:mod:`probopt.models.finite_population`).

    Args:
        y: sample values, shape (n,) or (n, p).
        h, h_population_mean, pi, population_size, c, ridge, total: as in :func:`greg_weights`.

    References:
        Cassel, Särndal & Wretman, *Some results on generalized difference estimation and
        generalized regression estimation for finite populations*, Biometrika, 1976;
        Särndal, Swensson & Wretman 1992, section 6.4.

    Example:
        >>> h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> y = 1 + 2 * h[:, 1]                       # exactly linear in h: no error left
        >>> greg(y, h, torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...      torch.full((3,), 0.5, dtype=torch.float64), 6)
        tensor(5.0000, dtype=torch.float64)
    """
    y = _sample_values("y", y)
    w = greg_weights(h, h_population_mean, pi, population_size, c=c, ridge=ridge, total=total)
    return _weighted_sum(w, y)
