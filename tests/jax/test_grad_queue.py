"""probopt.jax.grad_queue: parity with torch GradQueue and models/grad_queue.py, jit, policy."""

import importlib
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import probopt.models.grad_queue as tgq  # noqa: E402
import pyro  # noqa: E402
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
    dict(queue_length=4, q_min=2, q_max=6, refresh_every=5, trend_scale=0.05, sharpness=1.5),
    dict(queue_length=5, q_min=3, q_max=5, statistics="ema", predictive="normal",
         length_rule="lengthen_on_change", preserve_norm=True, min_amplification=0.2,
         max_amplification=3.0),
]  # fmt: skip
NAN_AT = 6  # a gradient with an Inf at this step: both skip it


def _torch_run(case, stream, dtype=torch.float64):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES]
    opt = GradQueue(torch.optim.SGD(params, lr=0.0), foreach=False, **case)
    outs, lengths = [], []
    for gs, loss in zip(stream, LOSSES):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step(loss=loss)
        outs.append([p.grad.numpy().copy() for p in params])  # GQ rewrote .grad in place
        lengths.append(opt.queue_length)
    return outs, lengths, opt, params


def _jax_run(case, stream, dtype=jnp.float64):
    tx = jgq.grad_queue(**case)
    state = tx.init([jnp.zeros(s, dtype) for s in SHAPES])
    traces = []

    @jax.jit
    def update(g, s, loss):
        traces.append(1)
        return tx.update(g, s, loss=loss)

    outs, lengths = [], []
    for gs, loss in zip(stream, LOSSES):
        u, state = update([jnp.asarray(g, dtype) for g in gs], state, loss)
        outs.append(u)
        lengths.append(int(state.inner_state.queue_length))
    assert len(traces) == 1  # no recompilation: state shapes and dtypes are stable
    return outs, lengths, state


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_grad_queue_float64(x64, case):
    """Same gradients and losses, float64: the rewritten gradients of every step, the queue
    length of every step and the queue state at the end within 1e-10 (the paths differ in
    reduction order, the refresh's mean and the norm; measured ~1e-16). The queue length really
    moves (a wrong eviction would show). A gradient with an Inf at step 6 is skipped by both:
    torch leaves its state alone and counts it, JAX returns zeros, keeps its state and counts."""
    stream = _stream(nan_at=NAN_AT)
    ref, ref_lengths, opt, params = _torch_run(case, stream)
    outs, lengths, state = _jax_run(case, stream)
    assert lengths == ref_lengths and len(set(lengths)) >= 2, (lengths, ref_lengths)
    for t, (r, o) in enumerate(zip(ref, outs)):
        for a, b in zip(r, o):
            if t == NAN_AT:
                assert (np.asarray(b) == 0).all()
            else:
                np.testing.assert_allclose(np.asarray(b), a, rtol=1e-10, atol=1e-13)
    assert opt.num_skipped_steps == 1 and int(state.nonfinite_count) == 1
    gq = state.inner_state
    assert int(gq.step) == len(LOSSES) - 1
    keys = ("mean", "var") if case.get("statistics") == "ema" else ("queue", "total", "total_sq")
    for i, p in enumerate(params):
        st = opt.state[p]
        assert int(gq.count) == st["count"]
        for key in keys:
            np.testing.assert_allclose(getattr(gq, key)[i], st[key].numpy(), rtol=1e-10,
                                       atol=1e-13)  # fmt: skip


def test_matches_torch_grad_queue_float32():
    """float32, the first case: the rewritten gradients within 1e-4 relative, 1e-5 absolute
    (torch computes the loss trend in double, JAX in float32, and erf, log1p and the running
    sums round differently; measured up to 1e-5 relative, 4e-6 absolute), and the same queue
    lengths."""
    stream = _stream(nan_at=NAN_AT)
    ref, ref_lengths, _, _ = _torch_run(CASES[0], stream, torch.float32)
    outs, lengths, _ = _jax_run(CASES[0], stream, jnp.float32)
    assert lengths == ref_lengths
    for t, (r, o) in enumerate(zip(ref, outs)):
        if t != NAN_AT:
            for a, b in zip(r, o):
                assert b.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=1e-5)


