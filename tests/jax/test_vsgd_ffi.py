"""probopt.jax.scale_by_vsgd's fused CPU kernel (XLA FFI) against its XLA reference path."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from optax.tree_utils import tree_get  # noqa: E402

import probopt.jax as pj  # noqa: E402
from probopt.jax import _ffi_cpu  # noqa: E402

# a matrix, a vector, a 0-d leaf, an empty leaf, a 3-d leaf and one long enough (> 2^16 entries)
# to be cut into chunks for the thread pool
SHAPES = [(5, 3), (7,), (), (0,), (2, 2, 2), (70_000,)]
STEPS = 10


@pytest.fixture(autouse=True)
def _kernel():
    if jax.default_backend() != "cpu":
        pytest.skip("the VSGD FFI kernel is a CPU kernel")
    if _ffi_cpu.vsgd_kernel() is None:
        pytest.skip("the VSGD FFI kernel could not be built here (see the probopt log)")


def _grads(dtype, steps=STEPS, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [
        [jnp.asarray(rng.standard_normal(s) * 0.1 + 0.03, dtype) for s in shapes]
        for _ in range(steps)
    ]


def _run(implementation, dtype, stream, **kw):
    """Jitted updates over the stream: the list of directions and the final state."""
    tx = pj.scale_by_vsgd(nonfinite="ignore", implementation=implementation, **kw)
    state = tx.init([jnp.zeros(g.shape, dtype) for g in stream[0]])
    step = jax.jit(tx.update)
    us = []
    for g in stream:
        u, state = step(g, state)
        us.append(u)
    return us, state


def _assert_close(a, b, scale_rtol):
    """Every entry within ``scale_rtol`` times the largest magnitude of its leaf: entrywise
    relative error is unbounded where μ_t = μ_{t-1} + k r cancels to near zero, and one
    rounding there differs between the kernel and XLA's code (FMA contraction)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.size:
            np.testing.assert_allclose(y, x, rtol=0, atol=scale_rtol * np.abs(x).max())


def _uses_kernel(fn, *args):
    return _ffi_cpu.TARGET in jax.jit(fn).lower(*args).as_text()


def test_float64_matches_xla_path(x64):
    """Ten steps in float64: directions and state within 1e-12 of the XLA path (relative to each
    leaf's largest entry; measured 4e-15: the two differ only in FMA contraction)."""
    stream = _grads(jnp.float64)
    ref_u, ref_state = _run("xla", jnp.float64, stream)
    us, state = _run("ffi", jnp.float64, stream)
    _assert_close(ref_u, us, 1e-12)
    _assert_close(ref_state, state, 1e-12)
    assert int(state.count) == STEPS
    for leaf in jax.tree.leaves(state.mu):
        assert leaf.dtype == jnp.float64


def test_float32_matches_xla_path():
    """float32: within 1e-5 of the XLA path relative to each leaf's largest entry after ten
    steps (FMA contraction and the rounding of μ near zero differ; measured 2e-6)."""
    stream = _grads(jnp.float32)
    ref_u, ref_state = _run("xla", jnp.float32, stream)
    us, state = _run("ffi", jnp.float32, stream)
    _assert_close(ref_u, us, 1e-5)
    _assert_close(ref_state, state, 1e-5)


def test_auto_uses_the_kernel_and_xla_bypasses_it():
    grads = _grads(jnp.float32, steps=1)[0]
    for implementation, expected in [("auto", True), ("ffi", True), ("xla", False)]:
        tx = pj.vsgd(0.1, implementation=implementation)
        state = tx.init(grads)
        assert _uses_kernel(tx.update, grads, state, grads) is expected, implementation
    tx = pj.scale_by_vsgd(track_posterior=True)  # auto: σ² and β need the XLA path
    assert not _uses_kernel(tx.update, grads, tx.init(grads))


def test_auto_takes_xla_for_half_precision_leaves():
    grads = [jnp.ones(3, jnp.bfloat16), jnp.ones(2, jnp.float32)]
    tx = pj.scale_by_vsgd()
    text = jax.jit(tx.update).lower(grads, tx.init(grads)).as_text()
    assert text.count(_ffi_cpu.TARGET) == 1  # the float32 leaf only


def test_under_lax_scan_like_the_xla_loop(x64):
    """The kernel inside lax.scan, against the XLA path in a Python loop (1e-12 as above)."""
    stream = _grads(jnp.float64)
    ref_u, ref_state = _run("xla", jnp.float64, stream)
    tx = pj.vsgd(0.1, nonfinite="ignore", implementation="ffi")
    params = [jnp.zeros(s, jnp.float64) for s in SHAPES]
    stacked = [jnp.stack([gs[i] for gs in stream]) for i in range(len(SHAPES))]

    @jax.jit
    def run(params, state, stacked):
        def body(carry, g):
            params, state = carry
            u, state = tx.update(g, state, params)
            return (optax.apply_updates(params, u), state), u

        return jax.lax.scan(body, (params, state), stacked)

    (params, state), us = run(params, tx.init(params), stacked)
    assert _ffi_cpu.TARGET in run.lower(params, tx.init(params), stacked).as_text()
    _assert_close(ref_state, state[0], 1e-12)
    # the scan's update is the direction times -learning rate
    _assert_close([jnp.stack([u[i] for u in ref_u]) * -0.1 for i in range(len(SHAPES))], us, 1e-12)


