"""Agreement with samplics 0.6.1 on fixed fixtures: point estimates and standard errors.

samplics computes the with-replacement "ultimate cluster" Taylor variance times ``fpc``; with
design weights N/n and fpc = 1 - f (per stratum) this is exactly the SRSWOR / stratified SRSWOR
variance estimator, and with weights 1 / (n p_k) and fpc = 1 it is the Hansen–Hurwitz one.
samplics takes one coordinate per call, so vector estimates are compared coordinate by
coordinate. Tolerance 1e-10 relative: two float64 implementations of the same sums.
"""

import warnings

import numpy as np
import pytest
import torch

from probopt.sampling import estimators as est
from probopt.sampling import variance as var
from probopt.sampling.designs import PPSWithReplacement, SimpleRandomSampling, StratifiedSampling

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # "samplics is archived"
    samplics = pytest.importorskip("samplics")
    from samplics import PopParam, SampleWeight, TaylorEstimator

F64 = torch.float64
CLOSE = dict(rtol=1e-10, atol=1e-12)
N, P = 40, 3


@pytest.fixture(scope="module")
def population():
    g = torch.Generator().manual_seed(42)
    x = torch.rand(N, 2, generator=g, dtype=F64) * 4
    y = torch.stack([1 + x[:, 0] + 0.5 * x[:, 1], x[:, 0] ** 2, torch.cos(x[:, 1])], 1)
    y = y + 0.2 * torch.randn(N, P, generator=g, dtype=F64)
    h = torch.cat([torch.ones(N, 1, dtype=F64), x], 1)
    return y, h


def _taylor(param, y, weight, **kwargs):
    """samplics point estimate and variance, one column of y at a time."""
    points, variances = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for j in range(y.shape[1]):
            e = TaylorEstimator(param)
            e.estimate(y[:, j], samp_weight=weight, **kwargs)
            points.append(float(e.point_est))
            variances.append(float(e.variance))
    return torch.tensor(points, dtype=F64), torch.tensor(variances, dtype=F64)


@pytest.mark.parametrize("total", [False, True])
def test_srs_mean_total_and_standard_errors(population, total):
    y_u, _ = population
    design = SimpleRandomSampling(N, 10)
    s = design.sample(torch.Generator().manual_seed(0))
    y, pi = y_u[s.indices], s.inclusion_probabilities
    point, variance = _taylor(
        PopParam.total if total else PopParam.mean, y.numpy(), (1 / pi).numpy(), fpc=1 - 10 / N
    )
    torch.testing.assert_close(est.horvitz_thompson(y, pi, N, total=total), point, **CLOSE)
    if not total:
        torch.testing.assert_close(est.hajek(y, pi), point, **CLOSE)
    pij = design.joint_inclusion_probabilities(s.indices)
    for v in (
        var.srs_variance(y, N, total=total),
        var.horvitz_thompson_variance(y, pi, pij, N, total=total),
        var.sen_yates_grundy_variance(y, pi, pij, N, total=total),
    ):
        torch.testing.assert_close(torch.sqrt(torch.diagonal(v)), torch.sqrt(variance), **CLOSE)
    if not total:  # the Hajek linearisation is samplics' Taylor variance of the weighted mean
        torch.testing.assert_close(
            torch.diagonal(var.hajek_variance(y, pi, pij)), variance, **CLOSE
        )


def test_stratified_srs_total_and_standard_errors(population):
    y_u, _ = population
    strata = torch.tensor([0] * 15 + [1] * 10 + [2] * 15)
    design = StratifiedSampling(strata, sample_sizes=[4, 3, 5])
    s = design.sample(torch.Generator().manual_seed(1))
    y, pi = y_u[s.indices], s.inclusion_probabilities
    fpc = {
        h: 1 - n_h / n_big
        for h, (n_h, n_big) in enumerate(zip(design.sample_sizes, design.stratum_sizes))
    }
    point, variance = _taylor(
        PopParam.total, y.numpy(), (1 / pi).numpy(), stratum=strata[s.indices].numpy(), fpc=fpc
    )
    torch.testing.assert_close(est.horvitz_thompson(y, pi, N, total=True), point, **CLOSE)
    v = var.horvitz_thompson_variance(
        y, pi, design.joint_inclusion_probabilities(s.indices), N, total=True
    )
    torch.testing.assert_close(torch.diagonal(v), variance, **CLOSE)


