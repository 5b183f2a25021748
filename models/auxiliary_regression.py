r"""Model: Bayesian linear regression of per-example gradients on auxiliary data.

The working model of model-assisted gradient estimation
(:mod:`probopt.sampling.model_assisted`), written as a Pyro program. Example :math:`k` has
auxiliary data :math:`h_k \in \mathbb{R}^q` (intercept included) and per-example gradient
:math:`y_k \in \mathbb{R}^p`; the coefficient matrix :math:`B \in \mathbb{R}^{q \times p}` has a
matrix-normal prior with independent columns:

.. math::
    b_j &\sim \mathcal{N}(0, \tau^2 I_q), \quad j = 1..p \qquad (B = [b_1, \dots, b_p]), \\
    y_k \mid h_k, B &\sim \mathcal{N}(B^\top h_k, \sigma^2 I_p), \quad k = 1..n.

The posterior is conjugate: columns stay independent with a shared covariance,

.. math::
    b_j \mid \text{data} \sim \mathcal{N}(m_j, \Sigma), \qquad
    \Sigma = \big(H^\top H/\sigma^2 + I/\tau^2\big)^{-1}, \qquad
    M = [m_1..m_p] = \big(H^\top H + (\sigma^2/\tau^2) I\big)^{-1} H^\top Y,

so the posterior mean is ridge regression with penalty :math:`\sigma^2/\tau^2`, and with a
vanishing prior (:math:`\tau \to \infty`) ordinary least squares: exactly what
:class:`~probopt.sampling.auxiliary.OnlineLinearModel` computes online (forgetting 1; its
relative ridge :math:`\rho` is :math:`(\sigma^2/\tau^2)/(\operatorname{tr} H^\top H/q)`).
:func:`closed_form_posterior` gives :math:`(M, \Sigma)`; :func:`guide` is the matching
variational family (a multivariate normal per column with a shared Cholesky factor), which SVI
fits (:func:`fit_svi`).

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992 (the working
    model ξ of the GREG estimator).
    Pohjankukka & Heikkonen, `Stochastic Gradient Optimization with Model-Assisted Sampling
    <https://arxiv.org/abs/2606.27171>`_, 2026 (auxiliary gradient-prediction models).
    Bishop, *Pattern Recognition and Machine Learning*, 2006, §3.3 (conjugate linear regression).

Run ``python models/auxiliary_regression.py --num-steps 2000`` to compare SVI with the closed
form and with the online ridge fit.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import ClippedAdam

__all__ = ["closed_form_posterior", "fit_svi", "guide", "main", "make_data", "model"]


def model(h, y=None, *, num_coords=None, sigma=1.0, prior_scale=10.0):
    """The generative model: ``h`` is ``(n, q)``, ``y`` is ``(n, p)`` or None (then pass
    ``num_coords=p``)."""
    n, q = h.shape
    p = y.shape[1] if y is not None else num_coords
    zeros = torch.zeros(q, dtype=h.dtype, device=h.device)
    eye = torch.eye(q, dtype=h.dtype, device=h.device)
    with pyro.plate("coords", p):
        b = pyro.sample("B", dist.MultivariateNormal(zeros, scale_tril=prior_scale * eye))
    mean = h @ b.mT  # (..., n, p); leading dims: vectorised particles
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mean, sigma).to_event(1), obs=y)


def guide(h, y=None, *, num_coords=None, sigma=1.0, prior_scale=10.0):
    """Columns independent, each ``N(loc_j, L L^T)`` with one shared Cholesky factor ``L``: the
    family of the exact posterior."""
    q = h.shape[1]
    p = y.shape[1] if y is not None else num_coords
    loc = pyro.param("B_loc", torch.zeros(p, q, dtype=h.dtype, device=h.device))
    scale_tril = pyro.param(
        "B_scale_tril",
        0.1 * torch.eye(q, dtype=h.dtype, device=h.device),
        constraint=constraints.lower_cholesky,
    )
    with pyro.plate("coords", p):
        pyro.sample("B", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def closed_form_posterior(h, y, *, sigma=1.0, prior_scale=10.0):
    """Exact posterior ``(M, Sigma)``: mean ``(q, p)`` and the shared column covariance
    ``(q, q)``."""
    q = h.shape[1]
    precision = h.T @ h / sigma**2 + torch.eye(q, dtype=h.dtype, device=h.device) / prior_scale**2
    chol = torch.linalg.cholesky(precision)
    cov = torch.cholesky_inverse(chol)
    mean = torch.cholesky_solve(h.T @ y / sigma**2, chol)
    return mean, cov


def make_data(seed=0, *, n=200, q=3, p=4, sigma=0.5, dtype=torch.float64):
    """Synthetic data: ``h = [1, N(0, I)]`` and ``y = h B + N(0, sigma^2)``; returns
    ``(h, y, B)``."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.cat([torch.ones(n, 1), torch.randn(n, q - 1, generator=gen)], 1).to(dtype)
    b = torch.randn(q, p, generator=gen).to(dtype)
    y = h @ b + sigma * torch.randn(n, p, generator=gen).to(dtype)
    return h, y, b


def fit_svi(
    h, y, *, sigma=1.0, prior_scale=10.0, num_steps=2000, lr=0.05, num_particles=16, seed=0
):
    """Fit :func:`guide` by SVI (mean-field ELBO with the analytic Gaussian KL, ClippedAdam with
    learning-rate decay to 1 % of ``lr``); returns ``(loc (q, p), covariance (q, q))``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = ClippedAdam({"lr": lr, "lrd": 0.01 ** (1.0 / num_steps)})
    elbo = TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1
    )
    svi = SVI(model, guide, optim, elbo)
    for _ in range(num_steps):
        svi.step(h, y, sigma=sigma, prior_scale=prior_scale)
    loc = pyro.param("B_loc").detach().T.clone()
    tril = pyro.param("B_scale_tril").detach()
    return loc, tril @ tril.T


def main(args):
    from probopt.sampling.auxiliary import OnlineLinearModel

    h, y, _ = make_data(args.seed, n=args.n, sigma=args.sigma)
    mean, cov = closed_form_posterior(h, y, sigma=args.sigma, prior_scale=args.prior_scale)
    loc, cov_svi = fit_svi(
        h,
        y,
        sigma=args.sigma,
        prior_scale=args.prior_scale,
        num_steps=args.num_steps,
        lr=args.lr,
        seed=args.seed,
    )
    sd = cov.diagonal().sqrt().unsqueeze(1)
    q = h.shape[1]
    rho = (args.sigma / args.prior_scale) ** 2 / float((h.T @ h).trace() / q)
    online = OnlineLinearModel(q, y.shape[1], ridge=rho, dtype=h.dtype)
    online.update(h, y)
    svi_err = float(((loc - mean) / sd).abs().max())
    cov_ratio = (cov_svi.diagonal() / cov.diagonal()).tolist()
    ridge_err = float((online.solve() - mean).abs().max())
    print(f"posterior mean (closed form):\n{mean}")
    print(f"SVI - closed form, in posterior sd: max {svi_err:.3f}")
    print(f"SVI cov / closed-form cov, diagonal: {cov_ratio}")
    print(f"online ridge fit - posterior mean: max {ridge_err:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Bayesian regression of gradients on h_k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--prior-scale", type=float, default=10.0)
    parser.add_argument("--num-steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.05)
    main(parser.parse_args())
