r"""Model: a finite population under a linear superpopulation model, observed through a sample.

The training set is a finite population :math:`U = \{1, \dots, N\}`. Unit k has auxiliary values
:math:`h_k \in \mathbb{R}^q` (known for every unit) and a study value :math:`y_k \in
\mathbb{R}^p` (a per-example gradient), observed only on the minibatch s. The superpopulation
model ξ and the design:

.. math::
    \beta &\sim \mathcal{N}(0, \tau^2)\ \text{elementwise}, \quad \beta \in \mathbb{R}^{q \times p}
    \qquad (\tau = \texttt{prior_scale};\ \tau \to \infty \text{ is the flat prior}) \\
    y_k \mid h_k, \beta &\sim \mathcal{N}_p(\beta^T h_k,\ c_k \sigma^2 I), \qquad k \in U \\
    s &\sim p(s \mid h) \qquad \text{(an ignorable design: it depends on } h \text{ only)}

Because the design depends on h only, :math:`p(s \mid h)` factors out of the likelihood and the
posterior conditions on s as if it were fixed. The target is the population mean

.. math::
    \bar y_U = \frac{1}{N}\Big(\sum_{k \in s} y_k + \sum_{k \in U \setminus s} y_k\Big),

whose posterior mean given :math:`y_s` is the *model-based* (prediction) estimator. Every column
of β has the Gaussian posterior :math:`\mathcal{N}(\tilde\beta_{\cdot j}, \Lambda^{-1})`,

.. math::
    \Lambda = \tau^{-2} I + \sigma^{-2} H_s^T C_s^{-1} H_s, \qquad
    \tilde\beta = \Lambda^{-1} \sigma^{-2} H_s^T C_s^{-1} Y_s, \qquad
    E[\bar y_U \mid y_s] = \frac{1}{N}\Big(\sum_{s} y_k + \tilde\beta^T \sum_{U \setminus s}
    h_k\Big),

which in the flat-prior limit is Royall's BLUP. **Identity** (notes §5): under SRSWOR with an
intercept in h and :math:`c_k = 1`, the flat-prior posterior mean equals the design-based GREG
estimator :func:`probopt.sampling.estimators.greg` exactly, :math:`\bar h_U^T \hat B`. Under
unequal :math:`\pi_k` or :math:`c_k \ne 1` they differ: GREG stays design-consistent whatever ξ
is; the model-based estimator needs ξ to be right (or :math:`1/\pi_k` in h).

:func:`model` and :func:`guide` are the Pyro programs (the guide: a mean-field Normal on β and
the exact conditional of the unobserved :math:`y_{U \setminus s}` given β); :func:`posterior` and
:func:`posterior_population_mean` the closed forms that SVI must reach.

References:
    Royall, `On finite population sampling theory under certain linear regression models
    <https://doi.org/10.1093/biomet/57.2.377>`_, Biometrika, 1970.
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992, chapter 6.
    Little, `Calibrated Bayes <https://doi.org/10.1198/000313006X117837>`_, The American
    Statistician, 2006.

Example:
    >>> data = make_data(seed=0)
    >>> est = posterior_population_mean(data["h"], data["sample"], data["y"][data["sample"]],
    ...                                 prior_scale=math.inf)
    >>> est.shape, bool((est - data["y"].mean(0)).abs().max() < 0.5)
    (torch.Size([2]), True)
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import Tensor

from probopt.sampling.designs import SimpleRandomSampling
from probopt.sampling.estimators import greg

__all__ = [
    "fit_svi",
    "guide",
    "main",
    "make_data",
    "model",
    "posterior",
    "posterior_population_mean",
]


def _split(h: Tensor, sample: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Auxiliary values and scales c_k of the sampled units and of the rest of U."""
    in_s = torch.zeros(h.shape[0], dtype=torch.bool)
    in_s[sample] = True
    c = torch.ones(h.shape[0], dtype=h.dtype) if c is None else c
    return h[sample], h[~in_s], c[sample], c[~in_s]