def test_ppswr_hansen_hurwitz_total_and_standard_errors(population):
    y_u, h_u = population
    design = PPSWithReplacement(h_u[:, 1] + 0.5, num_draws=8)
    s = design.sample(torch.Generator().manual_seed(2))
    y, p = y_u[s.indices], s.draw_probabilities
    w = est.hansen_hurwitz_weights(p, N, total=True)  # 1 / (n p_k), one per draw
    point, variance = _taylor(PopParam.total, y.numpy(), w.numpy(), fpc=1.0)
    torch.testing.assert_close(est.hansen_hurwitz(y, p, N, total=True), point, **CLOSE)
    torch.testing.assert_close(
        torch.diagonal(var.hansen_hurwitz_variance(y, p, N, total=True)), variance, **CLOSE
    )


@pytest.mark.parametrize("use_c", [False, True])
def test_greg_calibration_weights_estimates_and_standard_errors(population, use_c):
    """GREG = linear calibration (samplics ``calibrate``) on h = (1, x1, x2) with scale c_k.

    The GREG SE is checked through samplics' Taylor total of the residual variables g_k e_k
    (and e_k) with the design weights, whose B-hat we fit independently with numpy lstsq.
    """
    y_u, h_u = population
    n = 12
    design = SimpleRandomSampling(N, n)
    s = design.sample(torch.Generator().manual_seed(3))
    y, h, pi = y_u[s.indices], h_u[s.indices], s.inclusion_probabilities
    d = (1 / pi).numpy()
    c = (0.5 + h[:, 1]) if use_c else None
    t_h = h_u.sum(0).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        w_samplics = SampleWeight().calibrate(
            d,
            h.numpy(),
            control={f"x{j}": t_h[j] for j in range(3)},
            scale=1 if c is None else c.numpy(),
        )
    w = est.greg_weights(h, h_u.mean(0), pi, N, c=c, total=True)
    torch.testing.assert_close(w, torch.as_tensor(w_samplics), **CLOSE)
    point, _ = _taylor(PopParam.total, y.numpy(), w_samplics, fpc=1 - n / N)
    torch.testing.assert_close(est.greg(y, h, h_u.mean(0), pi, N, c=c, total=True), point, **CLOSE)
    mean_point, _ = _taylor(PopParam.mean, y.numpy(), w_samplics, fpc=1 - n / N)
    torch.testing.assert_close(est.greg(y, h, h_u.mean(0), pi, N, c=c), mean_point, **CLOSE)

    # residuals of the design-weighted (and 1/c-weighted) regression, fitted with numpy
    sw = np.sqrt(d / (1.0 if c is None else c.numpy()))
    beta = np.linalg.lstsq(h.numpy() * sw[:, None], y.numpy() * sw[:, None], rcond=None)[0]
    e = y.numpy() - h.numpy() @ beta
    g = w_samplics / d
    for residuals, u in (("g", g[:, None] * e), ("e", e)):
        _, variance = _taylor(PopParam.total, u, d, fpc=1 - n / N)
        v = var.greg_variance(
            y,
            h,
            h_u.mean(0),
            pi,
            design.joint_inclusion_probabilities(s.indices),
            N,
            c=c,
            residuals=residuals,
            total=True,
        )
        torch.testing.assert_close(torch.sqrt(torch.diagonal(v)), torch.sqrt(variance), **CLOSE)
