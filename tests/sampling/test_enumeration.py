"""Exact design expectations by enumerating every sample of tiny populations (float64).

Every tolerance here is 1e-12 (absolute, on quantities of order 1-10): the enumerated moments are
finite sums of a few hundred terms, so only rounding separates them from the formulas.
"""

import itertools

import numpy as np
import pytest
import torch

from probopt.sampling import estimators as est
from probopt.sampling import variance as var
from probopt.sampling.designs import (
    PoissonSampling,
    PPSWithReplacement,
    SimpleRandomSampling,
    StratifiedSampling,
)
from probopt.testing import reference as ref

N = 7
EXACT = dict(rtol=0, atol=1e-12)

DESIGNS = {
    "srs": lambda: SimpleRandomSampling(N, 3),
    "poisson": lambda: PoissonSampling(torch.linspace(0.2, 0.9, N)),
    # n_h >= 2 in every stratum, so every pi_kl > 0 (unbiased HT variance estimation)
    "stratified": lambda: StratifiedSampling(
        torch.tensor([0, 1, 0, 1, 1, 0, 1]), sample_sizes=[2, 2]
    ),
    "ppswr": lambda: PPSWithReplacement(torch.arange(1.0, N + 1), num_draws=3),
}
WITHOUT_REPLACEMENT = ["srs", "poisson", "stratified"]
FIXED_SIZE = ["srs", "stratified"]


@pytest.fixture(scope="module")
def population():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, generator=g, dtype=torch.float64) * 2
    y = torch.stack([1 + 2 * x, x**2, torch.sin(3 * x)], 1) + 0.1 * torch.randn(
        N, 3, generator=g, dtype=torch.float64
    )
    y_hat = torch.stack([1.1 + 1.9 * x, x, 0.5 * torch.ones(N)], 1)  # fixed predictions
    h = torch.stack([torch.ones(N, dtype=torch.float64), x], 1)
    return {"y": y, "y_hat": y_hat, "h": h}


def _enumerate(name):
    design = DESIGNS[name]()
    return design, ref.enumerate_design(design)


def _distinct(indices):
    return torch.as_tensor(np.unique(indices))


def _moments(samples, fn):
    return tuple(torch.as_tensor(m) for m in ref.exact_moments(samples, lambda s: fn(s).numpy()))


@pytest.mark.parametrize("name", DESIGNS)
def test_inclusion_probabilities_equal_the_enumerated_ones(name):
    design, samples = _enumerate(name)
    assert abs(sum(s.probability for s in samples) - 1) < 1e-12
    pi, pij = ref.inclusion_probabilities_from(samples, N)
    torch.testing.assert_close(design.inclusion_probabilities(), torch.as_tensor(pi), **EXACT)
    torch.testing.assert_close(
        design.joint_inclusion_probabilities(), torch.as_tensor(pij), **EXACT
    )


@pytest.mark.parametrize("name", DESIGNS)
def test_horvitz_thompson_is_unbiased_and_its_variance_exact(name, population):
    """HT on the distinct units (also under PPSWR, with pi_k = 1 - (1 - p_k)^n)."""
    design, samples = _enumerate(name)
    y, pi_u = population["y"], design.inclusion_probabilities()

    def ht(s):
        u = _distinct(s)
        out = est.horvitz_thompson(y[u], pi_u[u], N)
        torch.testing.assert_close(
            out, torch.as_tensor(ref.horvitz_thompson(y[u].numpy(), pi_u[u].numpy(), N)), **EXACT
        )
        return out

    mean, cov = _moments(samples, ht)
    torch.testing.assert_close(mean, y.mean(0), **EXACT)
    pij = design.joint_inclusion_probabilities()
    true = var.horvitz_thompson_design_variance(y, pi_u, pij)
    torch.testing.assert_close(cov, true, **EXACT)
    torch.testing.assert_close(
        true,
        torch.as_tensor(ref.horvitz_thompson_design_variance(y.numpy(), pi_u.numpy(), pij.numpy())),
        **EXACT,
    )
    if name != "ppswr":
        torch.testing.assert_close(var.design_variance(y, design), true, **EXACT)


