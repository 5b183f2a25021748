"""Importance sampling: exact unbiasedness, the τ criterion, weight diagnostics, the estimators."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from probopt.experiments.training import estimator_names, train
from probopt.experiments.training import make_estimator as make_by_name
from probopt.sampling.estimators import hansen_hurwitz, hansen_hurwitz_weights
from probopt.sampling.importance import (
    ESTIMATOR_NAMES,
    ImportanceEstimator,
    ImportanceWeightWarning,
    PresampleImportanceEstimator,
    ScoreTable,
    TauCondition,
    _Pending,
    diagnose_weights,
    draw_probabilities,
    kish_ess,
    make_estimator,
    pareto_khat,
    tau,
    tau_threshold,
    trace_variances,
)
from probopt.sampling.scores import cross_entropy_per_example as ce
from probopt.sampling.scores import exact_grad_norms
from probopt.sampling.variance import hansen_hurwitz_design_variance

# exact enumeration in float64: the expectation is a finite sum, equal to the target up to
# rounding of ~N^n terms (observed < 1e-15)
EXACT = 1e-12

NAN = math.nan
# a tiny population's stale scores: two never scored (NaN), one stale zero
STALE = torch.tensor([0.5, NAN, 2.0, 0.0, NAN, 3.0], dtype=torch.float64)


@pytest.fixture
def one_thread():
    """Loops of tiny steps: a second OpenMP thread only adds synchronisation (on a loaded 2-core
    machine ~2 ms per op instead of ~0.1 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def enumerate_mean(q, y, n):
    """E[Hansen-Hurwitz estimate] over all N^n ordered draws, by exact enumeration."""
    big_n = len(q)
    total = torch.zeros(y.shape[1:], dtype=torch.float64)
    for draws in itertools.product(range(big_n), repeat=n):
        idx = torch.tensor(draws)
        total += q[idx].prod() * hansen_hurwitz(y[idx], q[idx], big_n)
    return total


# ---------------------------------------------------------------------------------------------
# the design


def test_draw_probabilities_formula():
    q = draw_probabilities(torch.tensor([1.0, 3.0, NAN, 0.0]), smoothing=1.0, uniform_mix=0.2)
    s = torch.tensor([1.0, 3.0, 4 / 3, 0.0], dtype=torch.float64) + 1.0  # NaN -> mean of known
    torch.testing.assert_close(q, 0.8 * s / s.sum() + 0.2 / 4, rtol=0, atol=EXACT)


def test_smoothing_by_a_multiple_of_the_mean_is_mixing():
    s = torch.tensor([0.3, 1.0, 2.0, 5.0], dtype=torch.float64)
    gamma = 0.25
    a = draw_probabilities(s, smoothing=gamma * float(s.mean()))
    b = draw_probabilities(s, uniform_mix=gamma / (1 + gamma))
    torch.testing.assert_close(a, b, rtol=0, atol=EXACT)


@pytest.mark.parametrize(
    "smoothing, uniform_mix", [(0.1, 0.0), (0.0, 0.2), (1.0, 0.5)], ids=["smooth", "mix", "both"]
)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_stale_smoothed_design_is_exactly_unbiased_for_the_whole_population(
    smoothing, uniform_mix, n
):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64)  # per-example gradients
    q = draw_probabilities(STALE, smoothing=smoothing, uniform_mix=uniform_mix)
    assert bool((q > 0).all())
    torch.testing.assert_close(enumerate_mean(q, y, n), y.mean(0), rtol=0, atol=EXACT)