def test_vmap_over_independent_problems(x64):
    """vmap_method="broadcast_all": one call over a batch, each problem with its own step count
    (so its own ρ₁, ρ₂ and first-step flag), equal to the XLA path problem by problem."""
    shapes = [(4, 3), (), (5,)]
    tx_ffi = pj.scale_by_vsgd(nonfinite="ignore", implementation="ffi")
    tx_xla = pj.scale_by_vsgd(nonfinite="ignore", implementation="xla")
    batch = 3
    rng = np.random.default_rng(1)
    grads = [jnp.asarray(rng.standard_normal((batch, *s)), jnp.float64) for s in shapes]
    # three problems, stepped 1, 2 and 4 times before the vmapped step
    states = []
    for b, warm in enumerate([1, 2, 4]):
        state = tx_xla.init([jnp.zeros(s, jnp.float64) for s in shapes])
        for w in range(warm):
            state = tx_xla.update([g[b] * (1 + w) for g in grads], state)[1]
        states.append(state)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    u, new = jax.jit(jax.vmap(tx_ffi.update))(grads, stacked)
    assert _ffi_cpu.TARGET in jax.jit(jax.vmap(tx_ffi.update)).lower(grads, stacked).as_text()
    for b, state in enumerate(states):
        ref_u, ref_state = tx_xla.update([g[b] for g in grads], state)
        _assert_close(ref_u, [x[b] for x in u], 1e-12)
        _assert_close(ref_state, jax.tree.map(lambda x, b=b: x[b], new), 1e-12)
    # an unbatched state with a batch of gradients: every problem starts from the same state
    u, new = jax.vmap(tx_ffi.update, in_axes=(0, None))(grads, states[0])
    ref_u, _ = tx_xla.update([g[2] for g in grads], states[0])
    _assert_close(ref_u, [x[2] for x in u], 1e-12)


def test_traced_hyperparameters(x64):
    """optax.inject_hyperparams traces every hyperparameter: they reach the kernel as data."""
    stream = _grads(jnp.float64, steps=4)
    outs = []
    for implementation in ("xla", "ffi"):
        tx = optax.inject_hyperparams(pj.vsgd)(
            learning_rate=0.05, variance_ratio=5.0, prior_strength=1e-6, kappa1=0.6,
            kappa2=1.0, eps=1e-3, nonfinite="ignore", implementation=implementation,
        )  # fmt: skip
        params = [jnp.ones(s, jnp.float64) for s in SHAPES]
        state = tx.init(params)
        step = jax.jit(tx.update)
        assert _uses_kernel(tx.update, stream[0], state, params) is (implementation == "ffi")
        for g in stream:
            u, state = step(g, state, params)
            params = optax.apply_updates(params, u)
        outs.append((params, tree_get(state, "b_ghat")))
    _assert_close(outs[0], outs[1], 1e-12)


def test_donated_state_is_updated_in_place_without_recompiling():
    """Donated parameters and state: no copy of a non-empty buffer in the compiled step, the old
    buffers are consumed,
    and the second step reuses the first compilation (state dtypes and shapes are stable)."""
    tx = pj.vsgd(0.1, nonfinite="ignore", implementation="ffi")
    params = [jnp.ones(s, jnp.float32) for s in SHAPES]
    state = tx.init(params)
    grads = _grads(jnp.float32, steps=2)

    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads[0]).compile().as_text()
    assert _ffi_cpu.TARGET in compiled
    copies = [line for line in compiled.splitlines() if " copy(" in line]
    assert all("f32[0]" in line for line in copies), copies  # only the empty leaf's constant
    old_mu = tree_get(state, "mu")
    params, state = step(params, state, grads[0])
    assert all(x.is_deleted() for x in jax.tree.leaves(old_mu) if x.size)
    structure = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    params, state = step(params, state, grads[1])
    assert step._cache_size() == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == structure
    assert int(state[0].count) == 2


def test_skip_policy_with_the_kernel_leaves_state_unchanged():
    """nonfinite="skip" around the in-place kernel: a NaN step changes nothing (XLA keeps a copy
    of the old state for the select)."""
    tx = pj.vsgd(0.1, implementation="ffi")
    params = [jnp.ones(s, jnp.float32) for s in SHAPES]
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    grads = _grads(jnp.float32, steps=2)
    _, state = step(grads[0], state, params)
    bad = [g.at[...].set(jnp.nan) if g.ndim == 1 and g.size else g for g in grads[1]]
    u, new = step(bad, state, params)
    for x, y in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new.inner_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert all(not np.asarray(x).any() for x in u)
    assert int(new.nonfinite_count) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"implementation": "fused"}, ValueError, "Invalid implementation: 'fused'"),
        ({"implementation": "ffi", "track_posterior": True}, ValueError, "track_posterior"),
    ],
)
def test_invalid_implementation(kwargs, error, message):
    for make in (pj.vsgd, pj.scale_by_vsgd):
        with pytest.raises(error, match=message):
            make(**kwargs)


def test_ffi_rejects_leaves_it_cannot_handle():
    tx = pj.scale_by_vsgd(implementation="ffi")
    grads = [jnp.ones(3, jnp.bfloat16)]
    with pytest.raises(TypeError, match="float32 and float64 leaves only"):
        tx.update(grads, tx.init(grads))


def test_environment_switch_disables_the_kernel(monkeypatch):
    monkeypatch.setenv("PROBOPT_NO_CPU_KERNELS", "1")
    assert _ffi_cpu.vsgd_kernel.__wrapped__() is None
