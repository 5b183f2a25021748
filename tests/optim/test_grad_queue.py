"""GradQueue: the wrapper's contract (identity when off, bounds, state), Fig. 2, large batches."""

import copy
import warnings

import pytest
import torch
from probopt.models import grad_queue as gqm
from torch import nn

from probopt.optim import NonFiniteGradientError
from probopt.optim.grad_queue import GradQueue


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _batches(n=8, b=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 6, generator=g, dtype=dtype), torch.randint(3, (b,), generator=g))
            for _ in range(n)]  # fmt: skip


def _train(model, opt, batches, closure=False):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        if closure:

            def c(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(c)
        else:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step(loss=loss) if isinstance(opt, GradQueue) else opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _vsgd():
    try:
        from probopt.optim.vsgd import VSGD
    except ImportError as err:  # pragma: no cover - until probopt.optim.vsgd lands
        pytest.skip(f"probopt.optim.vsgd.VSGD is not available yet: {err}")
    return VSGD


INNER = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    "vsgd": lambda p: _vsgd()(p, lr=0.1),
}


@pytest.mark.parametrize("name", list(INNER))
@pytest.mark.parametrize("closure", [False, True])
def test_amplification_off_is_bit_identical_to_the_inner_optimizer(name, closure):
    batches = _batches()
    m1, m2 = _net(), _net()
    plain = _train(m1, INNER[name](m1.parameters()), batches, closure)
    wrapped = _train(m2, GradQueue(INNER[name](m2.parameters()), amplification="none"), batches,
                     closure)  # fmt: skip
    for a, b in zip(plain, wrapped):
        assert torch.equal(a, b)


def test_wraps_vsgd_and_trains():
    vsgd = _vsgd()
    model = _net()
    opt = GradQueue(vsgd(model.parameters(), lr=0.05), q_min=2, queue_length=4, q_max=8)
    x, y = _batches(1, 64)[0]
    loss_fn = nn.CrossEntropyLoss()
    first = loss_fn(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    assert loss_fn(model(x), y).item() < 0.9 * first
    assert opt.state[next(model.parameters())]["count"] >= 2


# ---------------------------------------------------------------------------------------------
# the paper's central claim (Fig. 2 style): sparse gradients align with the momentum update


def _burst_update(b, wrap, a=1.0, noise=0.05, steps=40, seed=0):
    """Momentum SGD on a stream of monotonous gradients a*e1 + noise; at the last step a sparse
    burst adds b*e2. Returns the update of that step."""
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    inner = torch.optim.SGD([w], lr=1.0, momentum=0.9)
    opt = wrap(inner)
    for t in range(steps + 1):
        g = torch.tensor([a, 0.0], dtype=torch.float64)
        g += noise * torch.randn(2, generator=gen, dtype=torch.float64)
        if t == steps:
            g[1] += b
        before = w.detach().clone()
        w.grad = g
        opt.step()
    return before - w.detach()


def _threshold(wrap, seed):
    """Smallest burst b whose update points more along e2 than along e1 (bisection)."""
    lo, hi = 0.0, 64.0
    for _ in range(16):  # resolution 64 / 2**16 = 1e-3
        mid = (lo + hi) / 2
        u = _burst_update(mid, wrap, seed=seed)
        lo, hi = (lo, mid) if u[1].abs() > u[0].abs() else (mid, hi)
    return hi


def test_grad_queue_lowers_the_threshold_for_sparse_gradients_to_steer_momentum():
    def gq(inner):
        return GradQueue(inner, q_min=8, queue_length=16, q_max=16, length_rule="fixed")

    ratios = []
    for seed in range(3):
        t_plain, t_gq = _threshold(lambda o: o, seed), _threshold(gq, seed)
        ratios.append(t_plain / t_gq)
        print(f"seed {seed}: burst threshold momentum {t_plain:.2f}, GQ {t_gq:.2f}, "
              f"ratio {t_plain / t_gq:.2f}")  # fmt: skip
        # momentum alone needs a burst of about a / (1 - beta) = 10 (the accumulated velocity)
        assert 8.0 < t_plain < 12.0
    # theory for Gaussian monotonous noise: a_max / E[Delta] = 2 / 1 (calibrated sharpness); the
    # e1 weights at the burst are random (rho ~ U(0, 1)), so single seeds scatter by ~0.2
    assert sum(ratios) / len(ratios) > 1.7 and min(ratios) > 1.4
    # the same burst (b = 6): GQ's update follows the sparse direction, momentum's does not
    u_plain, u_gq = _burst_update(6.0, lambda o: o), _burst_update(6.0, gq)
    assert u_plain[1].abs() < u_plain[0].abs() and u_gq[1].abs() > u_gq[0].abs()


# ---------------------------------------------------------------------------------------------
# properties of the rewrite


def _capture_inner_grads(inner, params):
    seen = []
    inner.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in params]))
    return seen


