"""Survey estimators: limiting cases, calibration, the NumPy reference, loss weights, errors."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from probopt.sampling import estimators as est
from probopt.sampling import variance as var
from probopt.sampling.designs import PoissonSampling, SimpleRandomSampling
from probopt.testing import reference as ref

F64 = torch.float64
# float64 identities that involve one q x q solve on well-conditioned data: 1e-12 absolute
EXACT = dict(rtol=0, atol=1e-12)


@pytest.fixture()
def batch():
    """A sample of n = 20 from N = 200 with unequal pi, p = 3 coordinates, q = 4 auxiliaries."""
    g = torch.Generator().manual_seed(1)
    n, big_n = 20, 200
    h = torch.cat([torch.ones(n, 1, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64)], 1)
    y = h @ torch.randn(4, 3, generator=g, dtype=F64) + 0.3 * torch.randn(
        n, 3, generator=g, dtype=F64
    )
    pi = 0.05 + 0.2 * torch.rand(n, generator=g, dtype=F64)
    c = 0.5 + torch.rand(n, generator=g, dtype=F64)
    h_bar = torch.tensor([1.0, 0.1, -0.2, 0.3], dtype=F64)
    return dict(y=y, h=h, pi=pi, c=c, h_bar=h_bar, N=big_n)


def test_h_equal_one_is_the_plain_minibatch_mean():
    """No auxiliary information: GREG under SRS is the plain mean (up to rounding of 1/pi)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, 5, generator=g, dtype=F64)
    pi = torch.full((16,), 16 / 100, dtype=F64)
    ones = torch.ones(16, 1, dtype=F64)
    w = est.greg_weights(ones, torch.ones(1, dtype=F64), pi, 100)
    torch.testing.assert_close(w, torch.full((16,), 1 / 16, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        est.greg(y, ones, torch.ones(1), pi, 100), y.mean(0), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(est.horvitz_thompson(y, pi, 100), y.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(est.hajek(y, pi), y.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(
        est.hansen_hurwitz(y, torch.full((16,), 0.01, dtype=F64), 100),
        y.mean(0),
        rtol=0,
        atol=1e-14,
    )


@pytest.mark.parametrize("total", [False, True])
@pytest.mark.parametrize("use_c", [False, True])
def test_calibration_equations_hold(batch, total, use_c):
    c = batch["c"] if use_c else None
    w = est.greg_weights(batch["h"], batch["h_bar"], batch["pi"], batch["N"], c=c, total=total)
    target = batch["h_bar"] * (batch["N"] if total else 1)
    torch.testing.assert_close(w @ batch["h"], target, rtol=0, atol=1e-10)
    expected = ref.greg_weights(
        batch["h"].numpy(),
        batch["h_bar"].numpy(),
        batch["pi"].numpy(),
        batch["N"],
        c=None if c is None else c.numpy(),
        total=total,
    )
    torch.testing.assert_close(w, torch.as_tensor(expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("use_c", [False, True])
def test_greg_matches_the_regression_form(batch, use_c):
    b = batch
    c = b["c"] if use_c else None
    out = est.greg(b["y"], b["h"], b["h_bar"], b["pi"], b["N"], c=c)
    expected = ref.greg(
        b["y"].numpy(),
        b["h"].numpy(),
        b["h_bar"].numpy(),
        b["pi"].numpy(),
        b["N"],
        c=None if c is None else c.numpy(),
    )
    torch.testing.assert_close(out, torch.as_tensor(expected), **EXACT)
    coef = est.greg_coefficients(b["y"], b["h"], b["pi"], b["N"], c=c)
    ht = est.horvitz_thompson(b["y"], b["pi"], b["N"])
    h_ht = est.horvitz_thompson(b["h"], b["pi"], b["N"])
    torch.testing.assert_close(out, ht + coef.T @ (b["h_bar"] - h_ht), **EXACT)
    total = est.greg(b["y"], b["h"], b["h_bar"], b["pi"], b["N"], c=c, total=True)
    torch.testing.assert_close(total, out * b["N"], rtol=1e-13, atol=0)
    # one coordinate at a time gives the same numbers (weights do not depend on y)
    for j in range(3):
        torch.testing.assert_close(
            est.greg(b["y"][:, j], b["h"], b["h_bar"], b["pi"], b["N"], c=c), out[j], **EXACT
        )


def test_one_hot_h_post_stratifies():
    """h = class one-hot: GREG = sum_c (N_c / N) * (sample mean of class c), under SRS."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    y = torch.randn(10, 2, generator=g, dtype=F64)
    shares = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # N_c / N in the population
    h = nn.functional.one_hot(labels, 3).to(F64)
    out = est.greg(y, h, shares, torch.full((10,), 0.1, dtype=F64), 100)
    expected = sum(shares[k] * y[labels == k].mean(0) for k in range(3))
    torch.testing.assert_close(out, expected, **EXACT)


def test_ridge_trades_calibration_for_stability(batch):
    b = batch
    w0 = est.greg_weights(b["h"], b["h_bar"], b["pi"], b["N"])
    w1 = est.greg_weights(b["h"], b["h_bar"], b["pi"], b["N"], ridge=0.1)
    assert not torch.allclose(w0, w1)
    big = est.greg_weights(b["h"], b["h_bar"], b["pi"], b["N"], ridge=1e12)
    torch.testing.assert_close(
        big, est.horvitz_thompson_weights(b["pi"], b["N"]), rtol=1e-9, atol=0
    )
    # q > n: singular without ridge, fine with it
    h_wide = torch.randn(3, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"singular \(q = 5 auxiliary variables, n = 3"):
        est.greg_weights(h_wide, torch.zeros(5), torch.full((3,), 0.5, dtype=F64), 6)
    w = est.greg_weights(h_wide, torch.zeros(5), torch.full((3,), 0.5, dtype=F64), 6, ridge=1e-3)
    assert torch.isfinite(w).all()


def test_difference_estimator_limiting_cases(batch):
    b = batch
    zero = torch.zeros_like(b["y"])
    torch.testing.assert_close(  # a zero model is plain Horvitz-Thompson
        est.difference_estimator(b["y"], zero, torch.zeros(3, dtype=F64), b["pi"], b["N"]),
        est.horvitz_thompson(b["y"], b["pi"], b["N"]),
        **EXACT,
    )
    # perfect predictions: the known mean, whatever the sample
    truth = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    torch.testing.assert_close(
        est.difference_estimator(b["y"], b["y"], truth, b["pi"], b["N"]), truth, **EXACT
    )
    torch.testing.assert_close(
        est.difference_estimator(b["y"], b["y"], truth, b["pi"], b["N"], total=True),
        truth * b["N"],
        **EXACT,
    )


def test_hajek_is_scale_free_and_empty_sample_behaviour(batch):
    b = batch
    torch.testing.assert_close(est.hajek(b["y"], b["pi"]), est.hajek(b["y"], 3 * b["pi"]), **EXACT)
    torch.testing.assert_close(
        est.hajek(b["y"], b["pi"]),
        torch.as_tensor(ref.hajek(b["y"].numpy(), b["pi"].numpy())),
        **EXACT,
    )
    empty = torch.zeros(0, 3, dtype=F64)
    none = torch.zeros(0, dtype=F64)
    assert torch.equal(est.horvitz_thompson(empty, none, 10), torch.zeros(3, dtype=F64))
    assert torch.equal(est.hajek(empty, none), torch.zeros(3, dtype=F64))  # 0, never NaN


def test_variance_estimators_agree_with_srs_closed_form():
    """Under SRSWOR the HT, SYG, Hajek and h = 1 GREG variance estimators all equal (1-f)/n s^2."""
    design = SimpleRandomSampling(50, 8)
    s = design.sample(torch.Generator().manual_seed(0))
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    pij = design.joint_inclusion_probabilities(s.indices)
    pi = s.inclusion_probabilities
    closed = var.srs_variance(y, 50)
    torch.testing.assert_close(closed, torch.as_tensor(ref.srs_variance(y.numpy(), 50)), **EXACT)
    ones = torch.ones(8, 1, dtype=F64)
    for v in (
        var.horvitz_thompson_variance(y, pi, pij, 50),
        var.sen_yates_grundy_variance(y, pi, pij, 50),
        var.hajek_variance(y, pi, pij),
        var.hajek_variance(y, pi, pij, 50),
        var.greg_variance(y, ones, torch.ones(1), pi, pij, 50),
        var.greg_variance(y, ones, torch.ones(1), pi, pij, 50, residuals="e"),
    ):
        torch.testing.assert_close(v, closed, **EXACT)
    torch.testing.assert_close(
        var.srs_variance(y, 50, total=True), closed * 2500, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(var.srs_variance(y, 50, trace=True), torch.trace(closed), **EXACT)


def test_greg_variance_matches_reference_residuals(batch):
    """V_g / V_e: the HT variance estimator of g_k e_k / e_k, built from the NumPy reference."""
    b = batch
    design = PoissonSampling(torch.cat([b["pi"], torch.full((180,), 0.1, dtype=F64)]))
    idx = torch.arange(20)
    pij = design.joint_inclusion_probabilities(idx)
    y, h, pi = b["y"].numpy(), b["h"].numpy(), b["pi"].numpy()
    beta = torch.linalg.lstsq(
        b["h"] * (1 / b["pi"]).sqrt()[:, None], b["y"] * (1 / b["pi"]).sqrt()[:, None]
    ).solution.numpy()
    e = y - h @ beta
    g = ref.greg_weights(h, b["h_bar"].numpy(), pi, b["N"], total=True) * pi
    for residuals, u in (("g", g[:, None] * e), ("e", e)):
        expected = ref.horvitz_thompson_variance(u, pi, pij.numpy(), b["N"])
        out = var.greg_variance(
            b["y"], b["h"], b["h_bar"], b["pi"], pij, b["N"], residuals=residuals
        )
        torch.testing.assert_close(out, torch.as_tensor(expected), **EXACT)
        torch.testing.assert_close(
            var.greg_variance(
                b["y"], b["h"], b["h_bar"], b["pi"], pij, b["N"], residuals=residuals, trace=True
            ),
            torch.trace(out),
            **EXACT,
        )
    vg = var.greg_variance(b["y"], b["h"], b["h_bar"], b["pi"], pij, b["N"])
    ve = var.greg_variance(b["y"], b["h"], b["h_bar"], b["pi"], pij, b["N"], residuals="e")
    assert not torch.allclose(vg, ve)  # the two estimators differ at small n (notes section 4.4)


# --------------------------------------------------------------------------------------------
# loss weights: how an unchanged optimizer consumes an estimate


def _per_example_gradients(model, x, t):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xk, tk):
        out = functional_call(model, p, (xk[None],))
        return nn.functional.cross_entropy(out, tk[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
    return torch.cat([grads[k].reshape(x.shape[0], -1) for k in params], 1)


def test_gradient_of_weighted_loss_is_the_weighted_sum_of_per_example_gradients():
    g = torch.Generator().manual_seed(0)
    n, big_n = 12, 300
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 4, generator=g, dtype=F64)
    t = torch.randint(0, 3, (n,), generator=g)
    per_example = _per_example_gradients(model, x, t)  # (n, P)
    pi = 0.02 + 0.05 * torch.rand(n, generator=g, dtype=F64)
    h = torch.cat([torch.ones(n, 1, dtype=F64), x[:, :2]], 1)
    h_bar = torch.tensor([1.0, 0.0, 0.1], dtype=F64)
    p_draw = pi / 10
    cases = {
        "horvitz_thompson": (
            est.horvitz_thompson_weights(pi, big_n),
            est.horvitz_thompson(per_example, pi, big_n),
        ),
        "hansen_hurwitz": (
            est.hansen_hurwitz_weights(p_draw, big_n),
            est.hansen_hurwitz(per_example, p_draw, big_n),
        ),
        "greg": (est.greg_weights(h, h_bar, pi, big_n), est.greg(per_example, h, h_bar, pi, big_n)),
    }
    for name, (w, estimate) in cases.items():
        model.zero_grad()
        losses = nn.functional.cross_entropy(model(x), t, reduction="none")
        (w * losses).sum().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(flat, w @ per_example, **EXACT, msg=name)
        torch.testing.assert_close(flat, estimate, **EXACT, msg=name)


def test_estimators_are_differentiable_in_y():
    y = torch.randn(5, 2, dtype=F64, requires_grad=True)
    pi = torch.full((5,), 0.5, dtype=F64)
    est.greg(y, torch.ones(5, 1, dtype=F64), torch.ones(1), pi, 10).sum().backward()
    torch.testing.assert_close(y.grad, torch.full((5, 2), 0.2, dtype=F64), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------
# bad input

_Y = torch.ones(4, 2, dtype=F64)
_PI = torch.full((4,), 0.5, dtype=F64)
_PIJ = torch.full((4, 4), 0.2, dtype=F64).fill_diagonal_(0.5)

ERRORS = [
    (lambda: est.horvitz_thompson(_Y, _PI[:3], 8), r"Invalid pi: expected shape \(4,\)"),
    (lambda: est.horvitz_thompson(torch.ones(4, 2, 2), _PI, 8), r"Invalid y: expected shape"),
    (lambda: est.horvitz_thompson(_Y, _PI, 0), r"Invalid population_size: 0"),
    (lambda: est.hansen_hurwitz(_Y, _PI[:2], 8), r"Invalid p: expected shape \(4,\)"),
    (lambda: est.hansen_hurwitz_weights(torch.zeros(0), 8), r"Invalid p: .*n >= 1"),
    (
        lambda: est.difference_estimator(_Y, _Y[:, :1], torch.zeros(2), _PI, 8),
        r"Invalid y_hat: expected the shape of y \(4, 2\), got \(4, 1\)",
    ),
    (
        lambda: est.difference_estimator(_Y, _Y, torch.zeros(3), _PI, 8),
        r"Invalid y_hat_population_mean: expected shape \(2,\), got \(3,\)",
    ),
    (
        lambda: est.greg_weights(torch.ones(3, 2), torch.ones(2), _PI, 8),
        r"Invalid h: expected shape \(4, q\)",
    ),
    (
        lambda: est.greg_weights(torch.ones(4, 2), torch.ones(3), _PI, 8),
        r"Invalid h_population_mean: expected shape \(2,\), got \(3,\)",
    ),
    (
        lambda: est.greg_weights(torch.ones(4, 1), torch.ones(1), _PI, 8, c=torch.ones(3)),
        r"Invalid c: expected shape \(4,\)",
    ),
    (
        lambda: est.greg_weights(torch.ones(4, 1), torch.ones(1), _PI, 8, ridge=-1.0),
        r"Invalid ridge: -1.0",
    ),
    (lambda: var.srs_variance(_Y[:1], 8), r"at least 2 sampled units, got n = 1"),
    (lambda: var.hansen_hurwitz_variance(_Y[:1], _PI[:1], 8), r"at least 2 draws, got n = 1"),
    (
        lambda: var.horvitz_thompson_variance(_Y, _PI, _PIJ[:3], 8),
        r"Invalid pi_joint: expected shape \(4, 4\)",
    ),
    (
        lambda: var.horvitz_thompson_variance(_Y, _PI, _PIJ * 0, 8),
        r"joint inclusion probability of the sample to be > 0",
    ),
    (
        lambda: var.greg_variance(_Y, torch.ones(4, 1), torch.ones(1), _PI, _PIJ, 8, residuals="x"),
        r"Invalid residuals: 'x'",
    ),
    (lambda: var.srs_design_variance(_Y, 5), r"Invalid sample_size: 5 \(must be in \[1, 4\]\)"),
    (lambda: var.hansen_hurwitz_design_variance(_Y, _PI, 0), r"Invalid num_draws: 0"),
    (
        lambda: var.horvitz_thompson_design_variance(_Y, _PI, _PIJ[:2]),
        r"Invalid pi_joint: expected shape \(4, 4\)",
    ),
]


@pytest.mark.parametrize("call, message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
