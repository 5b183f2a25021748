"""Auxiliary data h_k, its population mean, the online working model and the gradient table."""

import pytest
import torch

from probopt.sampling.auxiliary import (
    AUXILIARY_NAMES,
    CachedGradNorm,
    CachedLoss,
    CachedResidual,
    ClassOneHot,
    Concat,
    GradientFactorTable,
    Intercept,
    OnlineLinearModel,
    PCAInputs,
    Product,
    RawInputs,
    make_auxiliary,
)

N, D, C = 30, 6, 3


def population(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=dtype) * torch.arange(1, D + 1, dtype=dtype)
    y = torch.arange(N) % C
    return x, y


def all_rows(aux, x, y):
    return aux(x, y, torch.arange(len(x)))


@pytest.mark.parametrize("name", AUXILIARY_NAMES)
def test_every_choice_has_intercept_and_exact_population_mean(name):
    x, y = population()
    aux = make_auxiliary(name, k=3).fit(x, y, chunk_size=7)  # chunks must not matter
    h = all_rows(aux, x, y)
    assert h.shape == (N, aux.dim)
    assert torch.equal(h[:, 0], torch.ones(N, dtype=h.dtype))
    # float64 data: the chunked mean equals the one-shot mean to rounding
    torch.testing.assert_close(aux.population_mean, h.mean(0), atol=1e-12, rtol=0)


def test_pca_scores_are_whitened_and_uncorrelated():
    x, y = population()
    aux = PCAInputs(4).fit(x, y)
    z = all_rows(aux, x, y)[:, 1:]
    # population covariance of whitened scores is the identity (ddof 1), to rounding
    torch.testing.assert_close(torch.cov(z.T), torch.eye(4, dtype=z.dtype), atol=1e-10, rtol=0)
    assert aux.name == "pca4"
    unwhite = PCAInputs(2, whiten=False).fit(x, y)
    var = torch.cov(all_rows(unwhite, x, y)[:, 1:].T).diagonal()
    assert var[0] >= var[1]  # ordered by explained variance
    with pytest.raises(ValueError, match="Invalid k"):
        PCAInputs(0)


def test_pca_k_larger_than_dimension_is_clipped():
    x, y = population()
    assert PCAInputs(50).fit(x, y).dim == 1 + D


def test_onehot_spans_the_class_indicators():
    x, y = population()
    h = all_rows(ClassOneHot().fit(x, y), x, y)
    onehot = torch.nn.functional.one_hot(y, C).to(h.dtype)
    # the same column space: regress the one-hot on h without residual
    coef = torch.linalg.lstsq(h, onehot).solution
    torch.testing.assert_close(h @ coef, onehot, atol=1e-12, rtol=0)


def test_product_is_the_rowwise_kronecker_product():
    x, y = population()
    aux = Product(ClassOneHot(), RawInputs()).fit(x, y)
    ha = all_rows(ClassOneHot().fit(x, y), x, y)
    hb = all_rows(RawInputs().fit(x, y), x, y)
    h = all_rows(aux, x, y)
    assert aux.dim == C * (1 + D)
    torch.testing.assert_close(h[5], torch.kron(ha[5], hb[5]), atol=0, rtol=0)


def test_concat_keeps_one_intercept():
    x, y = population()
    aux = Concat(Intercept(), ClassOneHot(), PCAInputs(2)).fit(x, y)
    assert aux.dim == 1 + (C - 1) + 2
    assert aux.name == "intercept+onehot+pca2"
    with pytest.raises(ValueError, match="at least two"):
        Concat(Intercept())


def test_cached_tables_keep_the_population_mean_exact():
    x, y = population()
    aux = Product(ClassOneHot(), CachedLoss(initial=0.5)).fit(x, y)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        idx = torch.randperm(N, generator=gen)[:7]
        losses = torch.rand(7, generator=gen, dtype=torch.float64)
        aux.observe(idx, x[idx], y[idx], losses=losses)
        torch.testing.assert_close(
            aux.population_mean, all_rows(aux, x, y).mean(0), atol=1e-12, rtol=0
        )
    # an observe without the needed values changes nothing
    old = aux.population_mean.clone()
    aux.observe(idx, x[idx], y[idx], grad_norms=torch.ones(7))
    assert torch.equal(aux.population_mean, old)


def test_cached_loss_reads_before_write():
    x, y = population()
    aux = CachedLoss(initial=2.0).fit(x, y)
    idx = torch.tensor([1, 4])
    aux.observe(idx, x[idx], y[idx], losses=torch.tensor([5.0, 6.0], dtype=torch.float64))
    h = aux(x[idx], y[idx], idx)
    assert h[:, 1].tolist() == [5.0, 6.0]
    assert aux.population_mean[1].item() == pytest.approx((2.0 * (N - 2) + 11.0) / N, abs=1e-12)