@pytest.mark.parametrize("statistics", ["queue", "ema"])
def test_weights_respect_the_bounds(statistics):
    w = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    inner = torch.optim.SGD([w], lr=0.0)
    opt = GradQueue(inner, min_amplification=0.3, max_amplification=3.0, statistics=statistics,
                    q_min=2, queue_length=6, q_max=6)  # fmt: skip
    seen = _capture_inner_grads(inner, [w])
    raws = []
    for t in range(40):
        g = torch.randn(50, dtype=torch.float64) * (10.0 if t % 7 == 0 else 1.0) + 1
        raws.append(g.clone())
        w.grad = g
        opt.step()
    ratios = torch.stack([s[0] / r for s, r in zip(seen, raws)])
    assert torch.equal(ratios[:2], torch.ones_like(ratios[:2]))  # warm-up: < 2 entries
    assert ratios.min() >= 0.3 - 1e-12 and ratios.max() <= 3.0 + 1e-12
    assert ratios.min() < 0.5 and ratios.max() > 2.0  # both ends are used


@pytest.mark.parametrize("foreach", [False, True])
def test_preserve_norm_keeps_each_tensor_norm_and_changes_the_direction(foreach):
    params = [nn.Parameter(torch.zeros(20, dtype=torch.float64)) for _ in range(2)]
    inner = torch.optim.SGD(params, lr=0.0)
    opt = GradQueue(inner, q_min=2, queue_length=6, q_max=6, preserve_norm=True, foreach=foreach)
    seen = _capture_inner_grads(inner, params)
    raws = []
    for grads in _grad_stream(params, 12, 1):
        raws.append([g.clone() for g in grads])
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for raw, new in list(zip(raws, seen))[2:]:
        for r, n in zip(raw, new):
            torch.testing.assert_close(n.norm(), r.norm(), rtol=1e-12, atol=0)
            assert not torch.allclose(n, r)


def test_no_gradient_flows_through_the_queue():
    w = nn.Parameter(torch.randn(4))
    opt = GradQueue(torch.optim.SGD([w], lr=0.1), q_min=2, queue_length=3, q_max=3)
    for _ in range(4):
        (w.grad,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)  # carries a graph
        assert w.grad.requires_grad
        opt.step()
    for key, v in opt.state[w].items():
        if isinstance(v, torch.Tensor):
            assert not v.requires_grad and v.grad_fn is None, key


def _grad_stream(params, steps, seed, missing_at=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        out.append([None if (missing_at == (t, i)) else
                    3.0 + torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + (t % 5 == 0))
                    for i, p in enumerate(params)])  # fmt: skip
    return out


@pytest.mark.parametrize(
    "statistics,predictive,preserve_norm",
    [("queue", "student", False), ("ema", "student", False), ("queue", "normal", True)],
)
def test_foreach_matches_the_single_tensor_reference_in_float64(
    statistics, predictive, preserve_norm
):
    shapes = [(3, 4), (), (5,), (2, 2)]

    def run(foreach):
        params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        inner = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        opt = GradQueue(inner, q_min=2, queue_length=5, q_max=5, refresh_every=3,
                        statistics=statistics, predictive=predictive,
                        preserve_norm=preserve_norm, foreach=foreach)  # fmt: skip
        losses = [1.0, 0.9, 0.5, 0.45, 0.44] * 4
        for t, grads in enumerate(_grad_stream(params, 20, 0, missing_at=(6, 2))):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step(loss=losses[t])
        return params, opt

    (p1, o1), (p2, o2) = run(False), run(True)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(p1, p2):
        for key, v in o1.state[a].items():
            w = o2.state[b][key]
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-12)
            else:
                assert v == w, key


def test_running_sums_stay_exact_over_a_long_float32_stream():
    w = nn.Parameter(torch.zeros(100))
    opt = GradQueue(torch.optim.SGD([w], lr=0.0), q_min=4, queue_length=8, q_max=8,
                    length_rule="fixed")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        w.grad = 50.0 + torch.randn(100, generator=g)
        opt.step()
    st = opt.state[w]
    entries = st["queue"].double()
    mean, scale = gqm.queue_moments(st["shift"], st["total"], st["total_sq"], st["count"])
    torch.testing.assert_close(mean.double(), entries.mean(0), rtol=1e-6, atol=0)
    # float32 sums of 8 deviations of size 1 around a shift: relative error ~1e-6
    torch.testing.assert_close(scale.double(), entries.std(0), rtol=1e-4, atol=0)


