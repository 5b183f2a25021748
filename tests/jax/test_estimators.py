"""probopt.jax.estimators / designs: parity with torch and the NumPy reference, exact
enumeration with masks, design frequencies, jit."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import probopt.jax.designs as jd  # noqa: E402
import probopt.jax.estimators as je  # noqa: E402
import probopt.sampling.designs as td  # noqa: E402
import probopt.sampling.estimators as te  # noqa: E402
from probopt.testing import reference  # noqa: E402

N = 40


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    n, p, q = 9, 4, 3
    return dict(
        y=rng.standard_normal((n, p)),
        y1=rng.standard_normal(n),
        y_hat=rng.standard_normal((n, p)),
        y_hat_mean=rng.standard_normal(p),
        pi=rng.uniform(0.1, 0.9, n),
        p=rng.dirichlet(np.ones(n)),
        h=np.column_stack([np.ones(n), rng.standard_normal((n, q - 1))]),
        h_mean=np.array([1.0, 0.2, -0.1]),
        c=rng.uniform(0.5, 2.0, n),
    )


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _estimates(mod, d):
    """Every estimator and loss-weight function of ``mod`` (JAX, torch or the NumPy reference:
    the same names and arguments) on the data ``d``; the reference lacks the ``*_weights`` of
    HT/HH, ``ridge`` and ``greg_coefficients`` (``None`` there)."""
    ref = mod is reference
    out = []
    for total in (False, True):
        kw = dict(total=total)
        out += [
            mod.horvitz_thompson(d["y"], d["pi"], N, **kw),
            mod.horvitz_thompson(d["y1"], d["pi"], N, **kw),
            mod.hansen_hurwitz(d["y"], d["p"], N, **kw),
            mod.difference_estimator(d["y"], d["y_hat"], d["y_hat_mean"], d["pi"], N, **kw),
            None if ref else mod.horvitz_thompson_weights(d["pi"], N, **kw),
            None if ref else mod.hansen_hurwitz_weights(d["p"], N, **kw),
        ]
        for c in (None, d["c"]):
            out += [
                mod.greg_weights(d["h"], d["h_mean"], d["pi"], N, c=c, **kw),
                mod.greg(d["y"], d["h"], d["h_mean"], d["pi"], N, c=c, **kw),
            ]
    out += [
        mod.hajek(d["y"], d["pi"]),
        None if ref else mod.greg_weights(d["h"], d["h_mean"], d["pi"], N, ridge=0.3),
        None if ref else mod.greg_coefficients(d["y"], d["h"], d["pi"], N, c=d["c"]),
    ]
    return out


def test_estimators_match_torch_and_reference_float64(x64, data):
    """Every estimator and loss-weight function: JAX = torch = the NumPy textbook sums, float64.
    1e-10 relative: the GREG paths solve the same 3x3 system by different LAPACK calls and the
    reference uses the regression form (measured ~1e-15)."""
    ours = jax.jit(lambda d: _estimates(je, d))({k: jnp.asarray(v) for k, v in data.items()})
    torch_twin = _estimates(te, {k: _t(v) for k, v in data.items()})
    textbook = _estimates(reference, data)
    for i, (j, t, r) in enumerate(zip(ours, torch_twin, textbook)):
        assert j.dtype == jnp.float64, i
        np.testing.assert_allclose(np.asarray(j), t.numpy(), rtol=1e-10, atol=1e-12, err_msg=i)
        if r is not None:
            np.testing.assert_allclose(np.asarray(j), r, rtol=1e-10, atol=1e-12, err_msg=i)


def test_estimators_match_torch_float32(data):
    """float32 inputs: float32 results within 1e-5 relative, 1e-5 absolute of torch's float32
    (the GREG solves round differently; measured 6e-7 relative)."""
    ours = jax.jit(lambda d: _estimates(je, d))({k: jnp.asarray(v, jnp.float32)
                                                  for k, v in data.items()})  # fmt: skip
    torch_twin = _estimates(te, {k: torch.tensor(v, dtype=torch.float32) for k, v in data.items()})
    for i, (j, t) in enumerate(zip(ours, torch_twin)):
        assert j.dtype == jnp.float32, i
        np.testing.assert_allclose(np.asarray(j), t.numpy(), rtol=1e-5, atol=1e-5, err_msg=i)


def test_float32_inputs_stay_float32(data):
    y, pi = jnp.asarray(data["y"], jnp.float32), jnp.asarray(data["pi"], jnp.float32)
    h = jnp.asarray(data["h"], jnp.float32)
    assert je.horvitz_thompson(y, pi, N).dtype == jnp.float32
    w = je.greg_weights(h, jnp.asarray(data["h_mean"], jnp.float32), pi, N)
    assert w.dtype == jnp.float32
    # float32 calibration: sum_s w_k h_k = h_bar_U within 1e-5 (float32 solve of a 3x3 system)
    np.testing.assert_allclose(np.asarray(w @ h), data["h_mean"], atol=1e-5)


def test_mask_equals_the_subsample(x64, data):
    """Masked-out units get weight exactly 0: the estimate on all n units with a mask is the
    estimate on the subsample (1e-12)."""
    mask = np.array([True, False, True, True, False, True, True, False, True])
    sub = {k: v[mask] for k, v in data.items() if np.shape(v)[:1] == (9,)}

    @jax.jit
    def pairs(j, sub, m):
        return [
            (je.horvitz_thompson(j["y"], j["pi"], N, mask=m),
             je.horvitz_thompson(sub["y"], sub["pi"], N)),
            (je.hajek(j["y"], j["pi"], mask=m), je.hajek(sub["y"], sub["pi"])),
            (je.difference_estimator(j["y"], j["y_hat"], j["y_hat_mean"], j["pi"], N, mask=m),
             je.difference_estimator(sub["y"], sub["y_hat"], j["y_hat_mean"], sub["pi"], N)),
            (je.greg(j["y"], j["h"], j["h_mean"], j["pi"], N, c=j["c"], mask=m),
             je.greg(sub["y"], sub["h"], j["h_mean"], sub["pi"], N, c=sub["c"])),
            (je.greg_coefficients(j["y"], j["h"], j["pi"], N, mask=m),
             je.greg_coefficients(sub["y"], sub["h"], sub["pi"], N)),
            # an empty sample: 0, not NaN
            (je.hajek(j["y1"], j["pi"], mask=jnp.zeros(9, bool)), jnp.zeros(())),
        ]  # fmt: skip

    j = {k: jnp.asarray(v) for k, v in data.items()}
    for a, b in pairs(j, {k: jnp.asarray(v) for k, v in sub.items()}, jnp.asarray(mask)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_poisson_design_exact_enumeration_with_masks(x64):
    """All 2^7 Poisson samples as masks (one vmapped, jitted call): E[HT] and E[difference] are
    the population mean exactly (1e-12); the design variance of HT equals the textbook formula
    sum_U (1 - pi_k)/pi_k y_k^2 / N^2."""
    rng = np.random.default_rng(0)
    pi = rng.uniform(0.2, 0.9, 7)
    y = rng.standard_normal((7, 2)) + 1.0
    y_hat = y + 0.1 * rng.standard_normal((7, 2))
    samples = reference.enumerate_poisson(pi)
    masks = np.zeros((len(samples), 7), bool)
    for i, s in enumerate(samples):
        masks[i, s.indices] = True
    prob = np.array([s.probability for s in samples])

    @jax.jit
    @jax.vmap
    def estimates(mask):
        ht = je.horvitz_thompson(jnp.asarray(y), jnp.asarray(pi), 7, mask=mask)
        diff = je.difference_estimator(
            jnp.asarray(y),
            jnp.asarray(y_hat),
            jnp.asarray(y_hat.mean(0)),
            jnp.asarray(pi),
            7,
            mask=mask,
        )
        return ht, diff

    ht, diff = (np.asarray(x) for x in estimates(jnp.asarray(masks)))
    np.testing.assert_allclose(prob @ ht, y.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(prob @ diff, y.mean(0), rtol=0, atol=1e-12)
    var = prob @ (ht - y.mean(0)) ** 2
    np.testing.assert_allclose(var, ((1 - pi) / pi) @ y**2 / 49, rtol=1e-10)


def test_design_inclusion_probabilities_match_torch(x64):
    sizes = np.array([1.0, 2.0, 3.0, 10.0, 0.5])
    t = td.PPSWithReplacement(torch.tensor(sizes), num_draws=4)
    j = jd.pps_with_replacement_inclusion_probabilities(jnp.asarray(sizes / sizes.sum()), 4)
    np.testing.assert_allclose(np.asarray(j), t.inclusion_probabilities().numpy(), rtol=1e-13)
    strata = [0, 0, 1, 1, 1, 2, 2, 2, 2, 0]
    t = td.StratifiedSampling(torch.tensor(strata), sample_size=5)
    labels, alloc = jd.stratified_allocation(strata, 5)
    assert alloc == t.sample_sizes
    j = jd.stratified_inclusion_probabilities(strata, alloc)
    np.testing.assert_allclose(np.asarray(j), t.inclusion_probabilities().numpy(), rtol=1e-15)


def test_sample_frequencies_match_inclusion_probabilities():
    """5000 draws of every design (one vmapped, jitted call): the empirical inclusion frequency
    of every unit is within 5 binomial standard deviations of pi_k (a wrong design, e.g.
    sampling with replacement or ignoring p_k, is off by tens of sd); SRS and stratified
    samples hold distinct units and the right number per stratum."""
    reps, n_units = 5000, 8
    pi = jnp.linspace(0.1, 0.9, n_units)
    sizes = jnp.arange(1.0, n_units + 1)
    strata = np.array([0, 0, 0, 1, 1, 1, 1, 1])

    @jax.jit
    @jax.vmap
    def draw(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return (
            jd.simple_random_sample(k1, n_units, 3).indices,
            jd.poisson_sample(k2, pi).mask,
            jd.pps_with_replacement_sample(k3, sizes, 2).indices,
            jd.stratified_sample(k4, strata, sample_sizes=[1, 2]).indices,
        )

    srs, masks, draws, st = (np.asarray(x) for x in draw(jax.random.split(jax.random.PRNGKey(0),
                                                                           reps)))  # fmt: skip

    def check(freq, pi):
        sd = np.sqrt(pi * (1 - pi) / reps)
        assert (np.abs(freq - pi) < 5 * sd + 1e-12).all(), (freq, pi)

    def frequencies(indices):
        onehot = np.zeros((reps, n_units))
        np.put_along_axis(onehot, indices, 1.0, axis=1)
        return onehot

    onehot = frequencies(srs)
    assert (onehot.sum(1) == 3).all()  # distinct units
    check(onehot.mean(0), np.full(n_units, 3 / n_units))
    check(masks.mean(0), np.asarray(pi))
    p = np.asarray(sizes / sizes.sum())
    check(frequencies(draws).mean(0), 1 - (1 - p) ** 2)  # a unit drawn twice counts once
    assert (strata[st[:, 0]] == 0).all() and (strata[st[:, 1:]] == 1).all()
    assert (st[:, 1] != st[:, 2]).all()
    check(
        frequencies(st).mean(0), np.asarray(jd.stratified_inclusion_probabilities(strata, [1, 2]))
    )


def test_loss_weights_give_the_estimate_as_a_gradient(x64):
    """jax.grad of sum_s w_k loss_k is the estimator applied to the per-example gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 3)))
    pi = jnp.asarray(rng.uniform(0.2, 0.8, 6))
    theta = jnp.asarray([0.3, -0.2, 0.1])

    def losses(th):
        return 0.5 * (x @ th - 1.0) ** 2

    w = je.horvitz_thompson_weights(pi, 50)
    g = jax.grad(lambda th: w @ losses(th))(theta)
    per_example = jax.jacrev(losses)(theta)
    np.testing.assert_allclose(g, je.horvitz_thompson(per_example, pi, 50), rtol=1e-12)


