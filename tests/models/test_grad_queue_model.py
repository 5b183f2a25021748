"""The Grad Queue model: running sums, predictive distribution, scarcity, amplification, length."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from probopt.models import grad_queue as gq


def test_running_sums_with_eviction_match_a_sliding_window():
    # float64 and a shift at the stream's level: agreement to rounding (1e-9 relative)
    stream = 3.0 + 0.1 * torch.randn(50, 7, dtype=torch.float64)
    q = 8
    shift = stream[0]
    total, total_sq = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for t in range(len(stream)):
        if t >= q:
            total, total_sq = gq.queue_evict(shift, total, total_sq, stream[t - q])
        total, total_sq = gq.queue_push(shift, total, total_sq, stream[t])
        window = stream[max(0, t - q + 1) : t + 1]
        exact = gq.queue_sums(window, shift)
        torch.testing.assert_close(total, exact[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(total_sq, exact[1], rtol=1e-9, atol=1e-12)
        if len(window) >= 2:
            mean, scale = gq.queue_moments(shift, total, total_sq, len(window))
            torch.testing.assert_close(mean, window.mean(0), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(scale, window.std(0), rtol=1e-9, atol=1e-12)


def test_shifted_sums_survive_a_large_mean_in_float32():
    # |mu| / sigma = 1e4: unshifted sums lose the variance completely in float32
    window = 1e4 + torch.randn(16, 5)
    mean, scale = gq.queue_moments(window[0], *gq.queue_sums(window, window[0]), 16)
    torch.testing.assert_close(scale, window.double().std(0).float(), rtol=1e-3, atol=0)


def test_scarcity_is_one_minus_the_two_sided_tail_of_the_pyro_predictive():
    mean, scale = torch.randn(20, dtype=torch.float64), torch.rand(20, dtype=torch.float64) + 0.1
    grad = mean + 3 * torch.randn(20, dtype=torch.float64)
    pred = gq.predictive_distribution(mean, scale, eps=1e-8)
    assert isinstance(pred, dist.Normal)
    tail = 2 * (1 - pred.cdf(mean + (grad - mean).abs()))
    torch.testing.assert_close(gq.tail_probability(grad, mean, scale), tail, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gq.scarcity(grad, mean, scale), 1 - tail, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dof,tol", [(1, 0.016), (2, 0.004), (3, 0.004), (7, 0.004), (31, 0.004)])
def test_student_scarcity_matches_scipy(dof, tol):
    # Wallace's transform: documented accuracy 0.015 (nu = 1), 0.004 (nu >= 2)
    stats = pytest.importorskip("scipy.stats")
    t = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 1e3], dtype=torch.float64)
    exact = torch.as_tensor(1 - 2 * stats.t.sf(t.numpy(), dof))
    rho = gq.scarcity(t, torch.zeros_like(t), torch.ones_like(t), eps=0.0, dof=float(dof))
    assert (rho - exact).abs().max() < tol
    tail = gq.tail_probability(t, torch.zeros_like(t), torch.ones_like(t), eps=0.0, dof=dof)
    torch.testing.assert_close(tail, 1 - rho)
    pred = gq.predictive_distribution(torch.zeros(1), torch.ones(1), eps=0.0, dof=dof)
    assert isinstance(pred, dist.StudentT) and pred.df.item() == dof


def test_student_predictive_calibrates_short_queues_where_the_normal_plug_in_does_not():
    # i.i.d. N(0, 1) gradients, a queue of n = 4, the 5th scored: the exact predictive is
    # t_3(mean, s sqrt(1 + 1/4)), so rho ~ U(0, 1); 1e5 trials: s.e. of the mean 1e-3
    g = torch.randn(100_000, 5, dtype=torch.float64)
    queue, new = g[:, :4], g[:, 4]
    mean, scale = queue.mean(1), queue.std(1)
    rho_t = gq.scarcity(new, mean, gq.predictive_scale(scale, 4, "student"), dof=3.0)
    rho_n = gq.scarcity(new, mean, gq.predictive_scale(scale, 4, "normal"))
    assert abs(rho_t.mean().item() - 0.5) < 0.01
    assert abs((rho_t > 0.95).double().mean().item() - 0.05) < 0.005
    assert (rho_n > 0.95).double().mean().item() > 0.15  # nominal 5%: over-confident
    with pytest.raises(ValueError, match="Invalid predictive"):
        gq.predictive_scale(scale, 4, "laplace")


def test_scarcity_of_predictive_draws_is_uniform_and_calibrated_weight_averages_one():
    # probability integral transform; n = 2e5: the standard error of a mean of U(0,1) is 6.5e-4,
    # of Delta in [0.5, 2] about 1e-3, so 0.01 is > 7 standard errors
    mean, scale = torch.tensor(1.5), torch.tensor(0.3)
    draws = gq.predictive_distribution(mean, scale).sample((200_000,))
    rho = gq.scarcity(draws, mean, scale)
    assert abs(rho.mean().item() - 0.5) < 0.01
    assert abs((rho < 0.9).float().mean().item() - 0.9) < 0.01
    k = gq.calibrated_sharpness(0.5, 2.0)
    delta = gq.amplification_weight(rho, 0.5, 2.0, k)
    assert abs(delta.mean().item() - 1.0) < 0.01


def test_amplification_is_bounded_and_monotone():
    z = torch.linspace(0, 12, 500, dtype=torch.float64)
    grad = z  # mean 0, scale 1
    for a_min, a_max, k in [(0.5, 2.0, 2.0), (0.0, 5.0, 0.3), (1.0, 1.0, 1.0), (0.2, 0.9, 4.0)]:
        delta = gq.amplification_weight(gq.scarcity(grad, 0 * z, 0 * z + 1), a_min, a_max, k)
        assert delta.min() >= a_min and delta.max() <= a_max
        assert (delta.diff() >= 0).all()
    assert gq.amplification_weight(torch.tensor(0.0), 0.5, 2.0, 2.0) == 0.5
    assert gq.amplification_weight(torch.tensor(1.0), 0.5, 2.0, 2.0) == 2.0


def test_calibrated_sharpness_needs_bounds_around_one():
    assert gq.calibrated_sharpness(0.5, 2.0) == 2.0
    assert gq.calibrated_sharpness(0.0, 3.0) == 2.0
    with pytest.raises(ValueError, match="min_amplification < 1 < max_amplification"):
        gq.calibrated_sharpness(1.0, 2.0)


def test_ema_moments_equal_the_exponentially_weighted_mean_and_variance():
    # West's recursion = weights w_1 = b^(t-1), w_s = (1-b) b^(t-s) (sum 1), exact in float64
    g = torch.randn(30, 4, dtype=torch.float64) * 2 + 1
    b = gq.ema_decay(9)
    assert b == 0.8
    m, v = g[0].clone(), torch.zeros(4, dtype=torch.float64)
    for t in range(1, len(g)):
        m, v = gq.ema_moments(m, v, g[t], b)
    t = len(g)
    w = [b ** (t - 1)] + [(1 - b) * b ** (t - 1 - s) for s in range(1, t)]
    w = torch.tensor(w, dtype=torch.float64)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-12)
    mean = (w[:, None] * g).sum(0)
    torch.testing.assert_close(m, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, (w[:, None] * (g - mean) ** 2).sum(0), rtol=1e-10, atol=1e-12)


def _lengths(losses, rule, q_min=4, q_max=32, scale=0.1, betas=(0.9, 0.98)):
    fast = slow = None
    out = []
    for loss in losses:
        fast, slow = gq.loss_trend_update(fast, slow, loss, betas)
        out.append(gq.queue_length_from_trend(gq.loss_trend(fast, slow), q_min, q_max, scale, rule))
    return out


def test_queue_length_follows_a_synthetic_loss_sequence():
    # plateau at 2.0 (100 steps), a fast drop to 0.5 (20 steps), plateau at 0.5 (500 steps)
    losses = [2.0] * 100 + [2.0 * 0.933**s for s in range(1, 21)] + [0.5] * 500
    q = _lengths(losses, "shorten_on_change")
    assert q[99] == 32  # plateau: the longest window
    assert q[106:120] == [4] * 14  # falling loss: the shortest window within 6 steps
    assert q[-1] == 32  # plateau again: back to the longest, gradually (slow EMA ~ 50 steps)
    assert q[200] < q[300] < q[400] <= q[-1]
    assert all(4 <= x <= 32 for x in q)
    # the mirror rule and the fixed rule
    q2 = _lengths(losses, "lengthen_on_change")
    assert q2[99] == 4 and q2[119] == 32 and q2[-1] == 4
    assert set(_lengths(losses, "fixed")) == {32}
    with pytest.raises(ValueError, match="Invalid length_rule"):
        gq.queue_length_from_trend(0.0, 4, 32, 0.05, "sideways")


def test_cluster_scale_and_combination():
    g_c = torch.randn(3, 5, dtype=torch.float64)
    sizes = torch.tensor([10, 30, 60])
    plain = (sizes[:, None] * g_c).sum(0) / 100
    torch.testing.assert_close(gq.combine_cluster_gradients(g_c, sizes, None, "size"), plain)
    ones = torch.ones_like(g_c)
    torch.testing.assert_close(gq.combine_cluster_gradients(g_c, sizes, ones, "normalized"), plain)
    w = torch.rand_like(g_c) + 0.5
    expect = (sizes[:, None] * w * g_c).sum(0) / 100
    torch.testing.assert_close(gq.combine_cluster_gradients(g_c, sizes, w, "size"), expect)
    s = gq.cluster_scale(torch.full((5,), 2.0, dtype=torch.float64), sizes, 100)
    torch.testing.assert_close(
        s[:, 0], 2.0 * torch.tensor([10.0, 100 / 30, 100 / 60]).sqrt().double()
    )
    with pytest.raises(ValueError, match="Invalid combine"):
        gq.combine_cluster_gradients(g_c, sizes, None, "max")


def test_pyro_model_scores_the_next_gradient_under_the_predictive():
    queue = torch.randn(6, 3, dtype=torch.float64)
    grad = torch.randn(3, dtype=torch.float64)
    tr = pyro.poutine.trace(gq.model).get_trace(queue, grad)
    site = tr.nodes["grad"]
    scale = queue.std(0) * math.sqrt(1 + 1 / 6) + 1e-8
    expect = dist.StudentT(5.0, queue.mean(0), scale).log_prob(grad).sum()
    torch.testing.assert_close(site["fn"].log_prob(grad), expect)
    assert site["is_observed"]
    tr = pyro.poutine.trace(gq.model).get_trace(queue, grad, predictive="normal")
    expect = dist.Normal(queue.mean(0), queue.std(0) + 1e-8).log_prob(grad).sum()
    torch.testing.assert_close(tr.nodes["grad"]["fn"].log_prob(grad), expect)
    sim = pyro.infer.Predictive(gq.model, num_samples=4)(queue)["grad"]
    assert sim.shape == (4, 3)
    with pytest.raises(ValueError, match=">= 2 queue entries"):
        gq.model(queue[:1])