def test_loss_driven_queue_length_on_a_synthetic_loss_sequence():
    w = nn.Parameter(torch.zeros(3))
    opt = GradQueue(torch.optim.SGD([w], lr=0.0), q_min=4, queue_length=16, q_max=32)
    losses = [2.0] * 100 + [2.0 * 0.933**s for s in range(1, 21)] + [0.5] * 500
    lengths = []
    for loss in losses:
        w.grad = torch.randn(3)
        opt.step(loss=torch.tensor(loss))
        lengths.append(opt.queue_length)
        assert opt.state[w]["count"] <= opt.queue_length
    assert lengths[0] == 16  # one loss is no trend
    assert lengths[99] == 32 and lengths[119] == 4 and lengths[-1] == 32
    # without a loss the length stays put
    w.grad = torch.randn(3)
    opt.step()
    assert opt.queue_length == 32


@pytest.mark.parametrize("statistics", ["queue", "ema"])
def test_state_dict_round_trip_restores_the_queue_exactly(statistics):
    batches = _batches(12)

    def make(model):
        return GradQueue(torch.optim.AdamW(model.parameters(), lr=1e-2), q_min=2,
                         queue_length=4, q_max=6, statistics=statistics)  # fmt: skip

    m1 = _net()
    o1 = make(m1)
    _train(m1, o1, batches[:6])
    saved = copy.deepcopy(o1.state_dict())
    m2 = copy.deepcopy(m1)
    o2 = make(m2)
    o2.load_state_dict(saved)
    for p, q in zip(m1.parameters(), m2.parameters()):
        for key, v in o1.state[p].items():
            assert (
                torch.equal(v, o2.state[q][key])
                if isinstance(v, torch.Tensor)
                else (v == o2.state[q][key])
            )
    assert o2.queue_length == o1.queue_length
    a, b = _train(m1, o1, batches[6:]), _train(m2, o2, batches[6:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_load_state_dict_rejects_mismatches_and_leaves_state_untouched():
    model = _net()
    opt = GradQueue(torch.optim.SGD(model.parameters(), lr=0.1), q_min=2, queue_length=4, q_max=6)
    _train(model, opt, _batches(3))
    sd = opt.state_dict()
    other = GradQueue(torch.optim.SGD(_net().parameters(), lr=0.1), statistics="ema")
    with pytest.raises(ValueError, match="statistics='queue', q_max=6"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="keys 'optimizer' and 'grad_queue'"):
        opt.load_state_dict(sd["optimizer"])
    small = GradQueue(torch.optim.SGD(nn.Linear(6, 8).parameters(), lr=0.1), q_min=2,
                      queue_length=4, q_max=6)  # fmt: skip
    with pytest.raises(ValueError, match="parameter 2"):
        small.load_state_dict(sd)
    assert not small.state


BAD = [
    (dict(q_min=1), "Invalid q_min: 1"),
    (dict(queue_length=3, q_min=4), "Invalid queue_length: 3"),
    (dict(q_max=8, queue_length=16), "Invalid q_max: 8"),
    (dict(q_min=2.5), "Invalid q_min: 2.5"),
    (dict(amplification="loud"), "Invalid amplification: 'loud'"),
    (dict(min_amplification=-0.1), "Invalid min_amplification: -0.1"),
    (dict(max_amplification=0.4, min_amplification=0.5), "Invalid max_amplification: 0.4"),
    (dict(sharpness=0.0), "Invalid sharpness: 0.0"),
    (dict(eps=0.0), "Invalid eps: 0.0"),
    (dict(statistics="median"), "Invalid statistics: 'median'"),
    (dict(predictive="cauchy"), "Invalid predictive: 'cauchy'"),
    (dict(refresh_every=0), "Invalid refresh_every: 0"),
    (dict(length_rule="up"), "Invalid length_rule: 'up'"),
    (dict(loss_betas=(0.5, 1.0)), r"Invalid loss_betas\[1\]: 1.0"),
    (dict(loss_betas=0.9), "Invalid loss_betas: 0.9"),
    (dict(trend_scale=-1.0), "Invalid trend_scale: -1.0"),
    (dict(preserve_norm=1), "Invalid preserve_norm: 1"),
    (dict(cluster_threshold=0), "Invalid cluster_threshold: 0"),
    (dict(max_clusters=0), "Invalid max_clusters: 0"),
    (dict(combine="max"), "Invalid combine: 'max'"),
    (dict(cluster_method="magic"), "Invalid cluster_method: 'magic'"),
    (dict(kmeans_iter=0), "Invalid kmeans_iter: 0"),
    (dict(nonfinite="warn"), "Invalid nonfinite policy: 'warn'"),
    (dict(foreach="yes"), "Invalid foreach: 'yes'"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_hyperparameters_give_clear_errors(kwargs, message):
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        GradQueue(inner, **kwargs)


def test_bad_optimizer_and_features_give_clear_errors():
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        GradQueue([nn.Parameter(torch.zeros(2))])
    gq = GradQueue(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(TypeError, match="cannot wrap another GradQueue"):
        GradQueue(gq)
    with pytest.raises(TypeError, match="features must be callable"):
        GradQueue(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), features=3)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_changes_nothing(policy):
    w = nn.Parameter(torch.ones(3))
    opt = GradQueue(torch.optim.SGD([w], lr=0.1, momentum=0.9), q_min=2, queue_length=3,
                    q_max=3, nonfinite=policy)  # fmt: skip
    for _ in range(3):
        w.grad = torch.randn(3)
        opt.step(loss=1.0)
    before = copy.deepcopy(opt.state_dict())
    params = w.detach().clone()
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError):
            opt.step(loss=1.0)
    else:
        opt.step(loss=1.0)
        assert opt.num_skipped_steps == 1
    assert torch.equal(w.detach(), params)
    after = opt.state_dict()
    assert torch.equal(
        after["grad_queue"]["state"][0]["queue"], before["grad_queue"]["state"][0]["queue"]
    )
    assert after["grad_queue"]["clock"] == before["grad_queue"]["clock"]


def test_sparse_gradients_are_rejected():
    w = nn.Parameter(torch.ones(3))
    opt = GradQueue(torch.optim.SGD([w], lr=0.1))
    w.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_lr_scheduler_and_add_param_group_work_through_the_wrapper():
    w, v = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([w], lr=1.0)
    opt = GradQueue(inner, q_min=2, queue_length=3, q_max=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            w.grad = torch.ones(2)
            opt.step()
            sched.step()
    assert inner.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.125
    opt.add_param_group({"params": [v], "lr": 0.1})
    assert len(inner.param_groups) == 2 and opt.param_groups is inner.param_groups
    w.grad, v.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert opt.state[v]["count"] == 1
    opt.zero_grad()
    assert w.grad is None
    assert "GradQueue(queue_length=3" in repr(opt)


# ---------------------------------------------------------------------------------------------
# large batches


def _blobs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0, 0], [-4.0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0]])
    y = torch.randint(3, (n,), generator=g)
    return centres[y] + 0.3 * torch.randn(n, 6, generator=g), y


def test_clustered_step_with_unit_weights_is_the_plain_batch_step():
    x, y = _blobs()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    m1, m2 = _net(dtype=torch.float64), _net(dtype=torch.float64)
    x = x.double()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    o2 = GradQueue(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), q_min=2,
                   queue_length=4, q_max=4, min_amplification=1.0, max_amplification=1.0,
                   cluster_threshold=32, cluster_method="per_cluster")  # fmt: skip
    for _ in range(5):
        o1.zero_grad()
        loss_fn(m1(x), y).mean().backward()
        o1.step()
        o2.zero_grad()
        loss = o2.backward(m2, loss_fn, x, y)
        assert o2._pending is not None and len(o2._pending[1].sizes) == 3  # k = ceil(96/32)
        o2.step()
        assert o2._pending is None
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert loss.dtype == torch.float64


