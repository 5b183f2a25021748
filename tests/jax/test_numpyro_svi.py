"""probopt's optax transforms train NumPyro models: SVI(model, guide, probopt.jax.vsgd(...))
converges to the analytic posterior of a conjugate model, directly and via optax_to_numpyro."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI, TraceMeanField_ELBO  # noqa: E402
from numpyro.optim import optax_to_numpyro  # noqa: E402

import probopt.jax as pj  # noqa: E402

PRIOR_SD = 10.0
DATA = 3.0 + jax.random.normal(jax.random.PRNGKey(0), (50,))


def model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", jnp.array(0.0))
    scale = numpyro.param("scale", jnp.array(1.0), constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


def _posterior():
    precision = 1 / PRIOR_SD**2 + DATA.shape[0]
    return float(DATA.sum() / precision), float(precision**-0.5)


def test_vsgd_trains_a_conjugate_model_to_its_posterior():
    """Normal-Normal: 2000 SVI steps (8 particles, the prior KL analytic) with VSGD and a
    learning rate decayed from 0.05 to 5e-4 reach the analytic posterior: the mean within
    0.1 posterior sd and the sd within 10 % (measured over 4 seeds: 0.003-0.04 sd and
    0.3-1.1 %; the start, loc 0 and scale 1, is 22 posterior sd and a factor 7 away)."""
    tx = pj.vsgd(learning_rate=optax.exponential_decay(0.05, 2000, 0.01))
    svi = SVI(model, guide, tx, TraceMeanField_ELBO(num_particles=8))
    result = svi.run(jax.random.PRNGKey(1), 2000, DATA, progress_bar=False)
    mean, sd = _posterior()
    assert abs(float(result.params["loc"]) - mean) < 0.1 * sd, (result.params, mean, sd)
    assert abs(float(result.params["scale"]) / sd - 1) < 0.1, (result.params, sd)
    opt_state = result.state.optim_state[1][1]  # numpyro's (step, (params, optax state))
    assert int(opt_state.inner_state[0].count) == 2000
    assert int(opt_state.nonfinite_count) == 0


def test_direct_and_optax_to_numpyro_are_the_same_optimizer():
    """A raw optax transformation given to SVI is wrapped by optax_to_numpyro: five jitted steps
    either way give bitwise equal parameters and VSGD states (same keys)."""
    states = []
    for optim in (pj.vsgd(0.05), optax_to_numpyro(pj.vsgd(0.05))):
        svi = SVI(model, guide, optim, TraceMeanField_ELBO())
        state = svi.init(jax.random.PRNGKey(2), DATA)
        step = jax.jit(svi.update)
        for _ in range(5):
            state, _ = step(state, DATA)
        states.append(state)
    a, b = (jax.tree.leaves(s.optim_state) for s in states)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_grad_queue_in_svi_takes_the_elbo_as_its_loss():
    """optax_to_numpyro passes the loss as ``value=``: a Grad Queue chained before Adam sees the
    ELBO, its loss EMAs follow it and the queue length moves off its start."""
    tx = optax.chain(pj.grad_queue(queue_length=8, q_min=2, q_max=8), optax.adam(0.05))
    svi = SVI(model, guide, tx, TraceMeanField_ELBO())
    result = svi.run(jax.random.PRNGKey(3), 60, DATA, progress_bar=False)
    gq = result.state.optim_state[1][1][0].inner_state
    assert int(gq.step) == 60
    assert bool(jnp.isfinite(gq.loss_fast)) and bool(jnp.isfinite(gq.loss_slow))
    assert int(gq.queue_length) != 8  # the ELBO falls fast: shorten_on_change shortens the queue
    assert float(result.losses[-1]) < float(result.losses[0])
