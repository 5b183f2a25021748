"""Estimator variance recorded per batch: exact unbiasedness by enumerating every SRS sample."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("arviz_base")

from probopt.diagnostics import Recorder, to_datatree  # noqa: E402
from probopt.sampling import (  # noqa: E402
    DifferenceEstimator,
    GREGEstimator,
    SimpleRandomSampling,
    greg_variance,
    per_example_grads,
    srs_design_variance,
)
from probopt.sampling.gradient_estimator import UniformEstimator  # noqa: E402

N, n = 6, 3  # C(6, 3) = 20 samples, all equally likely under SRSWOR


def _loss(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


def _setup(estimator):
    torch.manual_seed(0)
    x = torch.randn(N, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    estimator.setup(net, x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # theta stays fixed across the samples
    return net, opt, x, y


def _enumerate(net, opt, est, x, y, rec):
    grads = []
    for sample in itertools.combinations(range(N), n):
        idx = torch.tensor(sample)
        opt.zero_grad()
        est.backward(net, _loss, x[idx], y[idx], idx)
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        opt.step()
    return torch.stack(grads)


def _check(rec, realized, exact):
    """Mean of the per-sample estimates = exact design variance = variance of the realized
    gradients over all samples (float64 enumeration: only rounding, 1e-10 relative)."""
    dt = to_datatree(rec)
    est = dt["estimator"]
    assert est.sizes["step"] == 20
    mean_estimate = float(est["variance"].mean())
    realized_var = float(((realized - realized.mean(0)) ** 2).sum(1).mean())
    assert mean_estimate == pytest.approx(exact, rel=1e-10)
    assert realized_var == pytest.approx(exact, rel=1e-10)
    return est


def test_uniform_estimator_variance_is_unbiased_by_enumeration():
    est = UniformEstimator()
    net, opt, x, y = _setup(est)
    rec = Recorder(opt, model=net, estimator=est, coordinates=0)
    realized = _enumerate(net, opt, est, x, y, rec)
    pop = per_example_grads(net, _loss, x, y, flat=True)
    exact = float(srs_design_variance(pop, n, trace=True))
    out = _check(rec, realized, exact)
    np.testing.assert_array_equal(out["variance"].values, out["uniform_variance"].values)


def test_difference_estimator_variance_uses_the_residuals_of_its_fixed_model():
    est = DifferenceEstimator("onehot", params="last", refit_every=10**9)
    net, opt, x, y = _setup(est)
    g = torch.Generator().manual_seed(3)
    est.linear_model.coef = torch.randn(est.linear_model.coef.shape, generator=g,
                                        dtype=torch.float64) * 0.1  # fmt: skip
    est.steps = 1  # 1 % refit_every != 0: the working model is never refit
    rec = Recorder(opt, model=net, estimator=est, coordinates=0)
    realized = _enumerate(net, opt, est, x, y, rec)
    # exact: (1 - f)/n S_e^2 with e_k = y_k - B^T h_k on the last layer, e_k = y_k elsewhere
    pop = per_example_grads(net, _loss, x, y, flat=True)
    h = est.auxiliary(x, y, torch.arange(N)).double()
    resid = pop.clone()
    last = sum(p.numel() for p in net[0].parameters())
    resid[:, last:] -= h @ est.linear_model.coef
    exact = float(srs_design_variance(resid, n, trace=True))
    out = _check(rec, realized, exact)
    # the uniform variance is recorded on the same batches: its mean is the plain mean's
    uniform = float(srs_design_variance(pop, n, trace=True))
    assert float(out["uniform_variance"].mean()) == pytest.approx(uniform, rel=1e-10)
    assert exact != pytest.approx(uniform, rel=1e-3)  # the residuals really were used


def test_greg_variance_uses_the_auxiliary_rows_from_before_the_backward():
    # "onehot+loss" has a cached-loss column that the estimator's backward overwrites with the
    # batch's fresh losses: the variance must use the rows (and h-bar) the weights were built
    # from. Parity with greg_variance on those rows (float64; rounding only).
    est = GREGEstimator("onehot+loss", ridge=1e-6)
    net, opt, x, y = _setup(est)
    rec = Recorder(opt, model=net, estimator=est, coordinates=0)
    expected, changed = [], []
    for sample in [(0, 1, 2, 3), (2, 3, 4, 5)]:  # each batch has unvisited examples
        idx = torch.tensor(sample)
        h = est.auxiliary(x[idx], y[idx], idx).clone()
        hbar = est.auxiliary.population_mean.clone()
        opt.zero_grad()
        est.backward(net, _loss, x[idx], y[idx], idx)
        changed.append(not torch.equal(h, est.auxiliary(x[idx], y[idx], idx)))
        design = SimpleRandomSampling(N, len(sample))
        pop = per_example_grads(net, _loss, x[idx], y[idx], flat=True)
        v = greg_variance(
            pop,
            h,
            hbar,
            design.inclusion_probabilities()[idx],
            design.joint_inclusion_probabilities(idx),
            N,
            ridge=1e-6,
            trace=True,
        )
        expected.append(float(v))
        opt.step()
    assert all(changed)  # the cached column did change during each backward
    got = to_datatree(rec)["estimator"]["variance"].values
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_wrapping_leaves_the_estimator_unchanged():
    grads = []
    for record in (False, True):
        est = DifferenceEstimator("onehot", params="last", refit_every=1)
        net, opt, x, y = _setup(est)
        rec = Recorder(opt, model=net, estimator=est) if record else None
        out = []
        for sample in [(0, 1, 2), (3, 4, 5), (1, 3, 5)]:
            idx = torch.tensor(sample)
            opt.zero_grad()
            est.backward(net, _loss, x[idx], y[idx], idx)
            out.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
            opt.step()
        grads.append(torch.stack(out))
        if rec is not None:
            assert "backward" in est.__dict__
            rec.close()
            assert "backward" not in est.__dict__  # the class method is back
    assert torch.equal(grads[0], grads[1])


def test_unknown_estimator_records_nan_for_its_own_variance():
    class Custom(UniformEstimator):
        def backward(self, model, loss_fn, x, y, index):
            return super().backward(model, loss_fn, x, y, index)

    est = Custom()
    net, opt, x, y = _setup(est)
    rec = Recorder(opt, model=net, estimator=est)
    idx = torch.tensor([0, 1, 2, 3])
    est.backward(net, _loss, x[idx], y[idx], idx)
    opt.step()
    e = to_datatree(rec)["estimator"]
    assert np.isnan(e["variance"].values).all() and np.isfinite(e["uniform_variance"].values).all()


def test_hansen_hurwitz_variances_are_unbiased_by_enumeration():
    # N = 4 units, b = 2 draws with replacement from a non-uniform q: all 16 ordered draws with
    # probability q_i q_j. E[V_HH] is the HH design variance; E[V_unif] the SRSWOR variance of
    # the plain mean (sizes b): both exactly, float64 rounding only.
    from probopt.diagnostics import hansen_hurwitz_uniform_variance
    from probopt.sampling import hansen_hurwitz_variance, hansen_hurwitz_weights

    g = torch.tensor([[1.0, 0.5], [2.0, -1.0], [-0.5, 3.0], [0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    big_n, b = 4, 2
    mu = g.mean(0)
    e_hh = e_unif = 0.0
    for i, j in itertools.product(range(big_n), repeat=b):
        idx = torch.tensor([i, j])
        prob = float(q[i] * q[j])
        w = hansen_hurwitz_weights(q[idx], big_n)
        e_hh += prob * float(hansen_hurwitz_variance(g[idx], q[idx], big_n, trace=True))
        e_unif += prob * hansen_hurwitz_uniform_variance(g[idx], w, big_n)
    exact_hh = float(((g.pow(2).sum(1) / (big_n**2 * q)).sum() - mu.pow(2).sum()) / b)
    assert e_hh == pytest.approx(exact_hh, rel=1e-12)
    assert e_unif == pytest.approx(float(srs_design_variance(g, b, trace=True)), rel=1e-12)


def test_importance_estimator_records_weights_and_design_diagnostics():
    from probopt.sampling import hansen_hurwitz_variance
    from probopt.sampling.importance import ImportanceEstimator

    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    est = ImportanceEstimator(tau_threshold=0.0, smoothing=0.01)  # importance on after step 1
    est.setup(net, x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    rec = Recorder(opt, model=net, estimator=est, variance_every=2)
    weights, expected = {}, {}
    for index in est.epoch_batches(8, torch.Generator().manual_seed(0)):
        opt.zero_grad()
        est.backward(net, _loss, x[index], y[index], index)
        step = rec.step + 1
        w = est.last_weights.clone()
        weights[step] = w
        g = per_example_grads(net, _loss, x[index], y[index], flat=True)
        q = 1 / (len(index) * 64 * w)
        expected[step] = float(hansen_hurwitz_variance(g, q, 64, trace=True))
        opt.step()
        est.after_step(net)
    dt = to_datatree(rec)
    imp, e = dt["importance"], dt["estimator"]
    steps = imp["step"].values.tolist()
    assert steps == list(range(2, 9, 2))
    np.testing.assert_allclose(imp["log_weights"].values,
                               np.log(np.stack([weights[s].numpy() for s in steps])))  # fmt: skip
    np.testing.assert_allclose(e["variance"].values, [expected[s] for s in steps], rtol=1e-10)
    assert imp["active"].values.tolist()[1:] == [1, 1, 1]  # importance sampling switched on
    assert np.all((imp["design_ess"].values > 0) & (imp["design_ess"].values <= 1))
    assert np.isfinite(imp["design_khat"].values).all()


def test_cached_gradient_estimator_variance_by_enumeration():
    # Fill the table with one pass, fix beta_L; then every sample starts from that same state
    # (a deep copy: the backward overwrites the batch's rows). Mean of the estimates = exact
    # design variance of the realized gradients = (1 - f)/n S_e^2, e_k = g_k - beta g~_k.
    import copy

    from probopt.sampling import CachedGradientEstimator

    est0 = CachedGradientEstimator(coef=0.7)
    net, opt, x, y = _setup(est0)
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])):
        opt.zero_grad()
        est0.backward(net, _loss, x[idx], y[idx], idx)
    est0.__dict__.pop("_capture_cache", None)  # holds the model; not part of the state
    realized, estimates = [], []
    for sample in itertools.combinations(range(N), n):
        idx = torch.tensor(sample)
        est = copy.deepcopy(est0)
        rec = Recorder(opt, model=net, estimator=est, coordinates=0)
        opt.zero_grad()
        est.backward(net, _loss, x[idx], y[idx], idx)
        realized.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        opt.step()
        estimates.append(float(to_datatree(rec)["estimator"]["variance"][0]))
        rec.close()
    realized = torch.stack(realized)
    pop = per_example_grads(net, _loss, x, y, flat=True)
    cached = []  # the table's per-example gradients, in the parameters' flat layout
    for lname in ("0", "2"):
        a, d = est0.table.rows(lname, torch.arange(N))
        cached += [(d[:, :, None] * a[:, None, :]).flatten(1), d]
    resid = pop - 0.7 * torch.cat(cached, 1)
    exact = float(srs_design_variance(resid, n, trace=True))
    realized_var = float(((realized - realized.mean(0)) ** 2).sum(1).mean())
    assert np.mean(estimates) == pytest.approx(exact, rel=1e-10)
    assert realized_var == pytest.approx(exact, rel=1e-10)