@pytest.mark.parametrize("name", WITHOUT_REPLACEMENT + ["ppswr"])
def test_horvitz_thompson_variance_estimator_is_unbiased(name, population):
    design, samples = _enumerate(name)
    y, pi_u = population["y"], design.inclusion_probabilities()

    def vhat(s):
        u = _distinct(s)
        pij = design.joint_inclusion_probabilities(u)
        out = var.horvitz_thompson_variance(y[u], pi_u[u], pij, N)
        torch.testing.assert_close(
            out,
            torch.as_tensor(
                ref.horvitz_thompson_variance(y[u].numpy(), pi_u[u].numpy(), pij.numpy(), N)
            ),
            **EXACT,
        )
        return out

    mean, _ = _moments(samples, vhat)
    true = var.horvitz_thompson_design_variance(y, pi_u, design.joint_inclusion_probabilities())
    torch.testing.assert_close(mean, true, **EXACT)


@pytest.mark.parametrize("name", FIXED_SIZE)
def test_sen_yates_grundy_is_unbiased_for_fixed_size_designs(name, population):
    design, samples = _enumerate(name)
    y, pi_u = population["y"], design.inclusion_probabilities()
    pij_u = design.joint_inclusion_probabilities()

    def vhat(s):
        u = torch.as_tensor(s)
        pij = design.joint_inclusion_probabilities(u)
        out = var.sen_yates_grundy_variance(y[u], pi_u[u], pij, N)
        torch.testing.assert_close(
            out,
            torch.as_tensor(
                ref.sen_yates_grundy_variance(y[u].numpy(), pi_u[u].numpy(), pij.numpy(), N)
            ),
            **EXACT,
        )
        return out

    mean, _ = _moments(samples, vhat)
    true = var.horvitz_thompson_design_variance(y, pi_u, pij_u)
    torch.testing.assert_close(mean, true, **EXACT)
    torch.testing.assert_close(var.sen_yates_grundy_design_variance(y, pi_u, pij_u), true, **EXACT)


def test_sen_yates_grundy_is_biased_under_poisson_sampling(population):
    """The SYG form needs a fixed sample size: under Poisson sampling it misses the variance."""
    design, samples = _enumerate("poisson")
    y, pi_u = population["y"], design.inclusion_probabilities()
    mean, _ = _moments(
        samples,
        lambda s: var.sen_yates_grundy_variance(
            y[s], pi_u[s], design.joint_inclusion_probabilities(torch.as_tensor(s)), N, trace=True
        ),
    )
    true = var.horvitz_thompson_design_variance(
        y, pi_u, design.joint_inclusion_probabilities(), trace=True
    )
    assert abs(float(mean - true)) > 0.05 * float(true)
    # and the Poisson design variance is the textbook sum_U (1 - pi_k) / pi_k y_k y_k^T / N^2
    poisson = (y.T * ((1 - pi_u) / pi_u)) @ y / N**2
    torch.testing.assert_close(var.design_variance(y, design), poisson, **EXACT)


def test_srs_closed_forms(population):
    design, samples = _enumerate("srs")
    y = population["y"]
    mean, cov = _moments(
        samples,
        lambda s: est.horvitz_thompson(y[s], torch.full((3,), 3 / N, dtype=torch.float64), N),
    )
    true = var.srs_design_variance(y, 3)
    torch.testing.assert_close(cov, true, **EXACT)

    def vhat(s):
        out = var.srs_variance(y[s], N)
        torch.testing.assert_close(out, torch.as_tensor(ref.srs_variance(y[s].numpy(), N)), **EXACT)
        return out

    torch.testing.assert_close(_moments(samples, vhat)[0], true, **EXACT)


def test_hansen_hurwitz_unbiased_over_all_ordered_draws(population):
    design, samples = _enumerate("ppswr")
    assert len(samples) == N**3
    y, p = population["y"], design.draw_probabilities

    def hh(s):
        out = est.hansen_hurwitz(y[s], p[s], N)
        torch.testing.assert_close(
            out, torch.as_tensor(ref.hansen_hurwitz(y[s].numpy(), p[s].numpy(), N)), **EXACT
        )
        return out

    def vhat(s):
        out = var.hansen_hurwitz_variance(y[s], p[s], N)
        torch.testing.assert_close(
            out,
            torch.as_tensor(ref.hansen_hurwitz_variance(y[s].numpy(), p[s].numpy(), N)),
            **EXACT,
        )
        return out

    mean, cov = _moments(samples, hh)
    torch.testing.assert_close(mean, y.mean(0), **EXACT)
    true = var.hansen_hurwitz_design_variance(y, p, design.num_draws)
    torch.testing.assert_close(cov, true, **EXACT)
    torch.testing.assert_close(var.design_variance(y, design), true, **EXACT)
    torch.testing.assert_close(
        true,
        torch.as_tensor(ref.hansen_hurwitz_design_variance(y.numpy(), p.numpy(), design.num_draws)),
        **EXACT,
    )
    torch.testing.assert_close(_moments(samples, vhat)[0], true, **EXACT)


