"""probopt.jax.vsgd / constant_vsgd: parity with the torch reference, jit/scan properties,
the non-finite policy, validation."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from optax.tree_utils import tree_get  # noqa: E402

import probopt.jax as pj  # noqa: E402
from probopt.jax import _base as jax_base  # noqa: E402
from probopt.optim import VSGD, ConstantVSGD  # noqa: E402

SHAPES = [(5, 3), (7,), (2, 2, 2), (), (300,)]
STEPS = 8


def _stream(dtype=np.float64, nan_at=None, seed=7):
    """A fixed gradient sequence: list over steps of lists over parameters (NumPy)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(STEPS):
        gs = [(rng.standard_normal(s) * 0.1 + 0.03).astype(dtype) for s in SHAPES]
        if nan_at is not None and t == nan_at:
            gs[1] = gs[1].copy()
            gs[1].flat[2] = np.nan
        out.append(gs)
    return out


def _init(dtype=np.float64):
    rng = np.random.default_rng(3)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _torch_run(cls, stream, dtype=torch.float64, maximize=False, **hyper):
    params = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in _init()]
    opt = cls(params, maximize=maximize, foreach=False, **hyper)
    for gs in stream:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    state = [{k: v.detach().numpy() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().numpy() for p in params], state, opt


def _jax_run(tx, stream, dtype=jnp.float64, negate=False):
    params = [jnp.asarray(p, dtype) for p in _init()]
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for gs in stream:
        g = [jnp.asarray(-x if negate else x, dtype) for x in gs]
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def _close(a, b, rtol, atol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


VSGD_CASES = [
    {},
    {"lr": 0.03, "variance_ratio": 5.0, "prior_strength": 1e-6, "kappa1": 0.6, "kappa2": 1.0,
     "eps": 1e-3, "weight_decay": 0.05, "maximize": True},
]  # fmt: skip


def _jax_vsgd_kwargs(hyper):
    kw = {k: v for k, v in hyper.items() if k != "maximize"}
    if "lr" in kw:
        kw["learning_rate"] = kw.pop("lr")
    return kw


@pytest.mark.parametrize("hyper", VSGD_CASES)
def test_vsgd_matches_torch_reference_float64(x64, hyper):
    """Same gradient sequence, float64: parameters and every state entry within 1e-10 relative
    (the two differ only in the rounding of t^-κ and the order of a few float64 operations; the
    measured difference is ~1e-15). ``maximize`` is the JAX transform on negated gradients."""
    stream = _stream()
    ref, ref_state, _ = _torch_run(VSGD, stream, track_posterior=True, **hyper)
    tx = pj.vsgd(track_posterior=True, **_jax_vsgd_kwargs(hyper))
    params, state = _jax_run(tx, stream, negate=hyper.get("maximize", False))
    for p, q in zip(ref, params):
        _close(q, p, rtol=1e-10, atol=1e-14)
    assert int(tree_get(state, "count")) == STEPS
    for key, torch_key in [("mu", "mu"), ("b_g", "b_g"), ("b_ghat", "b_ghat"),
                           ("variance", "variance"), ("beta", "beta")]:  # fmt: skip
        for s, leaf in zip(ref_state, tree_get(state, key)):
            assert leaf.dtype == jnp.float64
            _close(leaf, s[torch_key], rtol=1e-10, atol=1e-14)
    for s in ref_state:
        assert float(s["step"]) == STEPS


def test_vsgd_matches_torch_float32():
    """float32: within 2e-5 relative, 1e-6 absolute after 8 steps. torch computes t^-κ in double
    and rounds it per operation, JAX in float32 and in the gain form; measured 5e-6 relative,
    5e-7 absolute."""
    stream = _stream(np.float32)
    ref, ref_state, _ = _torch_run(VSGD, stream, dtype=torch.float32, weight_decay=0.01)
    params, state = _jax_run(pj.vsgd(weight_decay=0.01), stream, jnp.float32)
    for p, q in zip(ref, params):
        assert q.dtype == jnp.float32
        _close(q, p, rtol=2e-5, atol=1e-6)
    for s, leaf in zip(ref_state, tree_get(state, "b_ghat")):
        _close(leaf, s["b_ghat"], rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize(
    "hyper", [{}, {"weight_decay": 0.1, "eps": 1e-4, "variance_ratio": 3.0, "prior_variance": 0.01}]
)
def test_constant_vsgd_matches_torch_float64(x64, hyper):
    """ConstantVSGD (torch foreach path = lerp), 1e-10 relative."""
    stream = _stream()
    ref, ref_state, _ = _torch_run(ConstantVSGD, stream, **hyper)
    params, state = _jax_run(pj.constant_vsgd(**hyper), stream)
    for p, q in zip(ref, params):
        _close(q, p, rtol=1e-10, atol=1e-14)
    for s, leaf in zip(ref_state, tree_get(state, "mu")):
        _close(leaf, s["mu"], rtol=1e-10, atol=1e-14)
    assert int(tree_get(state, "count")) == STEPS


def test_constant_vsgd_matches_torch_float32():
    """float32: within 1e-5 relative, 1e-6 absolute after 8 steps (one rounding per operation in
    both; measured 5e-7 relative, 7e-7 absolute)."""
    stream = _stream(np.float32)
    ref, ref_state, _ = _torch_run(ConstantVSGD, stream, dtype=torch.float32, weight_decay=0.01)
    params, state = _jax_run(pj.constant_vsgd(weight_decay=0.01), stream, jnp.float32)
    for p, q in zip(ref, params):
        _close(q, p, rtol=1e-5, atol=1e-6)
    for s, leaf in zip(ref_state, tree_get(state, "mu")):
        _close(leaf, s["mu"], rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["cond", "select"])
def skip_form(request, monkeypatch):
    """Both forms of the skip policy: lax.cond (used on CPU) and jnp.where (on accelerators)."""
    monkeypatch.setattr(jax_base, "_skip_by_cond", lambda: request.param == "cond")
    return request.param


def test_skip_policy_matches_torch_skip(x64, skip_form):
    """A NaN at step 3: nothing changes at that step (parameters, μ, b, count), the skip is
    counted, and the run then goes on exactly as torch's nonfinite="skip" (1e-10); with the
    conditional and with the select."""
    stream = _stream(nan_at=3)
    ref, ref_state, opt = _torch_run(VSGD, stream, weight_decay=0.05)
    params, state = _jax_run(pj.vsgd(weight_decay=0.05), stream)
    assert opt.num_skipped_steps == 1
    assert int(state.nonfinite_count) == 1
    assert int(tree_get(state, "count")) == STEPS - 1
    for p, q in zip(ref, params):
        _close(q, p, rtol=1e-10, atol=1e-14)
    for s, leaf in zip(ref_state, tree_get(state, "mu")):
        _close(leaf, s["mu"], rtol=1e-10, atol=1e-14)


def test_skip_leaves_params_and_state_bitwise_unchanged(skip_form):
    tx = pj.vsgd(weight_decay=0.1)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
    update = jax.jit(tx.update)
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    bad = {"w": grads["w"].at[0, 0].set(jnp.inf), "b": grads["b"]}
    u2, state2 = update(bad, state, params)
    assert all(bool((x == 0).all()) for x in jax.tree.leaves(u2))
    same = jax.tree.map(lambda a, b: bool((a == b).all()), state.inner_state, state2.inner_state)
    assert all(jax.tree.leaves(same))
    assert int(state2.nonfinite_count) == 1


def test_ignore_policy_lets_nan_through_and_raise_is_rejected():
    tx = pj.scale_by_vsgd(nonfinite="ignore")
    state = tx.init(jnp.zeros(2))
    u, state = jax.jit(tx.update)(jnp.array([jnp.nan, 1.0]), state)
    assert bool(jnp.isnan(u[0])) and bool(jnp.isnan(state.mu[0])) and bool(jnp.isfinite(u[1]))
    with pytest.raises(ValueError, match="'raise'"):
        pj.vsgd(nonfinite="raise")


def _count_traces(tx, params, grads_seq):
    traces = []

    def step(g, s, p):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(1, 2))
    state = tx.init(params)
    layout = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for g in grads_seq:
        params, state = jitted(g, state, params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == layout
    return len(traces), params, state


@pytest.mark.parametrize(
    "make",
    [pj.vsgd, lambda: pj.vsgd(track_posterior=True, weight_decay=0.1), pj.constant_vsgd,
     lambda: pj.vsgd(learning_rate=optax.exponential_decay(0.1, 10, 0.5))],
)  # fmt: skip
def test_second_update_does_not_recompile_and_layout_is_stable(make):
    """optax's property tests: one trace for many steps (donated buffers), state shapes and
    dtypes (int32 count included) identical to the init state's after every step."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
    grads = [{"w": jnp.full((4, 3), 0.1 * i), "b": jnp.full(3, 0.2, jnp.bfloat16)}
             for i in range(1, 5)]  # fmt: skip
    n, params, state = _count_traces(make(), params, grads)
    assert n == 1
    assert params["b"].dtype == jnp.bfloat16
    if make is not pj.constant_vsgd:  # VSGD keeps half-precision statistics in float32 (torch)
        assert tree_get(state, "mu")["b"].dtype == jnp.float32


def test_runs_under_lax_scan_like_a_python_loop():
    """lax.scan over a gradient sequence = the jitted Python loop, bitwise (same XLA ops)."""
    tx = pj.vsgd(weight_decay=0.01)
    stream = [jnp.asarray(gs[0], jnp.float32) for gs in _stream(np.float32)]
    p0 = jnp.asarray(_init(np.float32)[0])

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p_scan, s_scan), _ = jax.lax.scan(jax.jit(body), (p0, tx.init(p0)), jnp.stack(stream))
    carry = (p0, tx.init(p0))
    for g in stream:
        carry, _ = jax.jit(body)(carry, g)
    np.testing.assert_array_equal(p_scan, carry[0])
    np.testing.assert_array_equal(tree_get(s_scan, "b_g"), tree_get(carry[1], "b_g"))


def test_inject_hyperparams_learning_rate():
    tx = optax.inject_hyperparams(pj.vsgd)(learning_rate=0.1)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    u, state = jax.jit(tx.update)(jnp.array([2.0, -4.0]), state, p)
    ref_u, _ = pj.vsgd(0.1).update(jnp.array([2.0, -4.0]), pj.vsgd(0.1).init(p), p)
    np.testing.assert_allclose(u, ref_u, rtol=1e-6)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_first_step_and_limit_facts():
    """Step 1: μ₁ = ĝ₁/(1 + K_g) and |u₁| = μ₁/sqrt(μ₁² + σ₁²) with σ₁² = v_g K_g/(1 + K_g)."""
    tx = pj.scale_by_vsgd(track_posterior=True, nonfinite="ignore")
    g = jnp.array([0.31, -3.1])
    u, s = tx.update(g, tx.init(g))
    np.testing.assert_allclose(s.mu, g / 31, rtol=1e-6)
    v_g = 1e-8 / (1e-8 + pj.JITTER / 2)
    sigma2 = v_g * 30 / 31
    np.testing.assert_allclose(s.variance, sigma2, rtol=1e-5)
    np.testing.assert_allclose(u, s.mu / jnp.sqrt(s.mu**2 + sigma2), rtol=1e-5)
    np.testing.assert_allclose(s.beta, 30 / 31, rtol=1e-6)


ERRORS = [
    (lambda: pj.vsgd(learning_rate=-1.0), "Invalid learning_rate: -1.0"),
    (lambda: pj.vsgd(variance_ratio=0.0), "Invalid variance_ratio: 0.0"),
    (lambda: pj.vsgd(prior_strength=0.0), "Invalid prior_strength: 0.0"),
    (lambda: pj.vsgd(kappa1=0.5), r"Invalid kappa1: 0.5 \(must be in \(0.5, 1.0\]\)"),
    (lambda: pj.vsgd(kappa2=1.5), "Invalid kappa2: 1.5"),
    (lambda: pj.vsgd(eps=-1.0), "Invalid eps: -1.0"),
    (lambda: pj.vsgd(weight_decay=-0.1), "Invalid weight_decay: -0.1"),
    (lambda: pj.vsgd(nonfinite="warn"), "Invalid nonfinite policy: 'warn'"),
    (lambda: pj.constant_vsgd(prior_variance=0.0), "Invalid prior_variance: 0.0"),
    (lambda: pj.constant_vsgd(learning_rate=float("nan")), "Invalid learning_rate: nan"),
]


@pytest.mark.parametrize("make, message", ERRORS)
def test_invalid_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_complex_parameters_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        pj.scale_by_vsgd().init(jnp.zeros(2, jnp.complex64))
