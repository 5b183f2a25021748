r"""Model: Bayesian linear regression of per-example gradients on auxiliary data, in NumPyro.

The NumPyro twin of :mod:`probopt.models.auxiliary_regression`, the working model of
model-assisted gradient estimation. Example k has auxiliary data :math:`h_k \in \mathbb R^q`
(intercept included) and per-example gradient :math:`y_k \in \mathbb R^p`:

.. math::
    b_j \sim \mathcal N(0, \tau^2 I_q), \quad j = 1..p \qquad (B = [b_1, \dots, b_p]), \qquad
    y_k \mid h_k, B \sim \mathcal N(B^\top h_k, \sigma^2 I_p).

The posterior is conjugate, columns independent with a shared covariance:

.. math::
    \Sigma = \big(H^\top H/\sigma^2 + I/\tau^2\big)^{-1}, \qquad
    M = \big(H^\top H + (\sigma^2/\tau^2) I\big)^{-1} H^\top Y,

ridge regression with penalty :math:`\sigma^2/\tau^2` (:func:`closed_form_posterior`);
:func:`guide` is the matching variational family (a multivariate normal per column with a shared
Cholesky factor), which SVI fits (:func:`fit_svi`).

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992.
    Pohjankukka & Heikkonen, `Stochastic Gradient Optimization with Model-Assisted Sampling
    <https://arxiv.org/abs/2606.27171>`_, 2026.
    Bishop, *Pattern Recognition and Machine Learning*, 2006, §3.3.

Example:
    >>> h, y, b = make_data(0, n=50)
    >>> mean, cov = closed_form_posterior(h, y, sigma=0.5)
    >>> mean.shape, cov.shape, bool(abs(mean - b).max() < 0.3)
    ((3, 4), (3, 3), True)
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.distributions import constraints
from numpyro.infer import SVI, TraceMeanField_ELBO

__all__ = ["closed_form_posterior", "fit_svi", "guide", "main", "make_data", "model"]

Array = jax.Array


def model(
    h: Array,
    y: Array | None = None,
    *,
    num_coords: int | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> Array:
    """The generative model: ``h`` is ``(n, q)``, ``y`` is ``(n, p)`` or None (then pass
    ``num_coords=p``). Site ``"B"`` holds :math:`B^\\top`, one row per gradient coordinate."""
    n, q = h.shape
    p = y.shape[1] if y is not None else num_coords
    zeros = jnp.zeros(q, h.dtype)
    eye = jnp.eye(q, dtype=h.dtype)
    with numpyro.plate("coords", p):
        b = numpyro.sample("B", dist.MultivariateNormal(zeros, scale_tril=prior_scale * eye))
    with numpyro.plate("data", n):
        return numpyro.sample("y", dist.Normal(h @ b.T, sigma).to_event(1), obs=y)


def guide(
    h: Array,
    y: Array | None = None,
    *,
    num_coords: int | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> None:
    """Columns independent, each ``N(loc_j, L L^T)`` with one shared Cholesky factor ``L``: the
    family of the exact posterior."""
    q = h.shape[1]
    p = y.shape[1] if y is not None else num_coords
    loc = numpyro.param("B_loc", jnp.zeros((p, q), h.dtype))
    scale_tril = numpyro.param(
        "B_scale_tril", 0.1 * jnp.eye(q, dtype=h.dtype), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("coords", p):
        numpyro.sample("B", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def closed_form_posterior(
    h: Array, y: Array, *, sigma: float = 1.0, prior_scale: float = 10.0
) -> tuple[Array, Array]:
    """Exact posterior ``(M, Sigma)``: mean ``(q, p)`` and the shared column covariance."""
    q = h.shape[1]
    precision = h.T @ h / sigma**2 + jnp.eye(q, dtype=h.dtype) / prior_scale**2
    factor = jsl.cho_factor(precision, lower=True)
    cov = jsl.cho_solve(factor, jnp.eye(q, dtype=h.dtype))
    mean = jsl.cho_solve(factor, h.T @ y / sigma**2)
    return mean, cov


def make_data(
    seed: int = 0, *, n: int = 200, q: int = 3, p: int = 4, sigma: float = 0.5
) -> tuple[Array, Array, Array]:
    """Synthetic data ``h = [1, N(0, I)]``, ``y = h B + N(0, sigma^2)``; returns ``(h, y, B)``
    (drawn with NumPy, returned as JAX arrays in the default float dtype)."""
    rng = np.random.default_rng(seed)
    h = np.concatenate([np.ones((n, 1)), rng.standard_normal((n, q - 1))], 1)
    b = rng.standard_normal((q, p))
    y = h @ b + sigma * rng.standard_normal((n, p))
    dtype = jnp.result_type(float)
    return jnp.asarray(h, dtype), jnp.asarray(y, dtype), jnp.asarray(b, dtype)


def fit_svi(
    h: Array,
    y: Array,
    *,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
    num_steps: int = 2000,
    lr: float = 0.05,
    num_particles: int = 16,
    seed: int = 0,
) -> tuple[Array, Array]:
    """Fit :func:`guide` by SVI (mean-field ELBO with the analytic Gaussian KL, Adam with the
    learning rate decayed to 1 %); returns ``(loc (q, p), covariance (q, q))``."""
    optim = optax.adam(optax.exponential_decay(lr, num_steps, 0.01))
    svi = SVI(model, guide, optim, TraceMeanField_ELBO(num_particles=num_particles))
    params = svi.run(
        jax.random.PRNGKey(seed), num_steps, h, y, sigma=sigma, prior_scale=prior_scale,
        progress_bar=False,
    ).params  # fmt: skip
    tril = params["B_scale_tril"]
    return params["B_loc"].T, tril @ tril.T


def main(args: argparse.Namespace) -> dict[str, Any]:
    h, y, _ = make_data(args.seed, n=args.n, sigma=args.sigma)
    mean, cov = closed_form_posterior(h, y, sigma=args.sigma, prior_scale=args.prior_scale)
    loc, cov_svi = fit_svi(h, y, sigma=args.sigma, prior_scale=args.prior_scale,
                           num_steps=args.num_steps, lr=args.lr, seed=args.seed)  # fmt: skip
    sd = jnp.sqrt(jnp.diag(cov))[:, None]
    out = {
        "svi error in posterior sd": float(jnp.abs((loc - mean) / sd).max()),
        "svi / closed-form covariance, diagonal": (jnp.diag(cov_svi) / jnp.diag(cov)).tolist(),
    }
    print(f"posterior mean (closed form):\n{mean}")
    for name, value in out.items():
        print(f"{name}: {value}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Bayesian regression of gradients on h_k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--prior-scale", type=float, default=10.0)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.05)
    main(parser.parse_args())
