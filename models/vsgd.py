r"""Model: VSGD, the true gradient as a latent variable (Chen, Kuzina, Esmaeili & Tomczak, 2024).

Per gradient coordinate (all coordinates independent, a plate of size D):

.. math::
    w_g \sim \mathrm{Gamma}(\gamma, \gamma), \qquad
    w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g\gamma),

    g_t \mid w_g \sim \mathcal N(\mu_{t-1}, w_g^{-1}), \qquad
    \hat g_t \mid g_t, w_{\hat g} \sim \mathcal N(g_t, w_{\hat g}^{-1}),

where :math:`\mu_{t-1}` (the previous posterior mean) is a fixed input and :math:`\hat g_t` is the
observed minibatch gradient. The mean-field guide is

.. math::
    q(g_t)\,q(w_g)\,q(w_{\hat g}) = \mathcal N(\mu_t, \sigma_t^2)\,
    \mathrm{Gamma}(a_{t,g}, b_{t,g})\,\mathrm{Gamma}(a_{t,\hat g}, b_{t,\hat g}).

Stochastic variational inference on this conjugate-exponential model has closed forms:

* local step (coordinate ascent on q(g_t), the globals at their t−1 values):
  :math:`\sigma_t^{-2} = \mathbb E[w_g] + \mathbb E[w_{\hat g}]`,
  :math:`\mu_t = \sigma_t^2(\mathbb E[w_g]\mu_{t-1} + \mathbb E[w_{\hat g}]\hat g_t)`
  (:func:`local_update`);
* global step: the coordinate-ascent optimum given q(g_t),
  :math:`\hat a = \gamma + \tfrac12`,
  :math:`\hat b_g = \gamma + \tfrac12\mathbb E_q[(g_t-\mu_{t-1})^2]`,
  :math:`\hat b_{\hat g} = K_g\gamma + \tfrac12\mathbb E_q[(\hat g_t-g_t)^2]`
  (:func:`global_optimum`),
  reached by a natural-gradient step of size :math:`\rho_t = t^{-\kappa}`:
  :math:`b_t = (1-\rho_t)b_{t-1} + \rho_t\hat b` (:func:`cavi_update`).

:func:`cavi_update` is the whole step that :class:`probopt.optim.VSGD` performs on each
coordinate, including the official code's jitter δ in the Gamma shape
(Note [probopt: the hard-coded jitter δ] in :mod:`probopt.optim.vsgd`). The test suite checks
that Pyro's SVI on :func:`model` with :func:`local_guide` / :func:`global_guide` reaches
:func:`local_update` / :func:`global_optimum`, and that :func:`cavi_update` equals the optimizer's
reference step.

:func:`model` and :func:`guide` also run through the generic path,
:class:`probopt.optim.GradientModelOptimizer`, which fits the guide by a few SVI steps per
optimizer step instead of the closed form.

References:
    Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
    Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (TMLR 2025).
    Hoffman, Blei, Wang & Paisley, `Stochastic Variational Inference
    <https://jmlr.org/papers/v14/hoffman13a.html>`_, JMLR 2013.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = [
    "VSGDState",
    "cavi_update",
    "global_guide",
    "global_optimum",
    "guide",
    "init_state",
    "local_guide",
    "local_update",
    "model",
]

JITTER = 1e-4  # the official code's δ (Note [probopt: the hard-coded jitter δ])


def model(
    g_hat: Tensor, prev_mean: Tensor, *, variance_ratio=30.0, prior_strength=1e-8, **guide_args
):
    """The generative model of one step over a plate of D gradient coordinates.

    ``guide_args`` (the guide's keyword arguments, which SVI passes to both) are ignored.
    """
    del guide_args
    gamma, k_g = prior_strength, variance_ratio
    with pyro.plate("coords", g_hat.shape[-1], dim=-1):
        w_g = pyro.sample("w_g", dist.Gamma(gamma, gamma))
        w_ghat = pyro.sample("w_ghat", dist.Gamma(gamma, k_g * gamma))
        g = pyro.sample("g", dist.Normal(prev_mean, w_g.rsqrt()))
        pyro.sample("g_hat", dist.Normal(g, w_ghat.rsqrt()), obs=g_hat)


def guide(g_hat: Tensor, prev_mean: Tensor, *, variance_ratio=30.0, prior_strength=1e-8, **unused):
    """The mean-field guide with learnable parameters (for the generic SVI path).

    The Gamma shapes start at γ + ½ + δ/2, the value every later step gives them, and the rates
    so that E_q[w_g] = (γ + δ/2)/γ and E_q[w_ĝ] = E_q[w_g]/K_g: the precisions the official code
    uses at its first step, so that the first local step equals the closed form. The local
    parameters (``g_loc``, ``g_scale``) start at the previous mean and the prior predictive
    scale; the generic optimizer re-initialises them at every step (``LOCAL_PARAMS``).
    """
    del unused
    gamma, k_g = prior_strength, variance_ratio
    d = g_hat.shape[-1]
    shape = gamma + 0.5 + JITTER / 2
    rate = shape * gamma / (gamma + JITTER / 2)
    positive = constraints.positive
    a_g = pyro.param("w_g_shape", lambda: torch.full_like(g_hat, shape), constraint=positive)
    b_g = pyro.param("w_g_rate", lambda: torch.full_like(g_hat, rate), constraint=positive)
    a_h = pyro.param("w_ghat_shape", lambda: torch.full_like(g_hat, shape), constraint=positive)
    b_h = pyro.param("w_ghat_rate", lambda: torch.full_like(g_hat, k_g * rate), constraint=positive)
    loc = pyro.param("g_loc", lambda: prev_mean.detach().clone())
    scale = pyro.param(
        "g_scale", lambda: (b_g / a_g).detach().sqrt().clamp_min(1e-6), constraint=positive
    )
    with pyro.plate("coords", d, dim=-1):
        pyro.sample("w_g", dist.Gamma(a_g, b_g))
        pyro.sample("w_ghat", dist.Gamma(a_h, b_h))
        pyro.sample("g", dist.Normal(loc, scale))


LOCAL_PARAMS = ("g_loc", "g_scale")


def local_guide(g_hat: Tensor, prev_mean: Tensor, *, shape, rate_g, rate_ghat, **hyper):
    """The guide at step t with the global factors held at their t−1 values.

    Only ``g_loc`` and ``g_scale`` are learnable: maximising the ELBO over them is the local step,
    whose optimum is :func:`local_update`.
    """
    del hyper
    loc = pyro.param("g_loc", lambda: g_hat.detach().clone())
    scale = pyro.param(
        "g_scale", lambda: torch.ones_like(g_hat) * g_hat.std().clamp_min(1e-3),
        constraint=constraints.positive,
    )  # fmt: skip
    with pyro.plate("coords", g_hat.shape[-1], dim=-1):
        pyro.sample("w_g", dist.Gamma(shape, rate_g))
        pyro.sample("w_ghat", dist.Gamma(shape, rate_ghat))
        pyro.sample("g", dist.Normal(loc, scale))


def global_guide(g_hat: Tensor, prev_mean: Tensor, *, loc, scale, **hyper):
    """The guide with q(g_t) = N(loc, scale²) held fixed and learnable Gamma factors.

    Maximising the ELBO over the Gamma shapes and rates is the global coordinate-ascent step,
    whose optimum is :func:`global_optimum`.
    """
    del hyper
    positive = constraints.positive
    ones = torch.ones_like(g_hat)
    a_g = pyro.param("w_g_shape", lambda: ones.clone(), constraint=positive)
    b_g = pyro.param("w_g_rate", lambda: ones * 1e-2, constraint=positive)
    a_h = pyro.param("w_ghat_shape", lambda: ones.clone(), constraint=positive)
    b_h = pyro.param("w_ghat_rate", lambda: ones * 1e-2, constraint=positive)
    with pyro.plate("coords", g_hat.shape[-1], dim=-1):
        pyro.sample("w_g", dist.Gamma(a_g, b_g))
        pyro.sample("w_ghat", dist.Gamma(a_h, b_h))
        pyro.sample("g", dist.Normal(loc, scale))


# ------------------------------------------------------------------------------------------
# closed forms


def local_update(
    g_hat: Tensor, prev_mean: Tensor, precision_g: Tensor, precision_ghat: Tensor
) -> tuple[Tensor, Tensor]:
    """Coordinate ascent on q(g_t): returns (μ_t, σ_t²) given E[w_g], E[w_ĝ]."""
    variance = 1.0 / (precision_g + precision_ghat)
    return variance * (precision_g * prev_mean + precision_ghat * g_hat), variance


def global_optimum(
    g_hat: Tensor,
    prev_mean: Tensor,
    mean: Tensor,
    variance: Tensor,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
) -> tuple[float, Tensor, Tensor]:
    """Coordinate ascent on q(w_g), q(w_ĝ) given q(g_t) = N(mean, variance): (â, b̂_g, b̂_ĝ)."""
    gamma, k_g = prior_strength, variance_ratio
    rate_g = gamma + 0.5 * (variance + (mean - prev_mean) ** 2)
    rate_ghat = k_g * gamma + 0.5 * (variance + (mean - g_hat) ** 2)
    return gamma + 0.5, rate_g, rate_ghat


class VSGDState(NamedTuple):
    """Per-coordinate variational parameters after step ``step``."""

    mean: Tensor  # μ_t
    rate_g: Tensor  # b_{t,g}
    rate_ghat: Tensor  # b_{t,ĝ}
    step: int


def init_state(like: Tensor) -> VSGDState:
    zeros = torch.zeros_like(like)
    return VSGDState(zeros, zeros.clone(), zeros.clone(), 0)


def cavi_update(
    state: VSGDState,
    g_hat: Tensor,
    *,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    kappa1: float = 0.81,
    kappa2: float = 0.9,
) -> tuple[VSGDState, Tensor]:
    """One SVI step: local coordinate ascent, then the Robbins–Monro global step.

    Returns the new state and σ_t². The Gamma shape carries the official jitter δ: the prior
    shape is γ + δ/2 and every later shape γ + ½ + δ/2.

    Example:
        >>> s, var = cavi_update(init_state(torch.zeros(2)), torch.tensor([3.1, -6.2]))
        >>> s.mean  # the first step shrinks the observation by 1 / (1 + K_g)
        tensor([ 0.1000, -0.2000])
    """
    gamma, k_g = prior_strength, variance_ratio
    t = state.step + 1
    if t == 1:
        shape = gamma + JITTER / 2
        precision_g = torch.full_like(g_hat, shape / gamma)
        precision_ghat = torch.full_like(g_hat, shape / (k_g * gamma))
    else:
        shape = gamma + 0.5 + JITTER / 2
        precision_g, precision_ghat = shape / state.rate_g, shape / state.rate_ghat
    mean, variance = local_update(g_hat, state.mean, precision_g, precision_ghat)
    _, target_g, target_ghat = global_optimum(
        g_hat, state.mean, mean, variance, variance_ratio=k_g, prior_strength=gamma
    )
    rho1, rho2 = t**-kappa1, t**-kappa2
    rate_g = (1 - rho1) * state.rate_g + rho1 * target_g
    rate_ghat = (1 - rho2) * state.rate_ghat + rho2 * target_ghat
    return VSGDState(mean, rate_g, rate_ghat, t), variance


def make_data(seed: int = 0, dim: int = 8, steps: int = 50) -> Tensor:
    """A stream of noisy gradients: a slowly drifting true gradient plus observation noise."""
    gen = torch.Generator().manual_seed(seed)
    drift = torch.cumsum(0.01 * torch.randn(steps, dim, generator=gen), 0) + 0.1
    return drift + 0.1 * torch.randn(steps, dim, generator=gen)


def main(args: argparse.Namespace) -> None:
    stream = make_data(args.seed, steps=args.num_steps)
    state = init_state(stream[0])
    for g_hat in stream:
        state, variance = cavi_update(state, g_hat)
    beta = state.rate_ghat / (state.rate_g + state.rate_ghat)
    print(f"after {state.step} steps: mean |mu| {state.mean.abs().mean():.4f}, "
          f"mean beta {beta.mean():.4f}, mean sigma^2 {variance.mean():.3e}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=50)
    main(parser.parse_args())
