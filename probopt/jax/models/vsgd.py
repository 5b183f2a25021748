r"""Model: VSGD, the true gradient as a latent variable, in NumPyro (Chen et al., 2024).

The NumPyro twin of :mod:`probopt.models.vsgd` (same functions, arguments and closed forms).
Per gradient coordinate (a plate of size D):

.. math::
    w_g \sim \mathrm{Gamma}(\gamma, \gamma), \qquad
    w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g\gamma), \qquad
    g_t \mid w_g \sim \mathcal N(\mu_{t-1}, w_g^{-1}), \qquad
    \hat g_t \mid g_t, w_{\hat g} \sim \mathcal N(g_t, w_{\hat g}^{-1}),

with the mean-field guide :math:`\mathcal N(\mu_t, \sigma_t^2)\,\mathrm{Gamma}(a_{t,g},
b_{t,g})\,\mathrm{Gamma}(a_{t,\hat g}, b_{t,\hat g})`. Stochastic variational inference has
closed forms: the local step :func:`local_update`
(:math:`\sigma_t^{-2} = \mathbb E[w_g] + \mathbb E[w_{\hat g}]`,
:math:`\mu_t = \sigma_t^2(\mathbb E[w_g]\mu_{t-1} + \mathbb E[w_{\hat g}]\hat g_t)`), the global
optimum :func:`global_optimum` (:math:`\hat a = \gamma + \tfrac12`,
:math:`\hat b_g = \gamma + \tfrac12\mathbb E_q[(g_t-\mu_{t-1})^2]`,
:math:`\hat b_{\hat g} = K_g\gamma + \tfrac12\mathbb E_q[(\hat g_t-g_t)^2]`), reached by a
Robbins–Monro step :math:`b_t = (1-\rho_t)b_{t-1} + \rho_t\hat b` (:func:`cavi_update`).

:func:`cavi_update` is the step :func:`probopt.jax.scale_by_vsgd` takes on every coordinate
(with the official code's jitter δ); the tests check that NumPyro's SVI on :func:`model` with
:func:`local_guide` / :func:`global_guide` reaches :func:`local_update` / :func:`global_optimum`,
and that :func:`cavi_update` equals both the transform's state and the Pyro twin's.

References:
    Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
    Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (TMLR 2025).
    Hoffman, Blei, Wang & Paisley, `Stochastic Variational Inference
    <https://jmlr.org/papers/v14/hoffman13a.html>`_, JMLR 2013.

Example:
    >>> import jax.numpy as jnp
    >>> s, var = cavi_update(init_state(jnp.zeros(2)), jnp.array([3.1, -6.2]))
    >>> s.mean.round(6)  # the first step shrinks the observation by 1 / (1 + K_g)
    Array([ 0.1, -0.2], dtype=float32)
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = [
    "JITTER",
    "LOCAL_PARAMS",
    "VSGDState",
    "cavi_update",
    "global_guide",
    "global_optimum",
    "guide",
    "init_state",
    "local_guide",
    "local_update",
    "make_data",
    "model",
]

JITTER = 1e-4  # the official code's δ (Note [probopt: the hard-coded jitter δ])
LOCAL_PARAMS = ("g_loc", "g_scale")

Array = jax.Array


def model(
    g_hat: Array,
    prev_mean: Array,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    **guide_args: Any,
) -> None:
    """The generative model of one step over a plate of D gradient coordinates.

    ``guide_args`` (the guide's keyword arguments, which SVI passes to both) are ignored.
    """
    del guide_args
    gamma, k_g = prior_strength, variance_ratio
    with numpyro.plate("coords", g_hat.shape[-1], dim=-1):
        w_g = numpyro.sample("w_g", dist.Gamma(gamma, gamma))
        w_ghat = numpyro.sample("w_ghat", dist.Gamma(gamma, k_g * gamma))
        g = numpyro.sample("g", dist.Normal(prev_mean, jax.lax.rsqrt(w_g)))
        numpyro.sample("g_hat", dist.Normal(g, jax.lax.rsqrt(w_ghat)), obs=g_hat)


def guide(
    g_hat: Array,
    prev_mean: Array,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    **unused: Any,
) -> None:
    """The mean-field guide with learnable parameters, initialised at the official code's first
    step (shapes γ + ½ + δ/2, E_q[w_g] = (γ + δ/2)/γ, E_q[w_ĝ] = E_q[w_g]/K_g); ``g_loc`` and
    ``g_scale`` (:data:`LOCAL_PARAMS`) start at the previous mean and the prior scale."""
    del unused
    gamma, k_g = prior_strength, variance_ratio
    shape = gamma + 0.5 + JITTER / 2
    rate = shape * gamma / (gamma + JITTER / 2)
    positive = constraints.positive
    a_g = numpyro.param("w_g_shape", jnp.full_like(g_hat, shape), constraint=positive)
    b_g = numpyro.param("w_g_rate", jnp.full_like(g_hat, rate), constraint=positive)
    a_h = numpyro.param("w_ghat_shape", jnp.full_like(g_hat, shape), constraint=positive)
    b_h = numpyro.param("w_ghat_rate", jnp.full_like(g_hat, k_g * rate), constraint=positive)
    loc = numpyro.param("g_loc", jnp.asarray(prev_mean, g_hat.dtype))
    scale = numpyro.param(
        "g_scale", jnp.maximum(jnp.sqrt(jnp.full_like(g_hat, rate / shape)), 1e-6),
        constraint=positive,
    )  # fmt: skip
    with numpyro.plate("coords", g_hat.shape[-1], dim=-1):
        numpyro.sample("w_g", dist.Gamma(a_g, b_g))
        numpyro.sample("w_ghat", dist.Gamma(a_h, b_h))
        numpyro.sample("g", dist.Normal(loc, scale))


def local_guide(
    g_hat: Array, prev_mean: Array, *, shape: Array, rate_g: Array, rate_ghat: Array, **hyper: Any
) -> None:
    """The guide at step t with the Gamma factors held at their t−1 values: only ``g_loc`` and
    ``g_scale`` are learnable, and the ELBO's optimum over them is :func:`local_update`."""
    del hyper
    loc = numpyro.param("g_loc", g_hat)
    scale = numpyro.param(
        "g_scale", jnp.ones_like(g_hat) * jnp.maximum(jnp.std(g_hat, ddof=1), 1e-3),
        constraint=constraints.positive,
    )  # fmt: skip
    with numpyro.plate("coords", g_hat.shape[-1], dim=-1):
        numpyro.sample("w_g", dist.Gamma(shape, rate_g))
        numpyro.sample("w_ghat", dist.Gamma(shape, rate_ghat))
        numpyro.sample("g", dist.Normal(loc, scale))


def global_guide(g_hat: Array, prev_mean: Array, *, loc: Array, scale: Array, **hyper: Any) -> None:
    """The guide with q(g_t) = N(loc, scale²) held fixed and learnable Gamma factors: the ELBO's
    optimum over them is :func:`global_optimum`."""
    del hyper
    positive = constraints.positive
    ones = jnp.ones_like(g_hat)
    a_g = numpyro.param("w_g_shape", ones, constraint=positive)
    b_g = numpyro.param("w_g_rate", ones * 1e-2, constraint=positive)
    a_h = numpyro.param("w_ghat_shape", ones, constraint=positive)
    b_h = numpyro.param("w_ghat_rate", ones * 1e-2, constraint=positive)
    with numpyro.plate("coords", g_hat.shape[-1], dim=-1):
        numpyro.sample("w_g", dist.Gamma(a_g, b_g))
        numpyro.sample("w_ghat", dist.Gamma(a_h, b_h))
        numpyro.sample("g", dist.Normal(loc, scale))


# ------------------------------------------------------------------------------------------
# closed forms


def local_update(
    g_hat: Array, prev_mean: Array, precision_g: Array, precision_ghat: Array
) -> tuple[Array, Array]:
    """Coordinate ascent on q(g_t): (μ_t, σ_t²) given E[w_g], E[w_ĝ]."""
    variance = 1.0 / (precision_g + precision_ghat)
    return variance * (precision_g * prev_mean + precision_ghat * g_hat), variance


def global_optimum(
    g_hat: Array,
    prev_mean: Array,
    mean: Array,
    variance: Array,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
) -> tuple[float, Array, Array]:
    """Coordinate ascent on q(w_g), q(w_ĝ) given q(g_t) = N(mean, variance): (â, b̂_g, b̂_ĝ)."""
    gamma, k_g = prior_strength, variance_ratio
    rate_g = gamma + 0.5 * (variance + (mean - prev_mean) ** 2)
    rate_ghat = k_g * gamma + 0.5 * (variance + (mean - g_hat) ** 2)
    return gamma + 0.5, rate_g, rate_ghat


class VSGDState(NamedTuple):
    """Per-coordinate variational parameters after step ``step``."""

    mean: Array
    """μ_t."""
    rate_g: Array
    """b_{t,g}."""
    rate_ghat: Array
    """b_{t,ĝ}."""
    step: Array
    """Shape (), int32: t."""


def init_state(like: Array) -> VSGDState:
    """The state before the first step: zeros (overwritten at t = 1, where ρ = 1)."""
    zeros = jnp.zeros_like(like)
    return VSGDState(zeros, zeros, zeros, jnp.zeros([], jnp.int32))


def cavi_update(
    state: VSGDState,
    g_hat: Array,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    kappa1: float = 0.81,
    kappa2: float = 0.9,
) -> tuple[VSGDState, Array]:
    """One SVI step: local coordinate ascent, then the Robbins–Monro global step.

    Returns the new state and σ_t². The prior shape carries the official jitter (γ + δ/2), as
    does every later shape (γ + ½ + δ/2). Traceable (``jit``, ``lax.scan``).
    """
    gamma, k_g = prior_strength, variance_ratio
    t = state.step + 1
    first = t == 1
    shape0, shape = gamma + JITTER / 2, gamma + 0.5 + JITTER / 2
    safe_g = jnp.where(first, 1.0, state.rate_g)
    safe_h = jnp.where(first, 1.0, state.rate_ghat)
    precision_g = jnp.where(first, shape0 / gamma, shape / safe_g)
    precision_ghat = jnp.where(first, shape0 / (k_g * gamma), shape / safe_h)
    mean, variance = local_update(g_hat, state.mean, precision_g, precision_ghat)
    _, target_g, target_ghat = global_optimum(
        g_hat, state.mean, mean, variance, variance_ratio=k_g, prior_strength=gamma
    )
    tf = t.astype(jnp.result_type(g_hat))
    rho1, rho2 = tf**-kappa1, tf**-kappa2
    rate_g = (1 - rho1) * state.rate_g + rho1 * target_g
    rate_ghat = (1 - rho2) * state.rate_ghat + rho2 * target_ghat
    return VSGDState(mean, rate_g, rate_ghat, t), variance


def make_data(seed: int = 0, dim: int = 8, steps: int = 50) -> Array:
    """A stream of noisy gradients: a slowly drifting true gradient plus observation noise
    (drawn with NumPy, returned in the default float dtype)."""
    rng = np.random.default_rng(seed)
    drift = np.cumsum(0.01 * rng.standard_normal((steps, dim)), 0) + 0.1
    return jnp.asarray(drift + 0.1 * rng.standard_normal((steps, dim)), jnp.result_type(float))


def main(args: argparse.Namespace) -> VSGDState:
    stream = make_data(args.seed, steps=args.num_steps)

    def body(state: VSGDState, g_hat: Array) -> tuple[VSGDState, Array]:
        return cavi_update(state, g_hat)

    state, variances = jax.lax.scan(body, init_state(stream[0]), stream)
    beta = state.rate_ghat / (state.rate_g + state.rate_ghat)
    mu, sigma2 = float(jnp.abs(state.mean).mean()), float(variances[-1].mean())
    print(f"after {int(state.step)} steps: mean |mu| {mu:.4f}, mean beta {float(beta.mean()):.4f}, "
          f"mean sigma^2 {sigma2:.3e}")  # fmt: skip
    return state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=50)
    main(parser.parse_args())
