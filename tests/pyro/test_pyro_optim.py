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


def _fit(optim, steps=2000):
    """SVI on the conjugate model; (posterior mean error in posterior sds, relative sd error)
    of the iterate averaged over the last quarter of the steps (a constant lr makes iterates
    fluctuate around the optimum). Posterior N(Σx / (N + 1/100), 1/(N + 1/100))."""
    torch.manual_seed(0)
    data = 3.0 + torch.randn(100)
    post_var = 1.0 / (1.0 / 100.0 + len(data))
    post_mean = post_var * float(data.sum())
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    elbo = TraceMeanField_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(_model, _guide, optim, loss=elbo)
    locs, scales = [], []
    for i in range(steps):
        svi.step(data)
        if i >= steps * 3 // 4:
            locs.append(pyro.param("loc").item())
            scales.append(pyro.param("scale").item())
    return (
        (statistics.mean(locs) - post_mean) / post_var**0.5,
        statistics.mean(scales) / post_var**0.5 - 1,
    )


@pytest.mark.parametrize("factory", [probopt.pyro.VSGD, probopt.pyro.ConstantVSGD])
def test_svi_reaches_the_analytic_posterior(factory):
    """Mean within 0.1 posterior sd, sd within 5 % (measured: VSGD -0.027 sd and -0.6 %,
    ConstantVSGD -0.029 sd and -1.3 %)."""
    mean_err, sd_err = _fit(factory({"lr": 0.03}))
    assert abs(mean_err) < 0.1 and abs(sd_err) < 0.05


@pytest.mark.parametrize("inner, lr", [(None, 0.001), (torch.optim.Adam, 0.03)])
def test_grad_queue_in_svi_near_the_analytic_posterior(inner, lr):
    """Grad Queue around SGD and Adam. Measured: mean -0.01 sd, sd -4.8 % and -5.0 %. The sd
    bound is looser (8 %) for a reason of the method: the amplification Δ depends on the
    gradient it multiplies, so E[Δ g] = 0 does not hold where E[g] = 0 and the fixed point
    sits a little off the ELBO optimum (here it shrinks the guide's scale)."""
    optim = probopt.pyro.GradQueue({"optimizer": inner, "optimizer_args": {"lr": lr}})
    mean_err, sd_err = _fit(optim)
    assert abs(mean_err) < 0.1 and abs(sd_err) < 0.08


def test_grad_queue_without_amplification_is_the_inner_pyro_optimizer():
    """amplification="none" inside SVI: the same parameters as pyro.optim.SGD, bitwise."""
    ours = _fit(probopt.pyro.GradQueue({"optimizer_args": {"lr": 0.001}, "amplification": "none"}),
                steps=40)  # fmt: skip
    ours_params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    plain = _fit(pyro.optim.SGD({"lr": 0.001}), steps=40)
    assert ours == plain
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), ours_params[k])


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
