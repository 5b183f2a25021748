"""The recorder: exact posterior quantities per optimizer, bounded memory, no effect on training."""

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("arviz_base")

import probopt.models.vsgd as vsgd_model  # noqa: E402

from probopt.diagnostics import QUANTITIES, Recorder  # noqa: E402
from probopt.optim import VSGD, ConstantVSGD, GradientModelOptimizer, GradQueue  # noqa: E402


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batches(steps, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)


def _train(net, opt, steps=12):
    for x, y in _batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _coordinate_values(rec, quantity, name):
    names, index = rec.coordinate_table()
    cols = [j for j, n in enumerate(names) if n == name]
    return rec.coordinate_array(quantity)[:, cols], [index[j] for j in cols]


@pytest.mark.parametrize("foreach", [False, True])
def test_vsgd_pre_hook_posterior_equals_track_posterior(foreach):
    # The recorder derives beta_t and sigma_t^2 from the rates before the step; VSGD with
    # track_posterior stores the same numbers from inside the step. Same float64 arithmetic on
    # the reference path (exact); the foreach path regroups the algebra (rounding only: 1e-12).
    net = _net()
    opt = VSGD(net.parameters(), lr=0.01, track_posterior=True, foreach=foreach)
    rec = Recorder(opt, model=net, coordinates=5)
    history = {n: [] for n, _ in net.named_parameters()}
    for x, y in _batches(10):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        for n, p in net.named_parameters():
            post = opt.posterior(p)
            prec = opt.precisions(p)
            history[n].append({
                "mean": post.mean.clone(), "variance": post.variance.clone(),
                "beta": post.beta.clone(), "precision_g": prec[0], "precision_ghat": prec[1],
            })  # fmt: skip
    tol = 0.0 if not foreach else 1e-12
    for j, (n, _) in enumerate(net.named_parameters()):
        values_all = {q: _coordinate_values(rec, q, n) for q in history[n][0]}
        for q in history[n][0]:
            values, index = values_all[q]
            want = torch.stack([h[q].reshape(-1)[index] for h in history[n]]).numpy()
            np.testing.assert_allclose(values, want, rtol=tol, atol=0)
        # tensor summaries: documented statistics of the whole tensor
        last = history[n][-1]
        layers = {q: rec.layer_array(q)[-1, j] for q in QUANTITIES}
        assert layers["beta"] == pytest.approx(float(last["beta"].mean()), rel=1e-12)
        assert layers["variance"] == pytest.approx(float(last["variance"].mean()), rel=1e-12)
        assert layers["mean"] == pytest.approx(float(last["mean"].pow(2).mean().sqrt()), rel=1e-12)
        geo = float(last["precision_g"].log().mean().exp())
        assert layers["precision_g"] == pytest.approx(geo, rel=1e-12)
        snr = float(last["mean"].pow(2).sum() / last["variance"].sum())
        assert layers["snr"] == pytest.approx(snr, rel=1e-12)


def test_vsgd_first_step_has_the_prior_momentum():
    # At t = 1, beta_1 = K_g / (1 + K_g) (prior variances, up to the jitter delta = 1e-4)
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = VSGD([p], variance_ratio=9.0)
    rec = Recorder(opt, coordinates=3)
    p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(rec.coordinate_array("beta")[0], 0.9, rtol=1e-12)
    np.testing.assert_allclose(rec.coordinate_array("observed")[0], [1.0, -2.0, 0.5])


def test_recording_does_not_change_training():
    runs = []
    for record in (False, True):
        net = _net()
        opt = VSGD(net.parameters(), lr=0.01)
        rec = Recorder(opt, model=net) if record else None
        _train(net, opt, steps=8)
        runs.append([p.detach().clone() for p in net.parameters()])
        if rec is not None:
            rec.close()
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_skipped_step_is_not_recorded():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = VSGD([p], nonfinite="skip")
    rec = Recorder(opt, coordinates=2)
    for g in ([1.0, 2.0], [math.nan, 1.0], [0.5, 0.5]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert rec.step == 3
    assert rec.recorded_steps() == [1, 3]
    assert np.isfinite(rec.coordinate_array("mean")).all()


def test_thin_buffer_keeps_the_whole_run_at_bounded_size():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    rec = Recorder(opt, coordinates=1, capacity=8, buffer="thin")
    for _ in range(100):
        p.grad = torch.ones(2)
        opt.step()
    steps = rec.recorded_steps()
    assert len(steps) <= 8
    assert steps == list(range(rec.every, 101, rec.every))  # evenly spaced, from the start
    assert rec.every == 16  # 1 -> 2 -> 4 -> 8 -> 16 at 9, 17 (stride 2), ... records


def test_ring_buffer_keeps_the_last_records():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    rec = Recorder(opt, capacity=5, every=3, buffer="ring")
    for _ in range(40):
        p.grad = torch.ones(2)
        opt.step()
    assert rec.recorded_steps() == [27, 30, 33, 36, 39]


def test_pause_removes_the_hooks_and_resume_restores_them():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    rec = Recorder(opt, enabled=False)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    rec.resume()
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    p.grad = torch.ones(2)
    opt.step()
    rec.pause()
    opt.step()
    assert not opt._optimizer_step_pre_hooks and rec.recorded_steps() == [1]


def test_generic_optimizer_records_the_observed_gradient_only():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, maximize=True)
    rec = Recorder(opt, coordinates=[0, 2])
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    np.testing.assert_allclose(rec.coordinate_array("observed")[0], [-1.0, -3.0])  # maximize
    assert np.isnan(rec.coordinate_array("mean")).all()
    assert rec.layer_array("observed")[0, 0] == pytest.approx(math.sqrt(14 / 3))


