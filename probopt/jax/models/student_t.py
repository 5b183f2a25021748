r"""Model: heavy-tailed gradient noise in NumPyro, a worked example of a user-defined model.

The NumPyro twin of :mod:`probopt.models.student_t`: VSGD's model
(:mod:`probopt.jax.models.vsgd`) with a Student-t observation in place of the Normal,

.. math::
    w_g \sim \mathrm{Gamma}(\gamma, \gamma), \quad
    w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g\gamma), \quad
    g_t \sim \mathcal N(\mu_{t-1}, w_g^{-1}), \quad
    \hat g_t \sim \mathrm{StudentT}_\nu(g_t, w_{\hat g}^{-1/2}).

Under the Student-t likelihood an outlying minibatch gradient moves the posterior of the true
gradient less than under the Normal one; as ν → ∞ the model becomes VSGD's. There is no closed
form: the guides are VSGD's (the latents are the same) and SVI fits them.

References:
    Simsekli, Sagun & Gürbüzbalaban, `A Tail-Index Analysis of Stochastic Gradient Noise in Deep
    Neural Networks <https://arxiv.org/abs/1901.06053>`_, ICML 2019.
    Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
    Networks <https://arxiv.org/abs/2404.06549>`_, 2024.

Example:
    >>> import jax.numpy as jnp, numpyro
    >>> latents = {"w_g": jnp.ones(3), "w_ghat": jnp.ones(3), "g": jnp.zeros(3)}
    >>> fixed = numpyro.handlers.substitute(model, data=latents)   # the Gamma(γ, γ) prior is
    >>> tr = numpyro.handlers.trace(fixed).get_trace(jnp.zeros(3), jnp.zeros(3), df=4.0)
    >>> type(tr["g_hat"]["fn"]).__name__, tr["g_hat"]["is_observed"]   # too flat to sample
    ('StudentT', True)
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from probopt.jax.models.vsgd import LOCAL_PARAMS, make_data
from probopt.jax.models.vsgd import guide as _vsgd_guide
from probopt.jax.models.vsgd import local_guide as _vsgd_local_guide

__all__ = ["LOCAL_PARAMS", "guide", "local_guide", "model"]


def model(
    g_hat: jax.Array,
    prev_mean: jax.Array,
    *,
    df: float = 3.0,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    **guide_args: Any,
) -> None:
    """VSGD's model with a Student-t observation of ``df`` degrees of freedom."""
    del guide_args
    gamma, k_g = prior_strength, variance_ratio
    with numpyro.plate("coords", g_hat.shape[-1], dim=-1):
        w_g = numpyro.sample("w_g", dist.Gamma(gamma, gamma))
        w_ghat = numpyro.sample("w_ghat", dist.Gamma(gamma, k_g * gamma))
        g = numpyro.sample("g", dist.Normal(prev_mean, jax.lax.rsqrt(w_g)))
        numpyro.sample("g_hat", dist.StudentT(df, g, jax.lax.rsqrt(w_ghat)), obs=g_hat)


def guide(g_hat: jax.Array, prev_mean: jax.Array, *, df: float = 3.0, **kwargs: Any) -> None:
    """VSGD's learnable mean-field guide; ``df`` is the model's."""
    del df
    _vsgd_guide(g_hat, prev_mean, **kwargs)


def local_guide(g_hat: jax.Array, prev_mean: jax.Array, *, df: float = 3.0, **kwargs: Any) -> None:
    """VSGD's local guide (Gamma factors fixed, ``g_loc``/``g_scale`` learnable)."""
    del df
    _vsgd_local_guide(g_hat, prev_mean, **kwargs)


def main(args: argparse.Namespace) -> dict[str, float]:
    """Closed-form VSGD steps on a stream, then one outlying gradient: the local posterior mean
    under the Normal model (closed form) and under the Student-t model (SVI)."""
    from numpyro.infer import SVI, TraceMeanField_ELBO

    from probopt.jax.models.vsgd import JITTER, cavi_update, init_state, local_update

    stream = make_data(args.seed, dim=4, steps=8)
    state = init_state(stream[0])
    for g in stream[:-1]:
        state, _ = cavi_update(state, g)
    shape = jnp.full_like(stream[0], 1e-8 + 0.5 + JITTER / 2)
    g_hat = stream[-1].at[0].add(5.0)  # one outlying observation
    kw = dict(shape=shape, rate_g=state.rate_g, rate_ghat=state.rate_ghat, df=args.df)
    svi = SVI(model, local_guide, numpyro.optim.Adam(0.05), TraceMeanField_ELBO(num_particles=64))
    params = svi.run(
        jax.random.PRNGKey(args.seed), args.num_steps, g_hat, state.mean, progress_bar=False, **kw
    ).params
    normal, _ = local_update(g_hat, state.mean, shape / state.rate_g, shape / state.rate_ghat)
    out = {
        "previous mean": float(state.mean[0]),
        "observation": float(g_hat[0]),
        "normal posterior mean": float(normal[0]),
        "student-t posterior mean (SVI)": float(params["g_loc"][0]),
    }
    print(f"after {args.num_steps} steps of SVI, coordinate 0:")
    for name, value in out.items():
        print(f"  {name:32s} {value:.4f}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=500)
    parser.add_argument("--df", type=float, default=3.0)
    main(parser.parse_args())
