"""probopt's optimizers inside pyro.infer.SVI: a conjugate Normal-Normal model."""

import statistics

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.distributions import constraints

import probopt.pyro


def _model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def _guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


@pytest.mark.parametrize("factory", [probopt.pyro.VSGD])
def test_svi_reaches_the_analytic_posterior(factory):
    """Posterior N(Σx / (N + 1/100), 1/(N + 1/100)). The iterate is averaged over the last 500
    of 2000 steps (the optimizer keeps a constant lr, so iterates fluctuate around the optimum).
    Tolerances: mean within 0.1 posterior sd, sd within 5 %."""
    torch.manual_seed(0)
    data = 3.0 + torch.randn(100)
    post_var = 1.0 / (1.0 / 100.0 + len(data))
    post_mean = post_var * float(data.sum())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    elbo = TraceMeanField_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(_model, _guide, factory({"lr": 0.03}), loss=elbo)
    locs, scales = [], []
    for i in range(2000):
        svi.step(data)
        if i >= 1500:
            locs.append(pyro.param("loc").item())
            scales.append(pyro.param("scale").item())
    assert abs(statistics.mean(locs) - post_mean) < 0.1 * post_var**0.5
    assert abs(statistics.mean(scales) / post_var**0.5 - 1) < 0.05


def test_pyro_optim_state_round_trip():
    pyro.clear_param_store()
    data = torch.randn(10)
    optim = probopt.pyro.VSGD({"lr": 0.01})
    svi = SVI(_model, _guide, optim, loss=TraceMeanField_ELBO(max_plate_nesting=1))
    for _ in range(3):
        svi.step(data)
    state = optim.get_state()
    assert set(state) == {"loc", "scale"}
    assert int(state["loc"]["state"][0]["step"]) == 3
    fresh = probopt.pyro.ConstantVSGD(lambda name: {"lr": 0.1 if name == "loc" else 0.01})
    fresh.set_state(state)  # consumed lazily when the parameters appear
    assert fresh._state_waiting_to_be_consumed.keys() == state.keys()