def test_constant_vsgd_posterior_is_its_documented_constants():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = ConstantVSGD([p], variance_ratio=4.0, prior_variance=2.0)
    rec = Recorder(opt, coordinates=2)
    for g in ([1.0, -1.0], [0.5, 2.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    beta = 4.0 / 5.0
    np.testing.assert_allclose(rec.coordinate_array("beta"), beta)
    np.testing.assert_allclose(rec.coordinate_array("variance"), beta * 2.0)
    np.testing.assert_allclose(rec.coordinate_array("precision_g"), 0.5)
    np.testing.assert_allclose(rec.coordinate_array("precision_ghat"), 1 / 8.0)
    mu1 = (1 - beta) * np.array([1.0, -1.0])
    mu2 = beta * mu1 + (1 - beta) * np.array([0.5, 2.0])
    np.testing.assert_allclose(rec.coordinate_array("mean"), [mu1, mu2], rtol=1e-12)


def test_generic_svi_path_mean_variance_implied_beta_and_draws():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = GradientModelOptimizer([p], vsgd_model.model, vsgd_model.guide, lr=0.05,
                                 svi_steps=10, num_particles=8)  # fmt: skip
    rec = Recorder(opt, coordinates=4, draws=(3, 400), draw_every=2)
    prev = torch.zeros(4, dtype=torch.float64)
    for _ in range(4):
        p.grad = 2 * (p.detach() - 1) + 0.1 * torch.randn(4, dtype=torch.float64)
        g = p.grad.clone()
        opt.step()
        mean, var = opt.posterior(p)
        row = -1
        np.testing.assert_allclose(rec.coordinate_array("mean")[row], mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(rec.coordinate_array("variance")[row], var.numpy(), rtol=1e-12)
        # the implied momentum reproduces mu_t = beta mu_{t-1} + (1 - beta) g_hat
        beta = rec.coordinate_array("beta")[row]
        np.testing.assert_allclose(beta * prev.numpy() + (1 - beta) * g.numpy(), mean.numpy(),
                                   rtol=1e-10, atol=1e-14)  # fmt: skip
        prev = mean.clone()
    draws = rec.draw_array()
    assert draws.shape == (3, 400, 2, 4) and rec.draw_steps() == [2, 4]
    # the last draws come from the last posterior N(mean, var): their average is within
    # 5 standard errors of the mean (1200 independent draws)
    se = np.sqrt(var.numpy() / 1200)
    assert np.all(np.abs(draws[:, :, -1].mean((0, 1)) - mean.numpy()) < 5 * se)


def test_grad_queue_is_read_through_its_inner_optimizer():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    inner = VSGD([p], lr=0.01)
    opt = GradQueue(inner, q_min=2, queue_length=2)
    rec = Recorder(opt, coordinates=5)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append(p.grad.clone()))
    for _ in range(5):
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
    assert rec.meta["optimizer"] == "VSGD" and rec.meta["wrapper"] == "GradQueue"
    # what the recorder calls observed is the amplified gradient the inner optimizer stepped on
    np.testing.assert_array_equal(rec.coordinate_array("observed"), torch.stack(seen).numpy())
    assert np.isfinite(rec.coordinate_array("beta")).all()


def test_parameter_and_coordinate_choices():
    net = _net()
    opt = VSGD(net.parameters())
    rec = Recorder(opt, ["2.weight"], model=net, coordinates={"2.weight": [0, 17]})
    assert rec.names == ["2.weight"]
    assert rec.coordinate_labels() == ["2.weight[0]", "2.weight[17]"]
    rec2 = Recorder(opt, net[0], coordinates=2)
    assert rec2.names == ["weight", "bias"] and len(rec2.coordinate_labels()) == 4
    named = [("a", p) for p in [nn.Parameter(torch.zeros(2))]]
    with pytest.raises(ValueError, match="not optimized by this optimizer"):
        Recorder(opt, dict(named))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "Invalid every: 0"),
        ({"capacity": 1}, "Invalid capacity: 1"),
        ({"buffer": "fifo"}, "Invalid buffer: 'fifo'"),
        ({"draws": (2,)}, "Invalid draws"),
        ({"draws": (2, 1)}, r"Invalid draws\[1\]"),
        ({"coordinates": -1}, "Invalid coordinates"),
        ({"coordinates": [0, 99]}, "flat indices in"),
        ({"variance_every": 0}, "Invalid variance_every: 0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match=message):
        Recorder(opt, **kwargs)
    assert not opt._optimizer_step_pre_hooks  # nothing attached


def test_requires_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Recorder(object())
