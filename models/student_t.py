r"""Model: heavy-tailed gradient noise, a worked example of a user-defined gradient model.

The VSGD model (:mod:`probopt.models.vsgd`) with a Student-t observation in place of the Normal:

.. math::
    w_g \sim \mathrm{Gamma}(\gamma, \gamma), \quad
    w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g\gamma), \quad
    g_t \sim \mathcal N(\mu_{t-1}, w_g^{-1}), \quad
    \hat g_t \sim \mathrm{StudentT}_\nu(g_t, w_{\hat g}^{-1/2}).

Minibatch gradients are often heavy-tailed (a few examples with large losses dominate a batch);
under a Student-t likelihood an outlying observation moves the posterior of the true gradient
less than under a Normal one, and as ν → ∞ the model becomes VSGD's. There is no closed form:
:class:`probopt.optim.GradientModelOptimizer` fits the same mean-field guide as VSGD's
(:func:`probopt.models.vsgd.guide`) by SVI at every step::

    from probopt.optim import GradientModelOptimizer
    import probopt.models.student_t as student_t
    opt = GradientModelOptimizer(net.parameters(), student_t.model, student_t.guide, lr=0.01,
                                 model_kwargs={"df": 3.0})

This file is the template for writing your own model: a ``model(g_hat, prev_mean, **kw)`` that
observes ``g_hat`` inside a plate over the coordinates, and a guide whose site ``"g"`` is the true
gradient. The guide's ``g_loc``/``g_scale`` are local (re-fitted each step); all other guide
parameters are global (carried across steps).

References:
    Simsekli, Sagun & Gürbüzbalaban, `A Tail-Index Analysis of Stochastic Gradient Noise in Deep
    Neural Networks <https://arxiv.org/abs/1901.06053>`_, ICML 2019 (heavy-tailed gradient noise).
    Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep Neural
    Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (the Normal model this one extends).
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from probopt.models.vsgd import LOCAL_PARAMS, make_data
from probopt.models.vsgd import guide as _vsgd_guide
from torch import Tensor

__all__ = ["LOCAL_PARAMS", "guide", "model"]


def model(
    g_hat: Tensor,
    prev_mean: Tensor,
    *,
    df: float = 3.0,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    **guide_args,
):
    """VSGD's model with a Student-t observation of ``df`` degrees of freedom."""
    del guide_args
    gamma, k_g = prior_strength, variance_ratio
    with pyro.plate("coords", g_hat.shape[-1], dim=-1):
        w_g = pyro.sample("w_g", dist.Gamma(gamma, gamma))
        w_ghat = pyro.sample("w_ghat", dist.Gamma(gamma, k_g * gamma))
        g = pyro.sample("g", dist.Normal(prev_mean, w_g.rsqrt()))
        pyro.sample("g_hat", dist.StudentT(df, g, w_ghat.rsqrt()), obs=g_hat)


def guide(g_hat: Tensor, prev_mean: Tensor, *, df: float = 3.0, **kwargs):
    """VSGD's mean-field guide (the latents are the same); ``df`` is the model's."""
    del df
    _vsgd_guide(g_hat, prev_mean, **kwargs)


def main(args: argparse.Namespace) -> None:
    from probopt.optim import GradientModelOptimizer

    stream = make_data(args.seed, dim=4, steps=args.num_steps)
    stream[args.num_steps // 2, 0] += 5.0  # one outlying observation
    x = torch.nn.Parameter(torch.zeros(4))
    opt = GradientModelOptimizer([x], model, guide, lr=0.01, svi_steps=20,
                                 model_kwargs={"df": args.df})  # fmt: skip
    for g_hat in stream:
        x.grad = g_hat.clone()
        opt.step()
    mean, variance = opt.posterior(x)
    print(f"posterior mean {mean.tolist()}, sd {variance.sqrt().tolist()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--df", type=float, default=3.0)
    main(parser.parse_args())
