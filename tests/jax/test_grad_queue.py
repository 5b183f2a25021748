"""probopt.jax.grad_queue: parity with torch GradQueue and models/grad_queue.py, jit, policy."""

import importlib
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import probopt.models.grad_queue as tgq  # noqa: E402
import torch  # noqa: E402

from probopt.optim import GradQueue  # noqa: E402

# the package re-exports the function grad_queue, which shadows the module's attribute name
jgq = importlib.import_module("probopt.jax.grad_queue")

SHAPES = [(3, 2), (5,), ()]
# a falling, flat, jumping, NaN (ignored) and falling loss: the queue length moves both ways
LOSSES = [1.0, 0.6, 0.5, 0.48, 0.47, 0.47, 0.47, 0.9, 0.85, float("nan"), 0.8, 0.6, 0.5, 0.45]


def _stream(nan_at=None):
    rng = np.random.default_rng(11)
    out = []
    for t in range(len(LOSSES)):
        gs = [rng.standard_normal(s) * 0.1 + 0.2 for s in SHAPES]
        gs[1][0] = 0.2 if t % 5 else 3.0  # a rare burst in one coordinate
        gs[0][0, 0] = 0.5  # a constant ("monotonous") coordinate
        if t == nan_at:
            gs[2] = np.array(np.inf)
        out.append(gs)
    return out


CASES = [
    dict(queue_length=4, q_min=2, q_max=6, refresh_every=5, trend_scale=0.05),
    dict(queue_length=5, q_min=3, q_max=5, statistics="ema", predictive="normal",
         length_rule="lengthen_on_change", preserve_norm=True, min_amplification=0.2,
         max_amplification=3.0),
    dict(queue_length=6, q_min=2, q_max=6, length_rule="fixed", sharpness=1.5,
         preserve_norm=True),
]  # fmt: skip


def _torch_run(case, stream):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = GradQueue(torch.optim.SGD(params, lr=0.0), foreach=False, **case)
    outs = []
    for gs, loss in zip(stream, LOSSES):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step(loss=loss)
        outs.append([p.grad.numpy().copy() for p in params])  # GQ rewrote .grad in place
    return outs, opt, params


def _jax_run(case, stream):
    tx = jgq.grad_queue(**case)
    state = tx.init([jnp.zeros(s, jnp.float64) for s in SHAPES])
    update = jax.jit(lambda g, s, loss: tx.update(g, s, loss=loss))
    outs = []
    for gs, loss in zip(stream, LOSSES):
        u, state = update([jnp.asarray(g, jnp.float64) for g in gs], state, loss)
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_grad_queue_float64(x64, case):
    """Same gradients and losses, float64: the rewritten gradients of every step and the queue
    state at the end within 1e-10 (the paths differ in reduction order, the refresh's mean and
    the norm; measured ~1e-16). The queue length really moved (the test would not see a wrong
    eviction otherwise)."""
    stream = _stream()
    ref, opt, params = _torch_run(case, stream)
    outs, state = _jax_run(case, stream)
    for r, o in zip(ref, outs):
        for a, b in zip(r, o):
            np.testing.assert_allclose(np.asarray(b), a, rtol=1e-10, atol=1e-13)
    gq = state.inner_state
    assert int(gq.queue_length) == opt.queue_length
    assert int(gq.step) == len(LOSSES)
    keys = ("mean", "var") if case.get("statistics") == "ema" else ("queue", "total", "total_sq")
    for i, p in enumerate(params):
        st = opt.state[p]
        assert int(gq.count) == st["count"]
        for key in keys:
            np.testing.assert_allclose(getattr(gq, key)[i], st[key].numpy(), rtol=1e-10,
                                       atol=1e-13)  # fmt: skip


def test_queue_length_moves_and_skip_policy_matches_torch(x64):
    """The lengths seen step by step are torch's, and a gradient with an Inf is skipped by both:
    torch leaves the state alone and counts it; JAX returns zeros, the same state and counts."""
    case = dict(CASES[0])
    stream = _stream(nan_at=6)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = GradQueue(torch.optim.SGD(params, lr=0.0), foreach=False, **case)
    tx = jgq.grad_queue(**case)
    state = tx.init([jnp.zeros(s, jnp.float64) for s in SHAPES])
    update = jax.jit(lambda g, s, loss: tx.update(g, s, loss=loss))
    lengths = set()
    for t, (gs, loss) in enumerate(zip(stream, LOSSES)):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step(loss=loss)
        u, state = update([jnp.asarray(g, jnp.float64) for g in gs], state, loss)
        assert int(state.inner_state.queue_length) == opt.queue_length
        lengths.add(opt.queue_length)
        if t == 6:
            assert all(bool((x == 0).all()) for x in u)
        else:
            for p, x in zip(params, u):
                np.testing.assert_allclose(np.asarray(x), p.grad.numpy(), rtol=1e-10, atol=1e-13)
    assert opt.num_skipped_steps == 1 and int(state.nonfinite_count) == 1
    assert len(lengths) >= 3, lengths


