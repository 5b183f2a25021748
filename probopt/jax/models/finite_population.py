r"""Model: a finite population under a linear superpopulation model, in NumPyro.

The NumPyro twin of :mod:`probopt.models.finite_population` (same functions, arguments and
closed forms). Unit k of the population :math:`U = \{1..N\}` has auxiliary values
:math:`h_k \in \mathbb R^q` (known for every unit) and a study value :math:`y_k \in \mathbb R^p`
(a per-example gradient) observed only on the minibatch s:

.. math::
    \beta \sim \mathcal N(0, \tau^2)\ \text{elementwise}, \qquad
    y_k \mid h_k, \beta \sim \mathcal N_p(\beta^T h_k,\ c_k \sigma^2 I), \qquad
    s \sim p(s \mid h)\ \text{(ignorable)}.

Every column of β has the Gaussian posterior :math:`\mathcal N(\tilde\beta_{\cdot j},
\Lambda^{-1})`, :math:`\Lambda = \tau^{-2} I + \sigma^{-2} H_s^T C_s^{-1} H_s`,
:math:`\tilde\beta = \Lambda^{-1}\sigma^{-2} H_s^T C_s^{-1} Y_s`, and the posterior mean of the
population mean is :math:`N^{-1}(\sum_s y_k + \tilde\beta^T \sum_{U \setminus s} h_k)`; in the
flat-prior limit under SRSWOR with an intercept in h and :math:`c_k = 1` it equals the GREG
estimator :func:`probopt.jax.estimators.greg` exactly.

``sample`` must be concrete (a NumPy array or a concrete JAX array): it fixes the shapes of the
sampled and unsampled parts.

References:
    Royall, `On finite population sampling theory under certain linear regression models
    <https://doi.org/10.1093/biomet/57.2.377>`_, Biometrika, 1970.
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992, chapter 6.

Example:
    >>> import math
    >>> data = make_data(seed=0)
    >>> s = data["sample"]
    >>> est = posterior_population_mean(data["h"], s, data["y"][s], prior_scale=math.inf)
    >>> est.shape, bool(abs(est - data["y"].mean(0)).max() < 0.5)
    ((2,), True)
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, TraceMeanField_ELBO

from probopt.jax.estimators import greg

__all__ = [
    "fit_svi",
    "guide",
    "main",
    "make_data",
    "model",
    "posterior",
    "posterior_population_mean",
]

Array = jax.Array


def _split(h: Array, sample: Any, c: Array | None) -> tuple[Array, Array, Array, Array]:
    """Auxiliary values and scales c_k of the sampled units and of the rest of U."""
    idx = np.asarray(sample)
    in_s = np.zeros(h.shape[0], dtype=bool)
    in_s[idx] = True
    rest = np.flatnonzero(~in_s)
    c = jnp.ones(h.shape[0], h.dtype) if c is None else jnp.asarray(c)
    return h[idx], h[rest], c[idx], c[rest]


def model(
    h: Array,
    sample: Any,
    y_sample: Array | None = None,
    *,
    c: Array | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
    num_outputs: int = 1,
) -> Array:
    """β ~ N(0, τ²); y_k ~ N(βᵀh_k, c_k σ²) for every k in U; y observed on the sample s.

    Args:
        h: auxiliary values of all N units, (N, q).
        sample: indices of the sampled units s, (n,) (concrete).
        y_sample: observed values of the sampled units, (n, p); ``None`` simulates them.
        c: heteroscedasticity constants c_k of all units, (N,); ``None`` means 1.
        sigma: the residual scale σ (known).
        prior_scale: τ.
        num_outputs: p when ``y_sample`` is ``None``.

    Returns:
        The population mean ȳ_U (a ``population_mean`` deterministic site).
    """
    h_s, h_r, c_s, c_r = _split(h, sample, c)
    p = y_sample.shape[-1] if y_sample is not None else num_outputs
    beta = numpyro.sample(
        "beta", dist.Normal(jnp.zeros((h.shape[1], p), h.dtype), prior_scale).to_event(2)
    )
    with numpyro.plate("sampled_units", h_s.shape[0]):
        y_s = numpyro.sample(
            "y_sample",
            dist.Normal(h_s @ beta, sigma * jnp.sqrt(c_s)[:, None]).to_event(1),
            obs=y_sample,
        )
    with numpyro.plate("unsampled_units", h_r.shape[0]):
        y_r = numpyro.sample(
            "y_rest", dist.Normal(h_r @ beta, sigma * jnp.sqrt(c_r)[:, None]).to_event(1)
        )
    return numpyro.deterministic("population_mean", (y_s.sum(-2) + y_r.sum(-2)) / h.shape[0])


def guide(
    h: Array,
    sample: Any,
    y_sample: Array | None = None,
    *,
    c: Array | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
    num_outputs: int = 1,
) -> None:
    """q(β) = N(β_loc, β_scale²) elementwise; q(y_rest | β) = p(y_rest | β), the exact
    conditional (given β the unobserved units are independent of the observed ones)."""
    _, h_r, _, c_r = _split(h, sample, c)
    p = y_sample.shape[-1] if y_sample is not None else num_outputs
    loc = numpyro.param("beta_loc", jnp.zeros((h.shape[1], p), h.dtype))
    scale = numpyro.param(
        "beta_scale", jnp.full((h.shape[1], p), 0.1, h.dtype), constraint=dist.constraints.positive
    )
    beta = numpyro.sample("beta", dist.Normal(loc, scale).to_event(2))
    with numpyro.plate("unsampled_units", h_r.shape[0]):
        numpyro.sample(
            "y_rest", dist.Normal(h_r @ beta, sigma * jnp.sqrt(c_r)[:, None]).to_event(1)
        )


def posterior(
    h: Array,
    sample: Any,
    y_sample: Array,
    *,
    c: Array | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> tuple[Array, Array]:
    """Closed-form posterior of β: the mean β̃ (q, p) and the covariance Λ⁻¹ (q, q) of each
    column; ``prior_scale=math.inf`` is the flat prior (weighted least squares)."""
    h_s, _, c_s, _ = _split(h, sample, c)
    precision = (h_s.T / c_s) @ h_s / sigma**2
    if math.isfinite(prior_scale):
        precision = precision + jnp.eye(h.shape[1], dtype=h.dtype) / prior_scale**2
    cov = jnp.linalg.inv(precision)
    loc = cov @ ((h_s.T / c_s) @ y_sample) / sigma**2
    return loc, cov


def posterior_population_mean(
    h: Array,
    sample: Any,
    y_sample: Array,
    *,
    c: Array | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> Array:
    """E[ȳ_U | y_s] = N⁻¹ (Σ_s y_k + β̃ᵀ Σ_{U∖s} h_k); the BLUP when ``prior_scale=math.inf``."""
    loc, _ = posterior(h, sample, y_sample, c=c, sigma=sigma, prior_scale=prior_scale)
    _, h_r, _, _ = _split(h, sample, c)
    return (y_sample.sum(0) + h_r.sum(0) @ loc) / h.shape[0]


def make_data(
    seed: int = 0, population_size: int = 200, sample_size: int = 20, num_outputs: int = 2
) -> dict[str, Any]:
    """A population from the model (h = (1, x1, x2), c_k = 1, σ = 1) and one SRSWOR sample.

    Drawn with NumPy (``numpy.random.default_rng(seed)``; instant, no compilation), returned as
    JAX arrays in the default float dtype; ``sample`` stays a NumPy array (concrete).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((population_size, 2))
    h = np.concatenate([np.ones((population_size, 1)), x], 1)
    beta = rng.standard_normal((3, num_outputs))
    sigma = 1.0
    y = h @ beta + sigma * rng.standard_normal((population_size, num_outputs))
    sample = np.sort(rng.choice(population_size, sample_size, replace=False))
    dtype = jnp.result_type(float)
    return {
        "h": jnp.asarray(h, dtype),
        "y": jnp.asarray(y, dtype),
        "beta": jnp.asarray(beta, dtype),
        "sigma": sigma,
        "sample": sample,
        "pi": jnp.full((sample_size,), sample_size / population_size, dtype),
    }