@pytest.mark.parametrize("name", DESIGNS)
def test_difference_estimator_is_unbiased_with_residual_variance(name, population):
    design, samples = _enumerate(name)
    y, y_hat = population["y"], population["y_hat"]
    y_hat_mean = y_hat.mean(0)
    pi_u = design.inclusion_probabilities()
    pij_u = design.joint_inclusion_probabilities()

    def diff(s):
        if name == "ppswr":  # the with-replacement twin: known mean + HH of the residuals
            p = design.draw_probabilities[s]
            return y_hat_mean + est.hansen_hurwitz(y[s] - y_hat[s], p, N)
        out = est.difference_estimator(y[s], y_hat[s], y_hat_mean, pi_u[s], N)
        torch.testing.assert_close(
            out,
            torch.as_tensor(
                ref.difference_estimator(
                    y[s].numpy(), y_hat[s].numpy(), y_hat_mean.numpy(), pi_u[s].numpy(), N
                )
            ),
            **EXACT,
        )
        return out

    mean, cov = _moments(samples, diff)
    torch.testing.assert_close(mean, y.mean(0), **EXACT)
    if name == "ppswr":
        true = var.hansen_hurwitz_design_variance(y - y_hat, design.draw_probabilities, 3)
    else:
        true = var.horvitz_thompson_design_variance(y - y_hat, pi_u, pij_u)
        vhat_mean, _ = _moments(
            samples,
            lambda s: var.difference_variance(
                y[s], y_hat[s], pi_u[s], design.joint_inclusion_probabilities(torch.as_tensor(s)), N
            ),
        )
        torch.testing.assert_close(vhat_mean, true, **EXACT)
    torch.testing.assert_close(cov, true, **EXACT)


@pytest.mark.parametrize("name", WITHOUT_REPLACEMENT)
def test_trace_and_total_options(name, population):
    design = DESIGNS[name]()
    y = population["y"]
    s = torch.arange(0, N, 2)
    pi, pij = design.inclusion_probabilities()[s], design.joint_inclusion_probabilities(s)
    for fn in (var.horvitz_thompson_variance, var.sen_yates_grundy_variance):
        full = fn(y[s], pi, pij, N)
        assert full.shape == (3, 3)
        torch.testing.assert_close(fn(y[s], pi, pij, N, trace=True), torch.trace(full), **EXACT)
        torch.testing.assert_close(
            fn(y[s], pi, pij, N, total=True), full * N**2, rtol=1e-13, atol=0
        )
        torch.testing.assert_close(fn(y[s, 1], pi, pij, N), full[1, 1], **EXACT)
    true = var.design_variance(y, design)
    torch.testing.assert_close(
        var.design_variance(y, design, trace=True), torch.trace(true), **EXACT
    )
    torch.testing.assert_close(
        var.design_variance(y, design, total=True), true * N**2, rtol=1e-13, atol=0
    )


