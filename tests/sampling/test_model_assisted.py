"""Model-assisted estimators in the training loop: exact unbiasedness, GREG weights, reductions."""

import copy
import itertools

import pytest
import torch
from torch import nn

from probopt.sampling.auxiliary import ClassOneHot, Intercept, Product, RawInputs
from probopt.sampling.estimators import difference_estimator, greg
from probopt.sampling.gradient_estimator import UniformEstimator
from probopt.sampling.model_assisted import (
    ESTIMATOR_NAMES,
    CachedGradientEstimator,
    DifferenceEstimator,
    GREGEstimator,
    make_estimator,
    train_epoch,
)
from probopt.sampling.per_example import per_example_grads, select_parameters


def ce(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def tiny(n_pop=8, d=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pop, d, generator=g, dtype=torch.float64)
    y = torch.arange(n_pop) % c
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, c)).double()
    return x, y, net


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def full_gradient(net, x, y):
    net.zero_grad()
    ce(net(x), y).mean().backward()
    out = flat_grad(net).clone()
    net.zero_grad()
    return out


def enumerate_estimates(est, net, x, y, n):
    """The estimate of every SRSWOR sample of size n, each from a copy of the frozen state."""
    rows = []
    for subset in itertools.combinations(range(len(x)), n):
        idx = torch.tensor(subset)
        e = copy.deepcopy(est)
        net.zero_grad()
        e.backward(net, ce, x[idx], y[idx], idx)
        rows.append(flat_grad(net).clone())
    net.zero_grad()
    return torch.stack(rows)


def warm_up(est, net, x, y, n, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:n]
        net.zero_grad()
        est.backward(net, ce, x[idx], y[idx], idx)
    net.zero_grad()


# ---- exact unbiasedness by enumeration (float64: every sample of a population of 8)


@pytest.mark.parametrize("aux", ["pca", "onehot", "residual-pca", "loss-class"])
def test_difference_estimator_is_exactly_unbiased_for_a_fixed_b(aux):
    x, y, net = tiny()
    est = DifferenceEstimator(aux, k=2, params="last", refit_every=10**9)
    est.setup(net, x, y)
    warm_up(est, net, x, y, 3)  # fills the cached tables; B is refit only at step 0
    g = torch.Generator().manual_seed(5)
    est.linear_model.coef = torch.randn(
        est.auxiliary.dim, est.linear_model.p, generator=g, dtype=torch.float64
    )
    estimates = enumerate_estimates(est, net, x, y, 3)
    # exact: the mean over all C(8, 3) equally likely samples is the full-data gradient
    torch.testing.assert_close(estimates.mean(0), full_gradient(net, x, y), atol=1e-12, rtol=0)
    # and not trivially: the correction moved the estimates away from the plain means
    plain = enumerate_estimates(UniformEstimator(), net, x, y, 3)
    assert (estimates - plain).abs().max() > 1e-3


def test_difference_estimator_matches_the_survey_formula():
    x, y, net = tiny()
    est = DifferenceEstimator("pca", k=2, params="last", refit_every=10**9)
    est.setup(net, x, y)
    est.steps = 1  # no refit inside backward
    b = torch.randn(est.auxiliary.dim, est.linear_model.p, dtype=torch.float64)
    est.linear_model.coef = b
    idx = torch.tensor([0, 2, 5])
    net.zero_grad()
    est.backward(net, ce, x[idx], y[idx], idx)
    names = select_parameters(net, "last")
    params = dict(net.named_parameters())
    got = torch.cat([params[n].grad.reshape(-1) for n in names])
    g_s = per_example_grads(net, ce, x[idx], y[idx], params="last", flat=True)
    h_s = est.auxiliary(x[idx], y[idx], idx)
    pi = torch.full((3,), 3 / 8, dtype=torch.float64)
    ref = difference_estimator(g_s, h_s @ b, est.auxiliary.population_mean @ b, pi, 8)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("coef", [None, 1.0, 0.3])
def test_cached_gradient_estimator_is_exactly_unbiased(coef):
    x, y, net = tiny()
    est = CachedGradientEstimator(coef=coef, coef_every=1)
    est.setup(net, x, y)
    warm_up(est, net, x, y, 3, steps=8)
    if coef is None:
        assert all(0.0 < float(b) <= 1.0 for b in est.coef.values())
    estimates = enumerate_estimates(est, net, x, y, 3)
    torch.testing.assert_close(estimates.mean(0), full_gradient(net, x, y), atol=1e-12, rtol=0)


def test_cached_gradient_estimator_with_coef_one_is_saga():
    x, y, net = tiny()
    est = CachedGradientEstimator(coef=1.0)
    est.setup(net, x, y)
    n_pop = len(x)
    table = torch.zeros(n_pop, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        idx = torch.randperm(n_pop, generator=gen)[:3]
        g_s = per_example_grads(net, ce, x[idx], y[idx], flat=True)
        saga = g_s.mean(0) - table[idx].mean(0) + table.mean(0)
        net.zero_grad()
        est.backward(net, ce, x[idx], y[idx], idx)
        torch.testing.assert_close(flat_grad(net), saga, atol=1e-12, rtol=0)
        table[idx] = g_s
        with torch.no_grad():  # move theta so that stale and fresh gradients differ
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))