def test_dropping_stale_examples_is_unbiased_only_for_the_subset():
    # Alain et al.'s code: stale examples get probability 0, weights 1/(N_usable p)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64)
    usable = ~torch.isnan(STALE) & (STALE > 0)
    s = torch.where(usable, STALE, torch.zeros(()))
    p = s / s.sum()
    m = int(usable.sum())
    total = torch.zeros(4, dtype=torch.float64)
    for draws in itertools.product(range(6), repeat=2):
        idx = torch.tensor(draws)
        if not bool(usable[idx].all()):
            continue  # probability 0
        total += p[idx].prod() * hansen_hurwitz(y[idx], p[idx], m)
    torch.testing.assert_close(total, y[usable].mean(0), rtol=0, atol=EXACT)
    assert float((total - y.mean(0)).norm()) > 0.1  # biased for the population


def test_zero_scores_without_smoothing_are_refused():
    with pytest.raises(ValueError, match="example 3 would have draw probability 0"):
        draw_probabilities(STALE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scores": torch.tensor([1.0, -1.0])}, "example 1 has score -1.0"),
        ({"scores": torch.tensor([1.0, math.inf])}, "example 1 has score inf"),
        ({"scores": torch.ones(2, 2)}, "expected a non-empty"),
        ({"scores": torch.ones(2), "smoothing": -1.0}, "Invalid smoothing: -1.0"),
        ({"scores": torch.ones(2), "uniform_mix": 1.5}, "Invalid uniform_mix: 1.5"),
    ],
)
def test_draw_probabilities_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        draw_probabilities(**kwargs)