def test_greg_bias_shrinks_like_one_over_n():
    """Exact GREG bias under SRS on N = 12 for n = 3, 4, 6, 8 (all C(12, n) samples).

    y = exp(x) + noise is not linear in h = (1, x), so the ratio in B-hat leaves an O(1/n)
    bias; theory gives bias ~ -(1 - f) / n * const. Measured: bias * n / (1 - f) in [-3.5, -2.3].
    We require (a) |bias| strictly decreasing, (b) bias * n / (1 - f) constant within a factor
    1.6, (c) it is not exactly unbiased (|bias| > 0.05 at n = 8) while the difference estimator
    with the census fit as predictions is (the O(1/n) comes from estimating B).
    """
    big_n = 12
    g = torch.Generator().manual_seed(0)
    x = torch.rand(big_n, generator=g, dtype=torch.float64) * 3
    y = torch.exp(x) + 0.3 * torch.randn(big_n, generator=g, dtype=torch.float64)
    h = torch.stack([torch.ones(big_n, dtype=torch.float64), x], 1)
    h_bar = h.mean(0)
    b_census = torch.linalg.lstsq(h, y).solution
    scaled, biases = [], []
    for n in (3, 4, 6, 8):
        pi = torch.full((n,), n / big_n, dtype=torch.float64)
        greg_est, diff_est = [], []
        for s in itertools.combinations(range(big_n), n):
            s = list(s)
            greg_est.append(est.greg(y[s], h[s], h_bar, pi, big_n))
            diff_est.append(
                est.difference_estimator(y[s], h[s] @ b_census, h_bar @ b_census, pi, big_n)
            )
        torch.testing.assert_close(
            greg_est[0],
            torch.as_tensor(
                ref.greg(y[:n].numpy(), h[:n].numpy(), h_bar.numpy(), pi.numpy(), big_n)
            ),
            **EXACT,
        )
        torch.testing.assert_close(torch.stack(diff_est).mean(), y.mean(), **EXACT)
        bias = float(torch.stack(greg_est).mean() - y.mean())
        biases.append(abs(bias))
        scaled.append(bias * n / (1 - n / big_n))
    assert all(a > b for a, b in zip(biases, biases[1:])), biases
    assert max(scaled) / min(scaled) < 1.6, scaled  # all negative: ratio of magnitudes
    assert biases[-1] > 0.05


def test_greg_variance_estimators_are_biased_low():
    """Exact expectation of both GREG variance estimators over all SRS samples (N = 12) against
    the exact MSE of GREG, with q = 2 and 3 regressors. Measured E[V̂_g]/MSE: 0.21, 0.43, 0.59
    (q = 2) and 0.09, 0.23, 0.31 (q = 3) at n = 4, 6, 8; V̂_e lower at every n. Asserted: both
    below 1 (biased low), increasing in n (consistent), V̂_g >= V̂_e on average, and more bias
    with more regressors at each n (the values quoted in ``greg_variance``'s docstring)."""
    big_n = 12
    g = torch.Generator().manual_seed(0)
    x = torch.rand(big_n, generator=g, dtype=torch.float64) * 3
    y = torch.exp(x) + 0.3 * torch.randn(big_n, generator=g, dtype=torch.float64)
    ratios = {}
    for q in (2, 3):
        h = torch.stack([torch.ones(big_n, dtype=torch.float64), x, x**2][:q], 1)
        h_bar = h.mean(0)
        for n in (4, 6, 8):
            pi = torch.full((n,), n / big_n, dtype=torch.float64)
            pij = torch.full((n, n), n * (n - 1) / (big_n * (big_n - 1)), dtype=torch.float64)
            pij.fill_diagonal_(n / big_n)
            e, vg, ve = [], [], []
            for s in itertools.combinations(range(big_n), n):
                s = list(s)
                e.append(est.greg(y[s], h[s], h_bar, pi, big_n))
                vg.append(var.greg_variance(y[s], h[s], h_bar, pi, pij, big_n))
                ve.append(var.greg_variance(y[s], h[s], h_bar, pi, pij, big_n, residuals="e"))
            mse = float(((torch.stack(e) - y.mean()) ** 2).mean())
            ratios[q, n] = (
                float(torch.stack(vg).mean()) / mse,
                float(torch.stack(ve).mean()) / mse,
            )
    for q in (2, 3):
        g_r = [ratios[q, n][0] for n in (4, 6, 8)]
        e_r = [ratios[q, n][1] for n in (4, 6, 8)]
        assert all(r < 1 for r in g_r + e_r), ratios
        assert g_r == sorted(g_r) and e_r == sorted(e_r), ratios
        assert all(a >= b for a, b in zip(g_r, e_r)), ratios
    assert all(ratios[3, n][0] < ratios[2, n][0] for n in (4, 6, 8)), ratios
    assert abs(ratios[2, 4][0] - 0.211) < 0.005 and abs(ratios[3, 8][0] - 0.308) < 0.005, ratios