def model(h, sample, y_sample=None, *, c=None, sigma=1.0, prior_scale=10.0, num_outputs=1):
    """β ~ N(0, τ²); y_k ~ N(βᵀh_k, c_k σ²) for every k in U; y observed on the sample s.

    Args:
        h: auxiliary values of all N units, (N, q).
        sample: indices of the sampled units s, (n,).
        y_sample: observed values of the sampled units, (n, p); ``None`` simulates them.
        c: heteroscedasticity constants c_k of all units, (N,); ``None`` means 1.
        sigma: the residual scale σ (known).
        prior_scale: τ, the prior scale of β (finite here; the closed forms take ``math.inf``).
        num_outputs: p when ``y_sample`` is ``None``.

    Returns:
        The population mean ȳ_U (a ``population_mean`` deterministic site).
    """
    h_s, h_r, c_s, c_r = _split(h, sample, c)
    p = y_sample.shape[-1] if y_sample is not None else num_outputs
    beta = pyro.sample("beta", dist.Normal(h.new_zeros(h.shape[1], p), prior_scale).to_event(2))
    with pyro.plate("sampled_units", h_s.shape[0]):
        y_s = pyro.sample(
            "y_sample",
            dist.Normal(h_s @ beta, sigma * c_s.sqrt()[:, None]).to_event(1),
            obs=y_sample,
        )
    with pyro.plate("unsampled_units", h_r.shape[0]):
        y_r = pyro.sample(
            "y_rest", dist.Normal(h_r @ beta, sigma * c_r.sqrt()[:, None]).to_event(1)
        )
    return pyro.deterministic("population_mean", (y_s.sum(-2) + y_r.sum(-2)) / h.shape[0])


def guide(h, sample, y_sample=None, *, c=None, sigma=1.0, prior_scale=10.0, num_outputs=1):
    """q(β) = N(β_loc, β_scale²) elementwise; q(y_rest | β) = p(y_rest | β), the exact conditional.

    Given β the unobserved units are independent of the observed ones, so their conditional
    posterior is the model's own likelihood term: only q(β) has parameters.
    """
    h_s, h_r, c_s, c_r = _split(h, sample, c)
    p = y_sample.shape[-1] if y_sample is not None else num_outputs
    loc = pyro.param("beta_loc", h.new_zeros(h.shape[1], p))
    scale = pyro.param(
        "beta_scale", h.new_full((h.shape[1], p), 0.1), constraint=dist.constraints.positive
    )
    beta = pyro.sample("beta", dist.Normal(loc, scale).to_event(2))
    with pyro.plate("unsampled_units", h_r.shape[0]):
        pyro.sample("y_rest", dist.Normal(h_r @ beta, sigma * c_r.sqrt()[:, None]).to_event(1))


