"""The NumPyro finite-population and auxiliary-regression models: closed forms (= the Pyro twins',
= GREG, = ridge), and NumPyro's SVI reaches them."""

import argparse
import importlib
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import probopt.models.auxiliary_regression as torch_ar  # noqa: E402
import probopt.models.finite_population as torch_fp  # noqa: E402
import torch  # noqa: E402

from probopt.jax.estimators import greg  # noqa: E402

fp = importlib.import_module("probopt.jax.models.finite_population")
ar = importlib.import_module("probopt.jax.models.auxiliary_regression")


def _t(x):
    return torch.tensor(np.asarray(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_flat_prior_posterior_mean_equals_greg_under_srs(x64, seed):
    """SRS, intercept in h, c_k = 1, flat prior: the BLUP is the JAX GREG estimate (1e-10)."""
    data = fp.make_data(seed, population_size=150, sample_size=12, num_outputs=3)
    s = data["sample"]

    @jax.jit  # one compilation instead of one per eager operation
    def estimates(h, y, pi):
        blup = fp.posterior_population_mean(h, s, y[s], prior_scale=math.inf)
        design_based = greg(y[s], h[s], h.mean(0), pi, h.shape[0])
        return blup, design_based, h.mean(0) @ jnp.linalg.lstsq(h[s], y[s])[0]

    blup, design_based, least_squares = estimates(data["h"], data["y"], data["pi"])
    np.testing.assert_allclose(blup, design_based, rtol=0, atol=1e-10)
    np.testing.assert_allclose(blup, least_squares, rtol=0, atol=1e-10)


def test_closed_forms_match_the_pyro_twin(x64):
    """Same data, float64: posterior mean, covariance and population mean equal the Pyro
    module's (1e-10; different LAPACK calls), with c_k != 1 and a finite prior."""
    data = fp.make_data(3, population_size=60, sample_size=9)
    h, s, y = data["h"], data["sample"], data["y"]
    c = 0.5 + jnp.abs(h[:, 1])
    kw = dict(sigma=0.7, prior_scale=2.0)

    @jax.jit
    def closed_forms(h, y, c):
        return (*fp.posterior(h, s, y[s], c=c, **kw),
                fp.posterior_population_mean(h, s, y[s], c=c, **kw))  # fmt: skip

    loc, cov, est = closed_forms(h, y, c)
    t_loc, t_cov = torch_fp.posterior(_t(h), _t(s), _t(y[s]), c=_t(c), **kw)
    np.testing.assert_allclose(loc, t_loc.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov, t_cov.numpy(), rtol=1e-10, atol=1e-12)
    t_est = torch_fp.posterior_population_mean(_t(h), _t(s), _t(y[s]), c=_t(c), **kw)
    np.testing.assert_allclose(est, t_est.numpy(), rtol=1e-10, atol=1e-12)


def test_model_trace_population_mean_is_the_sum_over_u():
    """The deterministic site is the mean over U of observed and simulated values (float32:
    1e-5 for sums of 30 values of size ~3)."""
    data = fp.make_data(0, population_size=30, sample_size=5)
    h, s, y = data["h"], data["sample"], data["y"]

    @jax.jit
    def trace(key):
        tr = numpyro.handlers.trace(numpyro.handlers.seed(fp.model, key)).get_trace(h, s, y[s])
        return {k: v["value"] for k, v in tr.items()}

    values = trace(jax.random.PRNGKey(0))
    y_rest = values["y_rest"]
    assert values["beta"].shape == (3, 2) and y_rest.shape == (25, 2)
    np.testing.assert_array_equal(values["y_sample"], y[s])  # observed
    np.testing.assert_allclose(values["population_mean"], (y[s].sum(0) + y_rest.sum(0)) / 30,
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_svi_reaches_the_closed_form_posterior_mean():
    """300 SVI steps in one lax.scan reach the conjugate answer: the population mean within
    0.25 posterior sd of E[ybar_U | beta] (the Pyro test's tolerance; the minibatch mean is
    3.2 sd away, so the check has teeth) and the mean-field scales within 25 % of
    Lambda_jj^(-1/2). float32; measured over 3 SVI seeds: 0.05-0.12 sd and 6-20 %."""
    data = fp.make_data(0)
    h, s, y = data["h"], data["sample"], data["y"]
    _, cov = fp.posterior(h, s, y[s])
    closed = fp.posterior_population_mean(h, s, y[s])
    rest = np.ones(h.shape[0], bool)
    rest[s] = False
    h_rest_sum = h[rest].sum(0)
    sd = float(jnp.sqrt(h_rest_sum @ cov @ h_rest_sum) / h.shape[0])
    fit = fp.fit_svi(h, s, y[s], num_steps=300, seed=0)
    assert float(jnp.abs(fit["population_mean"] - closed).max()) < 0.25 * sd
    assert float(jnp.abs(y[s].mean(0) - closed).max()) > 2 * sd
    mean_field = jnp.diag(jnp.linalg.inv(cov)) ** -0.5
    assert float(jnp.abs(fit["beta_scale"] / mean_field[:, None] - 1).max()) < 0.25


def test_auxiliary_closed_form_is_ridge_and_matches_the_pyro_twin(x64):
    h, y, _ = ar.make_data(0)
    sigma, tau = 0.5, 2.0
    mean, cov = ar.closed_form_posterior(h, y, sigma=sigma, prior_scale=tau)
    a = h.T @ h + (sigma / tau) ** 2 * jnp.eye(3)
    np.testing.assert_allclose(mean, jnp.linalg.solve(a, h.T @ y), atol=1e-12, rtol=0)
    np.testing.assert_allclose(cov, sigma**2 * jnp.linalg.inv(a), atol=1e-12, rtol=0)
    t_mean, t_cov = torch_ar.closed_form_posterior(_t(h), _t(y), sigma=sigma, prior_scale=tau)
    np.testing.assert_allclose(mean, t_mean.numpy(), atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(cov, t_cov.numpy(), atol=1e-12, rtol=1e-10)
    # a vanishing prior is ordinary least squares
    ols, _ = ar.closed_form_posterior(h, y, sigma=sigma, prior_scale=1e7)
    np.testing.assert_allclose(ols, jnp.linalg.lstsq(h, y)[0], atol=1e-9, rtol=0)


@pytest.mark.slow
def test_auxiliary_svi_reaches_the_closed_form_posterior():
    """The guide family contains the exact posterior: 500 SVI steps (16 particles, lr 0.1: these
    coefficients are larger than the Pyro test's data) put the means within 0.25 posterior sd
    and the covariance diagonal within 15 % (the Pyro test's tolerances). float32; measured
    over 3 seeds: 0.04-0.06 sd and 0-1.5 %."""
    h, y, _ = ar.make_data(0)
    mean, cov = ar.closed_form_posterior(h, y, sigma=0.5)
    loc, cov_svi = ar.fit_svi(h, y, sigma=0.5, num_steps=500, num_particles=16, lr=0.1, seed=0)
    sd = jnp.sqrt(jnp.diag(cov))[:, None]
    assert float(jnp.abs((loc - mean) / sd).max()) < 0.25
    ratio = jnp.diag(cov_svi) / jnp.diag(cov)
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), ratio


def test_auxiliary_model_and_guide_trace_shapes():
    h, y, _ = ar.make_data(0, n=10, q=3, p=4)

    def shapes(fn, *args, **kwargs):  # traced abstractly: nothing is compiled
        def values():
            tr = numpyro.handlers.trace(numpyro.handlers.seed(fn, 0)).get_trace(*args, **kwargs)
            return {k: v["value"] for k, v in tr.items() if v["type"] == "sample"}

        return {k: v.shape for k, v in jax.eval_shape(values).items()}

    # one row of B per gradient coordinate
    assert shapes(ar.model, h, num_coords=4, sigma=0.5) == {"B": (4, 3), "y": (10, 4)}
    assert shapes(ar.guide, h, y) == {"B": (4, 3)}


@pytest.mark.slow  # each script compiles an SVI loop (~5 s of CPU each)
def test_mains_run(capsys):
    fp.main(argparse.Namespace(seed=0, num_steps=2, population_size=40, sample_size=8,
                               prior_scale=10.0))  # fmt: skip
    ar.main(argparse.Namespace(seed=0, n=30, sigma=0.5, prior_scale=10.0, num_steps=2, lr=0.05))
    out = capsys.readouterr().out
    assert "GREG" in out and "svi error" in out