def _pure_functions(gq, q, g, sizes, dofs):
    """Every pure function of a Grad Queue module on one input, as a flat list."""
    out = []
    sums = gq.queue_sums(q, q[0])
    mean, scale = gq.queue_moments(q[0], *sums, 6)
    out += [*sums, mean, scale]
    out += [*gq.queue_push(q[0], *sums, g), *gq.queue_evict(q[0], *sums, q[2])]
    pred = gq.predictive_scale(scale, 6, "student")
    out.append(pred)
    w = dict(min_amplification=0.3, max_amplification=2.5, sharpness=1.7)
    for dof in dofs:
        out += [gq.scarcity(g, mean, pred, 1e-8, dof), gq.amplify(g, mean, pred, dof=dof, **w),
                gq.tail_probability(g, mean, pred, 1e-8, dof)]  # fmt: skip
    out += [*gq.ema_moments(mean, scale, g, 0.8), gq.cluster_scale(scale, sizes, 8)]
    for combine in ("size", "normalized"):
        out.append(gq.combine_cluster_gradients(q[:3], sizes, abs(q[3:]), combine))
    return out


def test_pure_functions_match_torch_models(x64):
    """Every pure function of models/grad_queue.py, on the same inputs (float64, 1e-12), with
    the Normal and Student-t (ν = 1, 4) predictives."""
    rng = np.random.default_rng(0)
    queue = rng.standard_normal((6, 4, 3))
    grad = rng.standard_normal((4, 3)) * 2
    dofs = (None, 1.0, 4.0)
    ref = _pure_functions(tgq, torch.tensor(queue), torch.tensor(grad), torch.tensor([3, 1, 4]),
                          dofs)  # fmt: skip
    ours = jax.jit(lambda q, g, n: _pure_functions(jgq, q, g, n, dofs))(
        jnp.asarray(queue), jnp.asarray(grad), jnp.asarray([3, 1, 4])
    )
    assert len(ours) == len(ref)
    for t, j in zip(ref, ours):
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
    draws = jnp.asarray(np.random.default_rng(0).standard_normal((6, 20000)), jnp.float32)

    @jax.jit
    def scarcity(draws):
        queue, grad = draws[:5], draws[5]
        total, total_sq = jgq.queue_sums(queue, queue[0])
        mean, scale = jgq.queue_moments(queue[0], total, total_sq, 5)
        return jgq.scarcity(grad, mean, jgq.predictive_scale(scale, 5, "student"), dof=4.0)

    rho = scarcity(draws)
    assert abs(float(rho.mean()) - 0.5) < 0.01
    deciles = np.quantile(np.asarray(rho), np.linspace(0.1, 0.9, 9))
    np.testing.assert_allclose(deciles, np.linspace(0.1, 0.9, 9), atol=0.015)


def test_works_in_a_chain_under_lax_scan():
    """GQ + SGD with momentum under lax.scan (GQ's while_loop and cond inside a scan), the loss
    arriving as an extra argument: the state layout is that of init and the loss falls."""
    tx = optax.chain(jgq.grad_queue(queue_length=3, q_min=2, q_max=4), optax.sgd(0.1, 0.9))
    w0 = {"a": jnp.ones(3), "b": jnp.array(-2.0, jnp.float32)}
    loss_fn = lambda w: (w["a"] ** 2).sum() + w["b"] ** 2  # noqa: E731

    def body(carry, _):
        w, s = carry
        loss, g = jax.value_and_grad(loss_fn)(w)
        u, s = tx.update(g, s, w, loss=loss)
        return (optax.apply_updates(w, u), s), loss

    s0 = tx.init(w0)
    (_, s_scan), losses = jax.lax.scan(body, (w0, s0), None, length=12)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), s0)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), s_scan) == layout
    assert int(s_scan[0].inner_state.step) == 12
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


def test_numpyro_model_is_the_student_t_predictive():
    """The NumPyro model's site is the Pyro model's distribution: same location, scale and
    degrees of freedom, same log density (float32: 1e-6 relative)."""
    numpyro = pytest.importorskip("numpyro")
    q = jnp.array([[0.0, 1.0], [1.0, 1.5], [2.0, 0.5]])
    g = jnp.array([0.5, 2.0])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(jgq.model, 0)).get_trace(q, g)
    fn = tr["grad"]["fn"].base_dist
    np.testing.assert_allclose(fn.loc, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(fn.scale, np.std(np.asarray(q), 0, ddof=1) * math.sqrt(4 / 3) + 1e-8,
                               rtol=1e-6)  # fmt: skip
    assert (np.asarray(fn.df) == 2.0).all()
    torch_tr = pyro.poutine.trace(tgq.model).get_trace(torch.tensor(np.asarray(q)),
                                                       torch.tensor(np.asarray(g)))  # fmt: skip
    np.testing.assert_allclose(tr["grad"]["fn"].log_prob(g),
                               float(torch_tr.nodes["grad"]["fn"].log_prob(torch.tensor(
                                   np.asarray(g)))), rtol=1e-6)  # fmt: skip