def test_cached_residual_is_softmax_minus_onehot_without_class0():
    x, y = population()
    aux = CachedResidual().fit(x, y)
    idx = torch.tensor([0, 1, 2])
    logits = torch.randn(3, C, dtype=torch.float64)
    aux.observe(idx, x[idx], y[idx], outputs=logits)
    delta = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y[idx], C)
    torch.testing.assert_close(aux(x[idx], y[idx], idx)[:, 1:], delta[:, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(aux.population_mean, all_rows(aux, x, y).mean(0), atol=1e-12, rtol=0)


def test_grad_norm_table():
    x, y = population()
    aux = CachedGradNorm().fit(x, y)
    idx = torch.tensor([3, 7])
    aux.observe(idx, x[idx], y[idx], grad_norms=torch.tensor([1.5, 2.5], dtype=torch.float64))
    assert aux(x[idx], y[idx], idx)[:, 1].tolist() == [1.5, 2.5]


def test_unfitted_and_unknown():
    with pytest.raises(RuntimeError, match="fit"):
        RawInputs()(torch.zeros(2, 2), None, torch.arange(2))
    with pytest.raises(ValueError, match="unknown auxiliary"):
        make_auxiliary("nope")
    with pytest.raises(ValueError, match="empty"):
        RawInputs().fit(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# ---- the online working model


def regression_batches(num=5, n=12, q=4, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        h = torch.cat([torch.ones(n, 1), torch.randn(n, q - 1, generator=g)], 1).double()
        y = torch.randn(n, p, generator=g).double()
        out.append((h, y))
    return out


def test_rls_without_forgetting_and_ridge_is_batch_least_squares():
    batches = regression_batches()
    lm = OnlineLinearModel(4, 3, ridge=0.0, forgetting=1.0, dtype=torch.float64)
    for h, y in batches:
        lm.update(h, y)
    b = lm.solve()
    h_all = torch.cat([h for h, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    ref = torch.linalg.lstsq(h_all, y_all).solution
    torch.testing.assert_close(b, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lm.predict(h_all[:2]), h_all[:2] @ ref, atol=1e-12, rtol=0)


def test_rls_ridge_to_zero_converges_to_least_squares():
    batches = regression_batches()
    h_all = torch.cat([h for h, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    ref = torch.linalg.lstsq(h_all, y_all).solution
    errs = []
    for ridge in (1e-2, 1e-4, 1e-6, 1e-8):
        lm = OnlineLinearModel(4, 3, ridge=ridge, dtype=torch.float64)
        for h, y in batches:
            lm.update(h, y)
        errs.append(float((lm.solve() - ref).abs().max()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-8


def test_forgetting_is_exponentially_weighted_ridge():
    batches = regression_batches()
    lam, rho = 0.7, 0.05
    lm = OnlineLinearModel(4, 3, ridge=rho, forgetting=lam, dtype=torch.float64)
    for h, y in batches:
        lm.update(h, y)
    weights = [lam ** (len(batches) - 1 - t) for t in range(len(batches))]
    s_hh = sum(w * h.T @ h for w, (h, _) in zip(weights, batches))
    s_hy = sum(w * h.T @ y for w, (h, y) in zip(weights, batches))
    a = s_hh + rho * s_hh.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(lm.solve(), torch.linalg.solve(a, s_hy), atol=1e-12, rtol=0)
    assert lm.weight == pytest.approx(sum(w * 12 for w in weights))


def test_singular_statistics_are_handled_and_reset():
    lm = OnlineLinearModel(3, 2, ridge=0.0, dtype=torch.float64)
    assert torch.equal(lm.solve(), torch.zeros(3, 2, dtype=torch.float64))  # no data yet
    h = torch.ones(5, 3, dtype=torch.float64)  # rank one: jitter makes it solvable
    lm.update(h, torch.ones(5, 2, dtype=torch.float64))
    b = lm.solve()
    torch.testing.assert_close(h @ b, torch.ones(5, 2, dtype=torch.float64), atol=1e-6, rtol=0)
    lm.reset()
    assert lm.weight == 0.0 and not lm.coef.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q": 0, "p": 1}, "Invalid q"),
        ({"q": 1, "p": 0}, "Invalid p"),
        ({"q": 1, "p": 1, "ridge": -1.0}, "Invalid ridge"),
        ({"q": 1, "p": 1, "forgetting": 0.0}, "Invalid forgetting"),
        ({"q": 1, "p": 1, "forgetting": 1.5}, "Invalid forgetting"),
    ],
)
def test_online_model_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineLinearModel(**kwargs)


def test_online_model_shape_checks_leave_state_untouched():
    lm = OnlineLinearModel(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="h must have shape"):
        lm.update(torch.ones(3, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="y must have shape"):
        lm.update(torch.ones(3, 2), torch.ones(4, 2))
    assert lm.weight == 0.0 and not lm.s_hh.any()


# ---- the factored gradient table


def test_gradient_factor_table_sums_are_exact():
    g = torch.Generator().manual_seed(0)
    n_pop, d_in, d_out = 20, 4, 3
    static_x = torch.randn(n_pop, d_in, generator=g, dtype=torch.float64)
    tab = GradientFactorTable(
        n_pop,
        {"a": (d_out, d_in), "b": (d_out, d_in)},
        dtype=torch.float64,
        static_inputs={"b": static_x},
    )
    for _ in range(5):
        idx = torch.randperm(n_pop, generator=g)[:6]
        a = torch.randn(6, d_in, generator=g, dtype=torch.float64)
        d = torch.randn(6, d_out, generator=g, dtype=torch.float64)
        tab.write(idx, {"a": (a, d), "b": (static_x[idx], d)})
    for layer in ("a", "b"):
        grads = tab.deltas[layer].unsqueeze(2) * tab.inputs[layer].unsqueeze(1)
        pop_w, pop_b = tab.population_mean(layer)
        torch.testing.assert_close(pop_w, grads.mean(0), atol=1e-12, rtol=0)
        torch.testing.assert_close(pop_b, tab.deltas[layer].mean(0), atol=1e-12, rtol=0)
        idx = torch.tensor([0, 5, 9])
        bw, bb = tab.batch_mean(layer, idx)
        torch.testing.assert_close(bw, grads[idx].mean(0), atol=1e-12, rtol=0)
    assert tab.inputs["b"] is static_x  # held by reference, never written
    before = tab.sum_w["a"].clone()
    tab.resync()
    torch.testing.assert_close(tab.sum_w["a"], before, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="static input"):
        GradientFactorTable(3, {"a": (2, 2)}, static_inputs={"a": torch.zeros(4, 2)})