@pytest.mark.parametrize("dof", [None, 1.0, 4.0])
def test_pure_functions_match_torch_models(x64, dof):
    """Every pure function of models/grad_queue.py, on the same inputs (float64, 1e-12)."""
    rng = np.random.default_rng(0)
    queue = rng.standard_normal((6, 4, 3))
    grad = rng.standard_normal((4, 3)) * 2
    tq, tg = torch.tensor(queue), torch.tensor(grad)
    jq, jg = jnp.asarray(queue), jnp.asarray(grad)
    pairs = []
    t_sums, j_sums = tgq.queue_sums(tq, tq[0]), jgq.queue_sums(jq, jq[0])
    pairs += list(zip(t_sums, j_sums))
    tm, ts = tgq.queue_moments(tq[0], *t_sums, 6)
    jm, js = jgq.queue_moments(jq[0], *j_sums, 6)
    pairs += [(tm, jm), (ts, js)]
    pairs += list(zip(tgq.queue_push(tq[0], *t_sums, tg), jgq.queue_push(jq[0], *j_sums, jg)))
    pairs += list(zip(tgq.queue_evict(tq[0], *t_sums, tq[2]), jgq.queue_evict(jq[0], *j_sums,
                                                                              jq[2])))  # fmt: skip
    t_scale = tgq.predictive_scale(ts, 6, "student")
    j_scale = jgq.predictive_scale(js, jnp.asarray(6.0), "student")
    pairs.append((t_scale, j_scale))
    pairs.append(
        (tgq.scarcity(tg, tm, t_scale, 1e-8, dof), jgq.scarcity(jg, jm, j_scale, 1e-8, dof))
    )
    pairs.append((tgq.tail_probability(tg, tm, t_scale, 1e-8, dof),
                  jgq.tail_probability(jg, jm, j_scale, 1e-8, dof)))  # fmt: skip
    w = dict(min_amplification=0.3, max_amplification=2.5, sharpness=1.7)
    pairs.append((tgq.amplify(tg, tm, t_scale, dof=dof, **w), jgq.amplify(jg, jm, j_scale, dof=dof,
                                                                           **w)))  # fmt: skip
    pairs += list(zip(tgq.ema_moments(tm, ts, tg, 0.8), jgq.ema_moments(jm, js, jg, 0.8)))
    sizes = torch.tensor([3, 1, 4])
    pairs.append(
        (tgq.cluster_scale(ts, sizes, 8), jgq.cluster_scale(js, jnp.asarray([3, 1, 4]), 8))
    )
    cg = tq[:3]
    for combine in ("size", "normalized"):
        pairs.append((tgq.combine_cluster_gradients(cg, sizes, tq[3:].abs(), combine),
                      jgq.combine_cluster_gradients(jq[:3], jnp.asarray([3, 1, 4]),
                                                    jnp.abs(jq[3:]), combine)))  # fmt: skip
    for t, j in pairs:
        np.testing.assert_allclose(np.asarray(j), t.numpy(), rtol=1e-12, atol=1e-14)
    for trend in (-0.3, -0.02, 0.0, 0.011, 0.07):
        for rule in ("shorten_on_change", "lengthen_on_change", "fixed"):
            assert int(jgq.queue_length_from_trend(trend, 3, 17, 0.05, rule)) == (
                tgq.queue_length_from_trend(trend, 3, 17, 0.05, rule)
            )
    assert jgq.calibrated_sharpness(0.5, 3.0) == tgq.calibrated_sharpness(0.5, 3.0)
    assert jgq.loss_trend_update(None, None, 2.0, (0.9, 0.98)) == (2.0, 2.0)
    assert jgq.loss_trend_update(1.0, 2.0, 4.0, (0.5, 0.75)) == tgq.loss_trend_update(
        1.0, 2.0, 4.0, (0.5, 0.75)
    )