ERRORS = [
    (lambda: je.horvitz_thompson(jnp.ones((2, 2, 2)), jnp.ones(2), 4), r"Invalid y: expected"),
    (lambda: je.horvitz_thompson(jnp.ones(3), jnp.ones(2), 4), r"Invalid pi: .*\(3,\)"),
    (lambda: je.horvitz_thompson(jnp.ones(2), jnp.ones(2), 0), "Invalid population_size: 0"),
    (lambda: je.hajek(jnp.ones(2), jnp.ones(2), mask=jnp.ones(2)), "Invalid mask: expected bool"),
    (lambda: je.difference_estimator(jnp.ones(2), jnp.ones(3), 0.0, jnp.ones(2), 4),
     "Invalid y_hat"),
    (lambda: je.greg_weights(jnp.ones((2, 3)), jnp.ones(3), jnp.ones(2), 4), "singular"),
    (lambda: je.greg_weights(jnp.ones((3, 2)), jnp.ones(3), jnp.ones(3), 4),
     "Invalid h_population_mean"),
    (lambda: je.greg_weights(jnp.ones((3, 2)), jnp.ones(2), jnp.ones(3), 4, ridge=-1.0),
     "Invalid ridge"),
    (lambda: jd.simple_random_sample(jax.random.PRNGKey(0), 3, 4), "Invalid sample_size: 4"),
    (lambda: jd.stratified_sample(jax.random.PRNGKey(0), [0, 2], 2), "stratum 1 is empty"),
]  # fmt: skip


@pytest.mark.parametrize("make, message", ERRORS)
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_srs_horvitz_thompson_is_the_minibatch_mean():
    s = jd.simple_random_sample(jax.random.PRNGKey(3), 30, 6)
    y = jnp.arange(30.0) ** 2
    np.testing.assert_allclose(
        je.horvitz_thompson(y[s.indices], s.inclusion_probabilities, 30),
        y[s.indices].mean(),
        rtol=1e-6,
    )
    assert math.isclose(float(s.inclusion_probabilities.sum()), 6 * 6 / 30, rel_tol=1e-6)