def posterior(
    h: Tensor,
    sample: Tensor,
    y_sample: Tensor,
    *,
    c: Tensor | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """Closed-form posterior of β: the mean β̃ (q, p) and the covariance Λ⁻¹ (q, q) of each column.

    ``prior_scale=math.inf`` is the flat prior (β̃ is then weighted least squares on the sample).
    """
    h_s, _, c_s, _ = _split(h, sample, c)
    precision = (h_s.T / c_s) @ h_s / sigma**2
    if math.isfinite(prior_scale):
        precision = precision + torch.eye(h.shape[1], dtype=h.dtype) / prior_scale**2
    cov = torch.linalg.inv(precision)
    loc = cov @ ((h_s.T / c_s) @ y_sample) / sigma**2
    return loc, cov


def posterior_population_mean(
    h: Tensor,
    sample: Tensor,
    y_sample: Tensor,
    *,
    c: Tensor | None = None,
    sigma: float = 1.0,
    prior_scale: float = 10.0,
) -> Tensor:
    """E[ȳ_U | y_s] = N⁻¹ (Σ_s y_k + β̃ᵀ Σ_{U∖s} h_k); the BLUP when ``prior_scale=math.inf``."""
    loc, _ = posterior(h, sample, y_sample, c=c, sigma=sigma, prior_scale=prior_scale)
    _, h_r, _, _ = _split(h, sample, c)
    return (y_sample.sum(0) + h_r.sum(0) @ loc) / h.shape[0]


def make_data(
    seed: int = 0, population_size: int = 200, sample_size: int = 20, num_outputs: int = 2
) -> dict:
    """A population from the model (h = (1, x1, x2), c_k = 1, σ = 1) and one SRSWOR sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(population_size, 2, generator=g, dtype=torch.float64)
    h = torch.cat([torch.ones(population_size, 1, dtype=torch.float64), x], 1)
    beta = torch.randn(3, num_outputs, generator=g, dtype=torch.float64)
    sigma = 1.0
    y = h @ beta + sigma * torch.randn(
        population_size, num_outputs, generator=g, dtype=torch.float64
    )
    design = SimpleRandomSampling(population_size, sample_size)
    sample = design.sample(g)
    return {
        "h": h,
        "y": y,
        "beta": beta,
        "sigma": sigma,
        "sample": sample.indices,
        "pi": sample.inclusion_probabilities,
        "design": design,
    }


def fit_svi(
    h: Tensor,
    sample: Tensor,
    y_sample: Tensor,
    *,
    num_steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """Fit :func:`guide` by SVI; return its parameters and its posterior mean of ȳ_U.

    The mean-field ELBO with its analytic KL, Adam with the learning rate decayed geometrically
    to 1 % over the run, and the average of ``beta_loc`` over the second half of the run
    (Polyak–Ruppert averaging, which removes most of the single-particle noise). Then
    E_q[ȳ_U] = N⁻¹ (Σ_s y_k + β_locᵀ Σ_{U∖s} h_k).

    Returns:
        ``{"population_mean", "beta_loc", "beta_scale"}``.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.ClippedAdam({"lr": learning_rate, "lrd": 0.01 ** (1 / max(num_steps, 1))})
    svi = SVI(model, guide, optim, TraceMeanField_ELBO(max_plate_nesting=1))
    loc_sum, count = 0.0, 0
    for step in range(num_steps):
        svi.step(h, sample, y_sample, **model_kwargs)
        if step >= num_steps // 2:
            loc_sum, count = loc_sum + pyro.param("beta_loc").detach(), count + 1
    loc = loc_sum / count
    _, h_r, _, _ = _split(h, sample, model_kwargs.get("c"))
    return {
        "population_mean": (y_sample.sum(0) + h_r.sum(0) @ loc) / h.shape[0],
        "beta_loc": loc,
        "beta_scale": pyro.param("beta_scale").detach(),
    }


def main(args: argparse.Namespace) -> dict:
    data = make_data(args.seed, args.population_size, args.sample_size)
    h, s, y_s = data["h"], data["sample"], data["y"][data["sample"]]
    closed = posterior_population_mean(h, s, y_s, sigma=data["sigma"], prior_scale=args.prior_scale)
    svi = fit_svi(
        h,
        s,
        y_s,
        num_steps=args.num_steps,
        seed=args.seed,
        sigma=data["sigma"],
        prior_scale=args.prior_scale,
    )["population_mean"]
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
        print(f"{name:30s} {[round(v, 4) for v in value.tolist()]}")
    return out


if __name__ == "__main__":
    assert pyro.__version__.startswith("1.")
    parser = argparse.ArgumentParser(description="Finite-population model: BLUP, GREG and SVI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=300)
    parser.add_argument("--population-size", type=int, default=200)
    parser.add_argument("--sample-size", type=int, default=20)
    parser.add_argument("--prior-scale", type=float, default=10.0)
    main(parser.parse_args())