def test_scarcity_is_uniform_for_ordinary_gradients():
    """Probability integral transform: Normal gradients scored under the Student-t predictive of
    a queue of 5 i.i.d. Normal draws give rho ~ U(0, 1). 20000 draws: the mean within 0.01 of
    1/2 (its sd is 0.002) and Wallace's transform is within 0.004 of the exact probability for
    nu = 4, so the deciles lie within 0.015 of k/10."""
    key = jax.random.PRNGKey(0)
    draws = jax.random.normal(key, (6, 20000))
    queue, grad = draws[:5], draws[5]
    total, total_sq = jgq.queue_sums(queue, queue[0])
    mean, scale = jgq.queue_moments(queue[0], total, total_sq, 5)
    rho = jgq.scarcity(grad, mean, jgq.predictive_scale(scale, 5, "student"), dof=4.0)
    assert abs(float(rho.mean()) - 0.5) < 0.01
    deciles = np.quantile(np.asarray(rho), np.linspace(0.1, 0.9, 9))
    np.testing.assert_allclose(deciles, np.linspace(0.1, 0.9, 9), atol=0.015)


def test_works_in_a_chain_under_scan_without_recompiling():
    """GQ + SGD under lax.scan = the jitted Python loop bitwise; the loss arrives as an extra
    argument; one trace for many steps; state layout stable."""
    tx = optax.chain(jgq.grad_queue(queue_length=3, q_min=2, q_max=4), optax.sgd(0.1, 0.9))
    w0 = {"a": jnp.ones(3), "b": jnp.array(-2.0, jnp.float32)}  # strong types: one trace
    loss_fn = lambda w: (w["a"] ** 2).sum() + w["b"] ** 2  # noqa: E731
    traces = []

    def body(carry, _):
        traces.append(1)
        w, s = carry
        loss, g = jax.value_and_grad(loss_fn)(w)
        u, s = tx.update(g, s, w, loss=loss)
        return (optax.apply_updates(w, u), s), loss

    (w_scan, s_scan), losses = jax.lax.scan(body, (w0, tx.init(w0)), None, length=12)
    carry = (w0, tx.init(w0))
    step = jax.jit(body)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), carry[1])
    for _ in range(12):
        carry, _ = step(carry, None)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), carry[1]) == layout
    assert len(traces) == 2  # one for scan, one for the jitted step
    for a, b in zip(jax.tree.leaves(w_scan), jax.tree.leaves(carry[0])):
        np.testing.assert_array_equal(a, b)
    assert float(losses[-1]) < 0.5 * float(losses[0])


def test_amplification_none_is_the_identity():
    tx = jgq.grad_queue(amplification="none")
    g = {"x": jnp.array([1.0, -3.0])}
    u, state = tx.update(g, tx.init(g), loss=1.0)
    np.testing.assert_array_equal(u["x"], g["x"])
    u, state = tx.update({"x": jnp.array([1.0, jnp.nan])}, state, loss=1.0)
    assert (u["x"] == 0).all() and int(state.nonfinite_count) == 1  # the policy still applies


ERRORS = [
    (dict(q_min=1), "Invalid q_min: 1"),
    (dict(queue_length=2, q_min=4), "Invalid queue_length: 2"),
    (dict(q_max=8, queue_length=16), "Invalid q_max: 8"),
    (dict(amplification="cubic"), "Invalid amplification: 'cubic'"),
    (dict(min_amplification=2.0, max_amplification=1.0), "Invalid max_amplification: 1.0"),
    (dict(sharpness=0.0), "Invalid sharpness: 0.0"),
    (dict(predictive="cauchy"), "Invalid predictive: 'cauchy'"),
    (dict(statistics="median"), "Invalid statistics: 'median'"),
    (dict(length_rule="grow"), "Invalid length_rule: 'grow'"),
    (dict(loss_betas=(0.9, 1.0)), r"Invalid loss_betas\[1\]: 1.0"),
    (dict(trend_scale=-1.0), "Invalid trend_scale: -1.0"),
    (dict(nonfinite="raise"), "'raise'"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jgq.grad_queue(**kwargs)


def test_numpyro_model_is_the_student_t_predictive(x64):
    numpyro = pytest.importorskip("numpyro")
    q = jnp.array([[0.0, 1.0], [1.0, 1.5], [2.0, 0.5]])
    g = jnp.array([0.5, 2.0])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(jgq.model, 0)).get_trace(q, g)
    fn = tr["grad"]["fn"].base_dist
    np.testing.assert_allclose(fn.loc, [1.0, 1.0])
    np.testing.assert_allclose(fn.scale, np.std(np.asarray(q), 0, ddof=1) * math.sqrt(4 / 3) + 1e-8)
    assert (np.asarray(fn.df) == 2.0).all()
    scale = torch.tensor(np.asarray(fn.scale) - 1e-8)
    torch_fn = tgq.predictive_distribution(torch.ones(2, dtype=torch.float64), scale, dof=2.0)
    np.testing.assert_allclose(tr["grad"]["fn"].log_prob(g),
                               float(torch_fn.log_prob(torch.tensor(np.asarray(g))).sum()),
                               rtol=1e-12)  # fmt: skip