def fit_svi(
    h: Array,
    sample: Any,
    y_sample: Array,
    *,
    num_steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
    **model_kwargs: Any,
) -> dict[str, Array]:
    """Fit :func:`guide` by SVI; return its parameters and its posterior mean of ȳ_U.

    As the Pyro twin: the mean-field ELBO, Adam with the learning rate decayed geometrically to
    1 % over the run, and ``beta_loc`` averaged over the second half of the run
    (Polyak–Ruppert averaging), in one ``lax.scan``.

    Returns:
        ``{"population_mean", "beta_loc", "beta_scale"}``.
    """
    optim = optax.adam(optax.exponential_decay(learning_rate, num_steps, 0.01))
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    state = svi.init(jax.random.PRNGKey(seed), h, sample, y_sample, **model_kwargs)
    start = num_steps // 2

    def body(carry: tuple, step: Array) -> tuple:
        state, loc_sum = carry
        state, _ = svi.update(state, h, sample, y_sample, **model_kwargs)
        loc = svi.get_params(state)["beta_loc"]
        return (state, loc_sum + jnp.where(step >= start, loc, 0.0)), None

    zeros = jnp.zeros_like(svi.get_params(state)["beta_loc"])
    (state, loc_sum), _ = jax.lax.scan(body, (state, zeros), jnp.arange(num_steps))
    loc = loc_sum / (num_steps - start)
    _, h_r, _, _ = _split(h, sample, model_kwargs.get("c"))
    return {
        "population_mean": (y_sample.sum(0) + h_r.sum(0) @ loc) / h.shape[0],
        "beta_loc": loc,
        "beta_scale": svi.get_params(state)["beta_scale"],
    }


def main(args: argparse.Namespace) -> dict[str, Array]:
    data = make_data(args.seed, args.population_size, args.sample_size)
    h, s = data["h"], data["sample"]
    y_s = data["y"][s]
    closed = posterior_population_mean(h, s, y_s, sigma=data["sigma"], prior_scale=args.prior_scale)
    svi = fit_svi(h, s, y_s, num_steps=args.num_steps, seed=args.seed, sigma=data["sigma"],
                  prior_scale=args.prior_scale)["population_mean"]  # fmt: skip
    blup = posterior_population_mean(h, s, y_s, sigma=data["sigma"], prior_scale=math.inf)
    g = greg(y_s, h[s], h.mean(0), data["pi"], h.shape[0])
    out = {
        "population mean": data["y"].mean(0),
        "posterior mean (closed form)": closed,
        "posterior mean (SVI)": svi,
        "BLUP (flat prior)": blup,
        "GREG": g,
        "minibatch mean": y_s.mean(0),
    }
    for name, value in out.items():
        print(f"{name:30s} {[round(float(v), 4) for v in value]}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Finite-population model: BLUP, GREG and SVI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=300)
    parser.add_argument("--population-size", type=int, default=200)
    parser.add_argument("--sample-size", type=int, default=20)
    parser.add_argument("--prior-scale", type=float, default=10.0)
    main(parser.parse_args())