def test_clustered_step_weights_each_cluster_by_its_scarcity():
    # after a warm-up on blobs 0 and 1 only, a batch where blob 2 appears: its cluster is rare
    torch.manual_seed(0)
    x, y = _blobs(192)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    x = x.double()
    opt = GradQueue(torch.optim.SGD(model.parameters(), lr=0.0), q_min=2, queue_length=8,
                    q_max=8, length_rule="fixed", cluster_threshold=64,
                    features=lambda m, xb: xb)  # fmt: skip
    seen = _capture_inner_grads(opt.optimizer, list(model.parameters()))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    common = y != 2
    for _ in range(6):
        opt.zero_grad()
        opt.backward(model, loss_fn, x[common][:64], y[common][:64])  # B = 64: not clustered
        opt.step()
    opt.zero_grad()
    opt.backward(model, loss_fn, x, y)  # B = 192 > 64: k = 3 clusters
    _, cg = opt._pending
    opt.step()
    st = opt.state[model[0].bias]
    mean = st["queue"][:6].mean(0)  # the step scored against the 6 entries before it
    scale = st["queue"][:6].std(0)
    sizes = cg.sizes
    g_c = cg.grads[1]
    s_c = gqm.cluster_scale(scale, sizes, 192)
    delta = gqm.amplification_weight(gqm.scarcity(g_c, mean, s_c), 0.5, 2.0, 2.0)
    expect = gqm.combine_cluster_gradients(g_c, sizes, delta, "size")
    torch.testing.assert_close(seen[-1][1], expect, rtol=1e-10, atol=1e-12)
    # the rare cluster's class-2 logit gradient is boosted to the maximum
    assert delta[:, 2].max() > 1.9