def test_proportional_to_fresh_norms_has_zero_variance_for_collinear_gradients():
    y = torch.tensor([[0.5, 1.0], [2.0, 4.0], [1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    q = draw_probabilities(y.norm(dim=1))
    for k in range(4):  # every single draw gives the mean exactly
        idx = torch.tensor([k])
        torch.testing.assert_close(hansen_hurwitz(y[idx], q[idx], 4), y.mean(0), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# the variance monitor and the τ criterion


def test_trace_variances_match_the_hansen_hurwitz_design_variance():
    g = torch.Generator().manual_seed(5)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) * torch.arange(1.0, 8.0)[:, None]
    norms, mu2 = y.norm(dim=1), float(y.mean(0).square().sum())
    q = draw_probabilities(norms.sqrt(), uniform_mix=0.1)
    tv = trace_variances(norms, q, mu2)
    for value, p in (
        (tv.uniform, torch.full((7,), 1 / 7, dtype=torch.float64)),
        (tv.ideal, norms / norms.sum()),
        (tv.design, q),
    ):
        ref = hansen_hurwitz_design_variance(y, p.double(), 1, trace=True)
        assert value == pytest.approx(float(ref), rel=EXACT)
    assert tv.ideal <= tv.design <= tv.uniform  # Cauchy-Schwarz, and q between ideal and uniform


def test_tau_closed_forms():
    assert tau(torch.ones(5)) == pytest.approx(1.0, rel=EXACT)
    assert tau(torch.tensor([1.0, 1.0, 1.0, 5.0])) == pytest.approx(math.sqrt(7) / 2, rel=EXACT)
    s = torch.rand(50, dtype=torch.float64) ** 3
    gk, u = s / s.sum(), 1 / 50
    kf = 1 / math.sqrt(1 - float((gk - u).square().sum()) / float(gk.square().sum()))
    assert tau(s) == pytest.approx(kf, rel=1e-10)  # KF's form (observed agreement ~1e-15)
    q = draw_probabilities(s, uniform_mix=0.3)  # a smoothed design: uniform / IS second moments
    tv = trace_variances(s, q, 0.0)
    assert tau(s, q) ** 2 == pytest.approx(tv.uniform / tv.design, rel=EXACT)
    assert tau(s, torch.full((50,), 1 / 50, dtype=torch.float64)) == pytest.approx(1.0, rel=EXACT)


def test_tau_threshold_and_condition():
    assert tau_threshold(192, 64) == 2.0 and tau_threshold(320, 64) == pytest.approx(8 / 3)
    cond = TauCondition(1.2, momentum=0.9)
    values = [cond.update(1.5) and cond.value for _ in range(30)]
    assert cond.value == pytest.approx(1.5 * (1 - 0.9**30), rel=EXACT)
    first_on = values.index(next(v for v in values if v))
    assert first_on == 15  # 1.5 (1 - 0.9^k) > 1.2  <=>  k >= 16
    with pytest.raises(ValueError, match="Invalid tau_momentum: 1.0"):
        TauCondition(1.0, momentum=1.0)


# ---------------------------------------------------------------------------------------------
# weight diagnostics


def test_kish_ess():
    assert kish_ess(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(16 / 6, rel=EXACT)
    assert kish_ess(torch.full((10,), 3.0)) == pytest.approx(10.0, rel=EXACT)


def test_pareto_khat_recovers_the_tail_index_and_has_the_right_sign():
    from arviz_stats.base import array_stats

    g = torch.Generator().manual_seed(0)
    for xi in (0.3, 0.9):
        w = torch.rand(16000, generator=g, dtype=torch.float64) ** -xi  # Pareto tail index xi
        k = pareto_khat(w)
        # 16000 draws: tail of ~380 weights, sd of k-hat ~0.1; 0.3 is three of them
        assert abs(k - xi) < 0.3
        ref = array_stats.pareto_khat(
            w.numpy(), chain_axis=None, draw_axis=-1, r_eff=1.0, tail="right"
        )
        assert k == pytest.approx(float(ref), rel=1e-10)  # psislw(-log w): the sign trap handled
    bounded = 1.0 + torch.rand(4000, generator=g, dtype=torch.float64)
    assert pareto_khat(bounded) < 0.5
    assert pareto_khat(torch.ones(50)) == -math.inf
    assert math.isnan(pareto_khat(torch.rand(10, generator=g, dtype=torch.float64) + 1))


def test_unsmoothed_small_scores_warn_and_smoothing_fixes_it():
    rng = np.random.default_rng(0)
    # q proportional to Gamma(a) scores: P_q(1/(Nq) > t) ~ t^-(1+a), a Pareto tail with index
    # 1/(1+a) = 0.91 for a = 0.1 (many tiny norms, huge weights)
    scores = torch.from_numpy(rng.gamma(0.1, size=1000))
    g = torch.Generator().manual_seed(1)
    for mix, heavy in ((0.0, True), (0.2, False)):
        q = draw_probabilities(scores, uniform_mix=mix)
        idx = torch.multinomial(q, 4000, replacement=True, generator=g)
        w = 1 / (1000 * q[idx])
        if heavy:
            with pytest.warns(ImportanceWeightWarning, match="Pareto k-hat"):
                d = diagnose_weights(w)
            assert d.khat > 0.7
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                d = diagnose_weights(w)
            assert d.khat < 0.7


# ---------------------------------------------------------------------------------------------
# the table and the estimators


def test_score_table_keeps_the_freshest():
    table = ScoreTable(5)
    assert table.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), 4) == 2
    assert table.update(torch.tensor([1, 2]), torch.tensor([7.0, 3.0]), 2) == 1
    assert table.update(torch.tensor([0]), torch.tensor([5.0]), 4) == 1  # same version: replace
    torch.testing.assert_close(table.scores[:3], torch.tensor([5.0, 2.0, 3.0], dtype=torch.float64))
    assert table.coverage() == pytest.approx(0.6) and table.mean_age(6) == pytest.approx(8 / 3)
    with pytest.raises(ValueError, match="outside"):
        table.update(torch.tensor([5]), torch.tensor([1.0]), 9)
    with pytest.raises(ValueError, match="finite and >= 0"):
        table.update(torch.tensor([1]), torch.tensor([NAN]), 9)


def tiny(n=6, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return net, x, torch.randint(0, 2, (n,), generator=g)


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def full_gradient(net, x, y):
    net.zero_grad()
    ce(net(x), y).mean().backward()
    out = flat_grad(net).clone()
    net.zero_grad()
    return out


def test_estimator_backward_is_exactly_unbiased_by_enumeration():
    net, x, y = tiny(5)
    est = ImportanceEstimator(uniform_mix=0.3, smoothing=0.05, refresh=False)
    est.setup(net, x, y)
    est.table.update(torch.tensor([0, 1, 3]), torch.tensor([0.5, 2.0, 0.0]), 0)  # 2, 4 unknown
    q = est.probabilities()
    expected = torch.zeros_like(full_gradient(net, x, y))
    for draws in itertools.product(range(5), repeat=2):
        idx = torch.tensor(draws)
        est._pending = _Pending(idx, hansen_hurwitz_weights(q[idx], 5))  # what a draw leaves
        net.zero_grad()
        est.backward(net, ce, x[idx], y[idx], idx)
        expected += q[idx].prod() * flat_grad(net)
    torch.testing.assert_close(expected, full_gradient(net, x, y), rtol=0, atol=EXACT)


@pytest.mark.parametrize("refresh", [False, True])
def test_estimator_mean_gradient_through_the_loop(refresh, one_thread):
    # parameters held fixed: the running mean of .grad must approach the full gradient
    net, x, y = tiny(6)
    est = ImportanceEstimator(uniform_mix=0.25, tau_threshold=1.0, refresh=refresh)
    est.setup(net, x, y)
    est.table.update(torch.arange(6), torch.tensor([0.1, 0.2, 0.4, 1.0, 2.0, 4.0]), 0)
    est.tau_condition.value = 10.0  # importance sampling on from the first draw
    mu = full_gradient(net, x, y)
    total, steps, b = torch.zeros_like(mu), 0, 3
    for epoch in range(300):
        for index in est.epoch_batches(b, torch.Generator().manual_seed(epoch)):
            net.zero_grad()
            est.backward(net, ce, x[index], y[index], index)
            est.after_step(net)
            total += flat_grad(net)
            steps += 1
    assert est.active
    norms = exact_grad_norms(net, ce, x, y)
    bound = float(norms.square().mean()) / 0.25 / b  # tr Cov per step <= mean||g||^2 / (lambda b)
    err = float((total / steps - mu).square().sum())
    assert err < 5 * bound / steps  # ||mean - mu||^2 has expectation <= bound/steps (p = 26)


def test_refresh_writes_exact_norms_with_the_version():
    net, x, y = tiny(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    est = ImportanceEstimator(sweep=0)
    est.setup(net, x, y)
    for index in est.epoch_batches(4, torch.Generator().manual_seed(0)):
        before = exact_grad_norms(net, ce, x, y)
        opt.zero_grad()
        est.backward(net, ce, x[index], y[index], index)
        opt.step()
        version = est.version
        est.after_step(net)
        assert est.version == version + 1
        fresh = est.table.versions == version
        assert set(torch.nonzero(fresh).flatten().tolist()) == set(index.tolist())
        torch.testing.assert_close(est.table.scores[fresh], before[fresh], rtol=1e-10, atol=0)


def test_the_sweep_rescores_round_robin_at_the_new_parameters():
    net, x, y = tiny(8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    est = ImportanceEstimator(sweep=3, refresh=False)  # without refresh it sweeps every step
    est.setup(net, x, y)
    blocks = []
    for epoch in range(2):
        for index in est.epoch_batches(4, torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            est.backward(net, ce, x[index], y[index], index)
            opt.step()
            est.after_step(net)
            fresh = torch.nonzero(est.table.versions == est.version).flatten()
            blocks.append(fresh.tolist())
            ref = exact_grad_norms(net, ce, x[fresh], y[fresh])  # the parameters after the step
            torch.testing.assert_close(est.table.scores[fresh], ref, rtol=1e-10, atol=0)
    assert blocks == [[0, 1, 2], [3, 4, 5], [0, 6, 7], [1, 2, 3]]
    assert est.tau_condition.threshold == pytest.approx(1 + 2 * 3 / (3 * 4))  # (2r + 3b)/(3b)


def test_the_tau_switch():
    net, x, y = tiny(8)
    for scores, on in (([1.0] * 8, False), ([0.1] * 6 + [5.0, 5.0], True)):
        est = ImportanceEstimator(tau_threshold=1.2, refresh=False)
        est.setup(net, x, y)
        est.table.update(torch.arange(8), torch.tensor(scores), 0)
        for _ in range(60):
            est.after_step(net)
        assert est.active is on
        weights = []
        for index in est.epoch_batches(4, torch.Generator().manual_seed(0)):
            est.backward(net, ce, x[index], y[index], index)
            weights.append(est.last_weights)
        uniform = all(bool((w == 0.25).all()) for w in weights)  # 1/(b N (1/N))
        assert uniform is not on


def test_backward_needs_the_yielded_index():
    net, x, y = tiny(8)
    est = ImportanceEstimator()
    est.setup(net, x, y)
    next(est.epoch_batches(4, torch.Generator().manual_seed(0)))
    with pytest.raises(RuntimeError, match="just yielded"):
        est.backward(net, ce, x[:4], y[:4], torch.arange(4) + 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score": "nope"}, "Invalid score: 'nope'"),
        ({"smoothing": -0.1}, "Invalid smoothing: -0.1"),
        ({"uniform_mix": 2}, "Invalid uniform_mix: 2"),
        ({"workers": -1}, "Invalid workers: -1"),
        ({"backend": "mpi"}, "Invalid backend: 'mpi'"),
        ({"sync_every": 0}, "Invalid sync_every: 0"),
        ({"tau_threshold": -1.0}, "Invalid tau_threshold: -1.0"),
        ({"sweep": -2}, "Invalid sweep: -2"),
    ],
)
def test_estimator_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImportanceEstimator(**kwargs)


def test_presample_estimator_is_exactly_unbiased_given_the_presample(one_thread):
    # given presample U, E[weighted draw] = mean over U; U uniform => population mean
    net, x, y = tiny(3)
    est = PresampleImportanceEstimator(presample=1.0, uniform_mix=0.1, tau_threshold=0.0)
    est.setup(net, x, y)
    est.tau_condition.value = 1.0
    gen = torch.Generator().manual_seed(0)
    index = next(est.epoch_batches(2, gen))  # one IS draw: B = 2
    assert not est._uniform and index.shape == (2,)
    weights = est._pending.weights
    est.backward(net, ce, x[index], y[index], index)
    torch.testing.assert_close(est.last_weights, weights)
    # the algebra on enumerated presamples: average over U of the mean over U = population mean
    total = torch.zeros_like(full_gradient(net, x, y))
    for u in itertools.product(range(3), repeat=2):
        u = torch.tensor(u)
        s = torch.rand(2, dtype=torch.float64)
        q = draw_probabilities(s, uniform_mix=0.1)
        inner = torch.zeros_like(total)
        for j in itertools.product(range(2), repeat=2):
            j = torch.tensor(j)
            net.zero_grad()
            (hansen_hurwitz_weights(q[j], 2) * ce(net(x[u[j]]), y[u[j]])).sum().backward()
            inner += q[j].prod() * flat_grad(net)
        total += inner / 3**2
    torch.testing.assert_close(total, full_gradient(net, x, y), rtol=0, atol=EXACT)


def test_registry_names_reach_the_cli_lookup():
    names = estimator_names()
    for name in ESTIMATOR_NAMES:
        assert name in names
        assert make_by_name(name).name == name
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        make_estimator("nope")


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_tiny_training_run_by_name(name):
    run = train("iris", "sgdm", network="mlp", epochs=3, batch_size=16, lr=0.05,
                estimator=make_by_name(name))  # fmt: skip
    assert run.estimator == name and not run.diverged
    assert run.train_loss[-1] < run.train_loss[0]