def test_cached_gradient_estimator_resync_and_non_sequential():
    x, y, net = tiny()
    est = CachedGradientEstimator()
    est.setup(net, x, y)
    assert est._static == {"0"}  # the first layer sees the network input
    for idx in est.epoch_batches(3, torch.Generator().manual_seed(0)):
        net.zero_grad()
        est.backward(net, ce, x[idx], y[idx], idx)
    before = {k: v.clone() for k, v in est.table.sum_w.items()}
    list(est.epoch_batches(3))  # starts an epoch: exact recomputation
    for k in before:
        torch.testing.assert_close(est.table.sum_w[k], before[k], atol=1e-12, rtol=0)
    conv = nn.Sequential(
        nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 3)
    ).double()
    with pytest.raises(ValueError, match="nn.Linear"):
        CachedGradientEstimator(params=None).setup(conv, x, y)
    est = CachedGradientEstimator()  # "linear": the dense layers only
    est.setup(conv, x, y)
    assert est._static == set()


# ---- GREG (Variant G)


@pytest.mark.parametrize("aux", ["onehot", "pca", "loss-class"])
def test_greg_weighted_backward_is_the_weighted_sum_of_per_example_gradients(aux):
    x, y, net = tiny(n_pop=12)
    ridge = 1e-9  # keeps M invertible while the cached losses of a class are still all equal
    est = GREGEstimator(aux, k=2, ridge=ridge)
    est.setup(net, x, y)
    warm_up(est, net, x, y, 7)
    idx = torch.tensor([0, 1, 3, 4, 6, 8, 11])
    w = est.weights(x[idx], y[idx], idx)
    g_s = per_example_grads(net, ce, x[idx], y[idx], flat=True)
    h_s = est.auxiliary(x[idx], y[idx], idx)
    net.zero_grad()
    est.backward(net, ce, x[idx], y[idx], idx)
    torch.testing.assert_close(est.last_weights, w, atol=0, rtol=0)
    # one backward of sum_k w_k l_k gives sum_k w_k g_k (float64, rounding only) ...
    torch.testing.assert_close(flat_grad(net), w @ g_s, atol=1e-12, rtol=0)
    # ... which is the GREG estimate of the mean gradient, and calibrated on h
    pi = torch.full((7,), 7 / 12, dtype=torch.float64)
    ref = greg(g_s, h_s, est.auxiliary.population_mean, pi, 12, ridge=ridge)
    torch.testing.assert_close(flat_grad(net), ref, atol=1e-10, rtol=0)
    # the ridge relaxes the calibration equations by O(ridge * |lambda|)
    torch.testing.assert_close(w @ h_s, est.auxiliary.population_mean, atol=1e-6, rtol=0)


def test_greg_clipping_bounds_and_renormalises():
    x, y, net = tiny(n_pop=12)
    est = GREGEstimator("pca", k=3, clip=(0.5, 1.5))
    est.setup(net, x, y)
    idx = torch.tensor([0, 1, 2, 3, 4])
    raw = GREGEstimator("pca", k=3)
    raw.setup(net, x, y)
    assert (raw.weights(x[idx], y[idx], idx) * 5).max() > 1.5  # the clip is active here
    w = est.weights(x[idx], y[idx], idx)
    clipped = raw.weights(x[idx], y[idx], idx).clamp(0.5 / 5, 1.5 / 5)
    torch.testing.assert_close(w, clipped / clipped.sum(), atol=1e-15, rtol=0)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)


# ---- no auxiliary information: the plain minibatch mean, exactly


@pytest.mark.parametrize(
    "make",
    [
        lambda: GREGEstimator(Intercept()),
        lambda: DifferenceEstimator("intercept", params=None),
        lambda: DifferenceEstimator(Intercept(), params="last", refit_every=1),
    ],
)
def test_intercept_only_reproduces_the_plain_mean_exactly(make):
    x, y, net = tiny(n_pop=16)
    ref_net = copy.deepcopy(net)
    est, uni = make(), UniformEstimator()
    est.setup(net, x, y)
    uni.setup(ref_net, x, y)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref_net.parameters(), lr=0.05)
    for epoch in range(3):
        train_epoch(net, opt, est, ce, x, y, 4, generator=torch.Generator().manual_seed(epoch))
        train_epoch(
            ref_net, ref_opt, uni, ce, x, y, 4, generator=torch.Generator().manual_seed(epoch)
        )
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(p, q)  # bit for bit after 12 optimizer steps


# ---- variance reduction where h predicts g


def synthetic_logistic(n_pop=2000, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_pop, d, generator=g, dtype=torch.float64)
    w = torch.tensor([2.0, -1.0], dtype=torch.float64)
    y = (torch.rand(n_pop, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).long()
    torch.manual_seed(seed)
    net = nn.Linear(d, 2).double()
    with torch.no_grad():  # a point mid-way to the optimum
        net.weight.copy_(torch.tensor([[-0.5, 0.2], [0.5, -0.3]], dtype=torch.float64))
    return x, y, net


def mse_ratio(est, net, x, y, n, batches=300, seed=0):
    full = full_gradient(net, x, y)
    frozen = copy.deepcopy(est)
    gen = torch.Generator().manual_seed(seed)
    se, se_uniform = 0.0, 0.0
    for _ in range(batches):
        idx = torch.randperm(len(x), generator=gen)[:n]
        e = copy.deepcopy(frozen)
        net.zero_grad()
        e.backward(net, ce, x[idx], y[idx], idx)
        se += float((flat_grad(net) - full).pow(2).sum())
        net.zero_grad()
        ce(net(x[idx]), y[idx]).mean().backward()
        se_uniform += float((flat_grad(net) - full).pow(2).sum())
    net.zero_grad()
    return se / se_uniform


@pytest.mark.parametrize(
    "make, bound",
    [
        # inputs x class explains most of the per-example gradient of a 2-d logistic regression
        # (shared/notes/model_assisted.md section 6.4 measured 0.14); with 300 batches the ratio's
        # Monte Carlo error is a few per cent, so 0.5 leaves a wide margin on both sides
        (
            lambda: DifferenceEstimator(
                Product(ClassOneHot(), RawInputs()), params=None, forgetting=1.0
            ),
            0.5,
        ),
        (lambda: GREGEstimator(Product(ClassOneHot(), RawInputs())), 0.5),
        (lambda: CachedGradientEstimator(), 0.5),
    ],
)
def test_variance_reduction_when_h_predicts_the_gradient(make, bound):
    x, y, net = synthetic_logistic()
    est = make()
    est.setup(net, x, y)
    for epoch in range(2):  # learn B; fill the tables and revisit them (the cached coefficient)
        for idx in est.epoch_batches(32, torch.Generator().manual_seed(epoch)):
            net.zero_grad()
            est.backward(net, ce, x[idx], y[idx], idx)
    ratio = mse_ratio(est, net, x, y, 32)
    assert ratio < bound, ratio


# ---- the registry, the helper, validation


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_registry_builds_and_trains(name):
    x, y, net = tiny(n_pop=40, d=6)
    est = make_estimator(name)
    assert est.name == name
    est.setup(net, x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = [train_epoch(net, opt, est, ce, x, y, 8) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert repr(est)


def test_registry_overrides_and_unknown_name():
    est = make_estimator("difference-lastlayer", refit_every=3, ridge=0.1)
    assert (est.refit_every, est.ridge, est.name) == (3, 0.1, "difference-lastlayer")
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        make_estimator("nope")


def test_func_and_hook_per_example_paths_agree():
    x, y, net = tiny(n_pop=12)
    fits = []
    for method in ("hooks", "func"):
        est = DifferenceEstimator("pca", k=2, params="linear", per_example=method)
        est.setup(net, x, y)
        warm_up(est, net, x, y, 4, steps=3)
        fits.append(est.linear_model.coef)
    torch.testing.assert_close(fits[0], fits[1], atol=1e-10, rtol=0)


def test_non_dense_parameters_fall_back_to_torch_func():
    x, y, _ = tiny()
    net = nn.Sequential(
        nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2), nn.Flatten(), nn.Linear(4, 3)
    ).double()
    est = DifferenceEstimator("pca", k=2, params=None)
    est.setup(net, x, y)
    assert est._method == "func"
    warm_up(est, net, x, y, 3, steps=2)
    with pytest.raises(ValueError, match="nn.Linear"):
        DifferenceEstimator("pca", params=None, per_example="hooks").setup(net, x, y)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GREGEstimator(ridge=-1.0), "Invalid ridge"),
        (lambda: GREGEstimator(clip=(1.2, 2.0)), "Invalid clip"),
        (lambda: GREGEstimator(auxiliary=3), "auxiliary must be"),
        (lambda: DifferenceEstimator(forgetting=0.0), "Invalid forgetting"),
        (lambda: DifferenceEstimator(refit_every=0), "Invalid refit_every"),
        (lambda: DifferenceEstimator(per_example="magic"), "Invalid per_example"),
        (lambda: CachedGradientEstimator(forgetting=2.0), "Invalid forgetting"),
        (lambda: CachedGradientEstimator(coef=float("nan")), "Invalid coef"),
        (lambda: CachedGradientEstimator(coef_every=0), "Invalid coef_every"),
    ],
)
def test_validation(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_estimators_copy_without_the_model():
    # a frozen copy must keep working on the original network (the benchmarks rely on it)
    x, y, net = tiny()
    for est in (CachedGradientEstimator(), DifferenceEstimator("pca", k=2)):
        est.setup(net, x, y)
        warm_up(est, net, x, y, 3, steps=2)
        clone = copy.deepcopy(est)
        assert "_capture_cache" not in clone.__dict__
        idx = torch.tensor([0, 1, 2])
        net.zero_grad()
        clone.backward(net, ce, x[idx], y[idx], idx)
        assert all(p.grad is not None for p in net.parameters())
