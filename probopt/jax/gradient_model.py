r"""A user's NumPyro model of the gradient turned into an optax transformation.

The JAX twin of :class:`probopt.optim.GradientModelOptimizer`: the generic model -> step path.
At every step the observed gradient of each leaf is conditioned on, the guide's parameters are
updated by stochastic variational inference (a few Adam steps on the ELBO, then a Robbins–Monro
blend of the global parameters), and the posterior moments of the true gradient are turned into
a direction by a rule. :func:`probopt.jax.vsgd` does this in closed form for one model; here any
model and guide work, at the cost of 2K ELBO evaluations per leaf and step. Everything is written
with ``lax`` loops, so the update runs under ``jax.jit`` and ``lax.scan``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from probopt._optional import require
from probopt.jax._base import (
    _nonfinite_doc,
    all_finite,
    check_learning_rate,
    check_real_leaves,
    checked,
    is_zero,
    state_dtype,
    with_nonfinite_policy,
)
from probopt.optim._base import check_interval, check_positive

__all__ = ["RULES", "ScaleByGradientModelState", "gradient_model", "scale_by_gradient_model"]

Array = jax.Array
Rule = Callable[[Array, Array, float], Array]


def _normalized(mean: Array, variance: Array, eps: float) -> Array:
    return mean / (jnp.sqrt(mean**2 + variance) + eps)


def _mean(mean: Array, variance: Array, eps: float) -> Array:
    del variance, eps
    return mean


def _snr(mean: Array, variance: Array, eps: float) -> Array:
    return mean * mean**2 / (mean**2 + variance + eps)


#: The rules of :data:`probopt.optim.gradient_model.RULES` (same names, same formulas), in jnp.
RULES: dict[str, Rule] = {
    "normalized": _normalized,  # d = m / (sqrt(m² + v) + ε)
    "mean": _mean,  # d = m
    "snr": _snr,  # d = m · m² / (m² + v + ε)
}

_DEFAULT_KAPPA = 0.9  # κ of a global parameter missing from a ``kappa`` dict (as in torch)
_MOMENT_DRAWS = 256  # draws of the site when its distribution has no closed-form moments


class ScaleByGradientModelState(NamedTuple):
    """State of :func:`scale_by_gradient_model`."""

    count: Array
    """Shape (), int32: the number of steps taken (torch's per-parameter ``step``)."""
    key: Array
    """The PRNG key of the next step (a raw ``uint32[2]`` key of ``jax.random.PRNGKey``)."""
    mean: optax.Updates
    """m_t, the posterior mean of the true gradient, shaped like the parameters; flattened, it is
    the ``prev_mean`` the model and guide receive at the next step (torch ``prev_mean``)."""
    variance: optax.Updates
    """v_t, the posterior variance of the true gradient, shaped like the parameters."""
    guide_params: Any
    """Per leaf, a dict from global guide parameter name to its constrained value λ_t (torch's
    per-parameter ``param_store`` minus the local parameters)."""


def _numpyro() -> Any:
    """NumPyro, imported on first use (``import probopt.jax`` does not import it)."""
    return require("numpyro", "the generic model -> step path (probopt.jax.gradient_model)")


def _guide_trace(guide: Callable[..., Any], key: Array, data: Mapping[str, Array], *args: Any,
                 **kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """The guide's trace with ``data`` substituted for its parameters."""
    handlers = _numpyro().handlers
    seeded = handlers.seed(handlers.substitute(guide, data=dict(data)), key)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


def _params_of(trace: Mapping[str, Any]) -> dict[str, tuple[Array, Any]]:
    """Parameter name -> (value, constraint) of a trace (no ``constraint`` kwarg means real)."""
    real = _numpyro().distributions.constraints.real
    return {
        name: (site["value"], site["kwargs"].get("constraint", real))
        for name, site in trace.items()
        if site["type"] == "param"
    }


def _adam_fit(
    loss: Callable[[dict[str, Array], Array], Array],
    start: dict[str, Array],
    lrs: dict[str, Any],
    key: Array,
    steps: int,
) -> dict[str, Array]:
    """K Adam steps on ``loss(params, key)`` from ``start``, per-element learning rates decaying
    100-fold over the fit (torch ``_fit``). A step whose loss or gradient is not finite is not
    taken and ends the fit, so a fit never leaves NaN in the guide."""
    if not start:
        return start
    b1, b2, eps = 0.9, 0.999, 1e-12
    decay = 0.01 ** (1.0 / max(steps - 1, 1))
    value_and_grad = jax.value_and_grad(loss)

    def body(k: Array, carry: Any) -> Any:
        params, m, v, done = carry
        value, grads = value_and_grad(params, jax.random.fold_in(key, k))
        done = done | ~(jnp.isfinite(value) & all_finite(grads))
        new_m = jax.tree.map(lambda mk, g: b1 * mk + (1 - b1) * g, m, grads)
        new_v = jax.tree.map(lambda vk, g: b2 * vk + (1 - b2) * g * g, v, grads)

        def move(p: Array, mk: Array, vk: Array, lr: Any) -> Array:
            n = (k + 1).astype(p.dtype)
            step = (mk / (1 - b1**n)) / (jnp.sqrt(vk / (1 - b2**n)) + eps)
            return p - step * (lr * jnp.asarray(decay, p.dtype) ** k.astype(p.dtype))

        new_params = {n: move(params[n], new_m[n], new_v[n], lrs[n]) for n in params}
        keep = lambda new, old: jnp.where(done, old, new)  # noqa: E731
        return (*jax.tree.map(keep, (new_params, new_m, new_v), (params, m, v)), done)

    zeros = jax.tree.map(jnp.zeros_like, start)
    carry = (start, zeros, zeros, jnp.array(False))
    return jax.lax.fori_loop(0, steps, body, carry)[0]


def scale_by_gradient_model(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *,
    local_params: tuple[str, ...] = ("g_loc", "g_scale"),
    site: str = "g",
    rule: str | Rule = "normalized",
    svi_steps: int = 50,
    svi_lr: float = 0.3,
    num_particles: int = 64,
    kappa: float | Mapping[str, float] = 0.9,
    eps: float = 1e-8,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""The direction of a user's NumPyro gradient model, fitted by SVI at every step.

    ``model`` is a generative model of one step's observed gradient and ``guide`` its guide,
    both NumPyro programs over the flattened coordinates of one leaf (a plate of size
    ``g_hat.shape[-1]`` at ``dim=-1``), with the signature of the torch twin's::

        model(g_hat, prev_mean, **model_kwargs)   # observes g_hat at some site
        guide(g_hat, prev_mean, **model_kwargs)   # q of the latents; ``site``: true gradient

    :mod:`probopt.jax.models.vsgd` (``model``, ``guide``) is the worked example. Guide
    parameters named in ``local_params`` belong to this step's local latent (the true gradient)
    and start afresh from the guide's initial values at every step; every other guide parameter
    is global, persists across steps (per leaf, in the state) and starts from the guide's
    initial values at the first step. Per leaf and step t = 1, 2, ...:

    .. code-block:: text

        ĝ <- g.flatten();  μ <- m_{t-1}.flatten()                # prev_mean (zeros at t = 1)
        L(φ, λ) = TraceMeanField_ELBO(num_particles) loss of model/guide at (ĝ, μ)
        local:  φ_t <- K Adam steps on L(·, λ_{t-1}) from the guide's initial φ
        global: λ̂_t <- K Adam steps on L(φ_t, ·) from λ_{t-1}
                λ_t <- (1 - ρ_t) λ_{t-1} + ρ_t λ̂_t,   ρ_t = t^-κ   (constrained values)
        (m_t, v_t) <- mean and variance of q(site) under (φ_t, λ_t)
        return r(m_t, v_t, ε)                                 # the direction, leaf's shape

    Adam works on the unconstrained parameters (``biject_to`` of each parameter's
    constraint), with learning rate ``svi_lr`` decayed 100-fold over a fit; real-valued
    parameters of the gradient's shape move in units of the innovation |ĝ − μ| (floored at
    1 % of its RMS), other real ones in units of that RMS (Note [probopt: fit learning rates]
    in :mod:`probopt.optim.gradient_model`). A fit step whose loss or gradient is not finite is
    not taken and ends the fit. For guides parametrised by an exponential family's natural or
    mean parameters (Gamma shape and rate, a Normal's mean) the blend is exactly the
    natural-gradient step of stochastic variational inference (Hoffman et al. 2013), the step
    :func:`probopt.jax.scale_by_vsgd` takes in closed form; otherwise it is an approximation.

    Rules ``r`` (``rule``, :data:`RULES`): ``"normalized"`` m / (√(m² + v) + ε) (VSGD's),
    ``"mean"`` m, ``"snr"`` m·m²/(m² + v + ε), or a callable ``(m, v, eps) -> direction``.

    .. note::
        Departures from the torch twin: randomness comes from ``seed`` (one key in the state,
        split at every step) instead of the global torch seed, so the two backends agree in
        distribution, not draw for draw; the first step's global parameters come from the
        guide's initial values at that step's gradient, as in torch. There is no
        ``maximize`` (negate the gradient, as with every optax transform). Only the guide's
        parameters are learned; ``numpyro.param`` sites of the model keep their initial values.

    Args:
        model, guide: the NumPyro model and guide, as above.
        local_params: guide parameters re-initialised at every step.
            (default: ``("g_loc", "g_scale")``)
        site: the guide's sample site of the true gradient. (default: ``"g"``)
        rule: the posterior -> direction rule, a name in :data:`RULES` or a callable.
            (default: ``"normalized"``)
        svi_steps: K, Adam steps per fit (two fits per step). (default: 50)
        svi_lr: the fits' initial Adam learning rate. (default: 0.3)
        num_particles: ELBO particles (vectorised). (default: 64)
        kappa: κ in (0.5, 1] of ρ_t = t^-κ, or a dict from global parameter name to κ (missing
            names: 0.9). (default: 0.9)
        eps: ε of the rules. (default: 1e-8)
        seed: the seed of the state's PRNG key. (default: 0)
        model_kwargs: keyword arguments passed to model and guide (static, not traced).
        {nonfinite}

    Returns:
        A :class:`optax.GradientTransformationExtraArgs` with
        :class:`ScaleByGradientModelState` (inside :class:`~probopt.jax.SkipNonFiniteState` for
        ``nonfinite="skip"``).

    .. warning::
        The direction is only as good as the fits: with few ``svi_steps`` or ``num_particles``
        the local fit stops short of the ELBO optimum and (m_t, v_t) stay near the guide's
        initialisation. Compare ``state.mean`` and ``state.variance`` with a long fit (or a
        closed form) on a few recorded gradients before trusting small values.

    References:
        Hoffman, Blei, Wang & Paisley, `Stochastic Variational Inference
        <https://jmlr.org/papers/v14/hoffman13a.html>`_, JMLR 2013.
    """
    if not callable(model) or not callable(guide):
        raise TypeError("model and guide must be callables (NumPyro programs)")
    numpyro = _numpyro()
    biject_to, real = numpyro.distributions.biject_to, numpyro.distributions.constraints.real
    if isinstance(rule, str) and rule not in RULES:
        raise ValueError(f"Invalid rule: {rule!r} (choose one of {', '.join(RULES)})")
    if not isinstance(svi_steps, int) or svi_steps < 1:
        raise ValueError(f"Invalid svi_steps: {svi_steps!r} (must be an integer >= 1)")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"Invalid num_particles: {num_particles!r} (must be >= 1)")
    svi_lr = checked(check_positive, "svi_lr", svi_lr)
    for k in kappa.values() if isinstance(kappa, Mapping) else [kappa]:
        checked(check_interval, "kappa", k, 0.5, 1.0, closed="(]")
    eps = checked(check_positive, "eps", eps, allow_zero=True)
    rule_fn = RULES[rule] if isinstance(rule, str) else rule
    local_names = tuple(local_params)
    kwargs = dict(model_kwargs or {})
    elbo = numpyro.infer.TraceMeanField_ELBO(num_particles=num_particles)

    def kappa_of(name: str) -> float:
        if isinstance(kappa, Mapping):
            return kappa.get(name, _DEFAULT_KAPPA)
        return kappa

    def initial(g_hat: Array, prev: Array, key: Array) -> dict[str, tuple[Array, Any]]:
        """The guide's parameters at their initial values for (ĝ, μ), checked."""
        trace = _guide_trace(guide, key, {}, g_hat, prev, **kwargs)
        params = _params_of(trace)
        missing = [n for n in local_names if n not in params]
        if missing:
            raise ValueError(f"the guide registers no parameter named {missing}")
        if site not in trace or trace[site]["type"] != "sample":
            raise ValueError(f"the guide has no sample site named {site!r}")
        return params

    def init_fn(params: optax.Params) -> ScaleByGradientModelState:
        check_real_leaves("scale_by_gradient_model", params)

        def guide_globals(p: Array) -> dict[str, Array]:
            flat = jnp.zeros([jnp.size(p)], state_dtype(jnp.result_type(p)))
            found = initial(flat, flat, jax.random.PRNGKey(0))
            return {n: jnp.asarray(v) for n, (v, _) in found.items() if n not in local_names}

        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), state_dtype(p.dtype)), params)
        return ScaleByGradientModelState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(seed),
            mean=zeros,
            variance=zeros,
            guide_params=jax.tree.map(guide_globals, params),
        )

    def posterior(g: Array, mean: Array, old_globals: dict[str, Array], first: Array,
                  t: Array, key: Array) -> tuple[Array, Array, dict[str, Array]]:  # fmt: skip
        """One leaf's step: the two fits, the blend and the posterior moments."""
        dt = mean.dtype
        g_hat, prev = g.reshape(-1).astype(dt), mean.reshape(-1)
        key_init, key_local, key_global, key_moments = jax.random.split(key, 4)
        fresh = initial(g_hat, prev, key_init)
        constraint = {n: c for n, (_, c) in fresh.items()}
        bijections = {n: biject_to(c) for n, c in constraint.items()}
        # λ_{t-1}; at t = 1 the guide's initial values at this gradient (torch creates them then)
        lam = {n: jnp.where(first, fresh[n][0], old_globals[n]).astype(old_globals[n].dtype)
               for n in old_globals}  # fmt: skip

        # Note [probopt: fit learning rates] (torch twin): real-valued parameters of the
        # gradient's shape move in units of each coordinate's innovation |ĝ - μ| (floored at
        # 1 % of its RMS); constrained ones are fitted in unconstrained (log) space.
        innovation = jnp.abs(g_hat - prev)
        rms = jnp.sqrt(jnp.mean(innovation**2))
        rms = jnp.where(rms > 0, rms, jnp.ones_like(rms))
        unit = jnp.maximum(innovation, 0.01 * rms)

        def lr(name: str) -> Any:
            value = fresh[name][0]
            if constraint[name] is not real:
                return svi_lr
            if jnp.shape(value) == unit.shape:
                return svi_lr * unit
            return svi_lr * rms

        def constrain(unconstrained: dict[str, Array]) -> dict[str, Array]:
            return {n: bijections[n](u) for n, u in unconstrained.items()}

        def unconstrain(values: dict[str, Array]) -> dict[str, Array]:
            return {n: bijections[n].inv(v) for n, v in values.items()}

        def elbo_loss(values: dict[str, Array], key: Array) -> Array:
            return elbo.loss(key, values, model, guide, g_hat, prev, **kwargs)

        # 1. local step: fit q(local) from a fresh start with the globals held at λ_{t-1}
        start = unconstrain({n: jnp.asarray(fresh[n][0], dt) for n in local_names})
        fixed = jax.lax.stop_gradient(lam)
        local_u = _adam_fit(
            lambda u, k: elbo_loss({**fixed, **constrain(u)}, k),
            start, {n: lr(n) for n in local_names}, key_local, svi_steps,
        )  # fmt: skip
        local = jax.lax.stop_gradient(constrain(local_u))
        # 2. global step: fit λ̂_t from λ_{t-1} given q(local), then blend with ρ_t = t^-κ
        global_u = _adam_fit(
            lambda u, k: elbo_loss({**local, **constrain(u)}, k),
            unconstrain(lam), {n: lr(n) for n in lam}, key_global, svi_steps,
        )  # fmt: skip
        fitted = constrain(global_u)
        new_globals = {}
        for n, old in lam.items():
            rho = t.astype(old.dtype) ** -kappa_of(n)
            new_globals[n] = (old + rho * (fitted[n] - old)).astype(old.dtype)
        # 3. the posterior moments of the true gradient under (φ_t, λ_t)
        final = _guide_trace(guide, key_moments, {**local, **new_globals}, g_hat, prev, **kwargs)
        fn = final[site]["fn"]
        try:
            m, v = fn.mean, fn.variance
        except NotImplementedError:
            draws = fn.sample(key_moments, (_MOMENT_DRAWS,))
            m, v = jnp.mean(draws, 0), jnp.var(draws, 0, ddof=1)
        m = jnp.broadcast_to(m, g_hat.shape).astype(dt)
        v = jnp.broadcast_to(v, g_hat.shape).astype(dt)
        return m.reshape(mean.shape), v.reshape(mean.shape), new_globals

    def update_fn(
        updates: optax.Updates,
        state: ScaleByGradientModelState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByGradientModelState]:
        del params, extra_args
        first = state.count == 0
        count = optax.safe_increment(state.count)
        key, step_key = jax.random.split(state.key)
        grads, treedef = jax.tree.flatten(updates)
        means = treedef.flatten_up_to(state.mean)
        globals_ = treedef.flatten_up_to(state.guide_params)
        outs: tuple[list[Any], ...] = ([], [], [], [])
        for i, (g, mean, lam) in enumerate(zip(grads, means, globals_)):
            leaf_key = jax.random.fold_in(step_key, i)
            m, v, new_lam = posterior(g, mean, lam, first, count, leaf_key)
            direction = rule_fn(m, v, eps).astype(jnp.result_type(g))
            for out, x in zip(outs, (direction, m, v, new_lam)):
                out.append(x)
        u, mean, variance, guide_params = (treedef.unflatten(x) for x in outs)
        return u, ScaleByGradientModelState(count, key, mean, variance, guide_params)

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return with_nonfinite_policy(tx, nonfinite)


def gradient_model(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    model: Callable[..., Any] | None = None,
    guide: Callable[..., Any] | None = None,
    *,
    local_params: tuple[str, ...] = ("g_loc", "g_scale"),
    site: str = "g",
    rule: str | Rule = "normalized",
    svi_steps: int = 50,
    svi_lr: float = 0.3,
    num_particles: int = 64,
    kappa: float | Mapping[str, float] = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""The optimizer of a user's NumPyro gradient model (:class:`GradientModelOptimizer`'s twin).

    :func:`scale_by_gradient_model` chained with decoupled weight decay and the learning rate η,
    as :func:`probopt.jax.vsgd` does:
    θ_t = θ_{t-1}(1 − ηλ) − η r(m_t, v_t), the torch optimizer's step.

    Args:
        learning_rate: η, a number or an optax schedule. (default: 0.01)
        model, guide: the NumPyro model and guide (required; keyword or positional after η).
        local_params, site, rule, svi_steps, svi_lr, num_particles, kappa, eps, seed,
            model_kwargs: as in :func:`scale_by_gradient_model`.
        weight_decay: λ, decoupled (AdamW-style) weight decay. (default: 0)
        mask: which leaves weight decay applies to, as in ``optax.adamw``. (default: all)
        {nonfinite}

    Returns:
        A :class:`optax.GradientTransformationExtraArgs`.

    References:
        Hoffman, Blei, Wang & Paisley, `Stochastic Variational Inference
        <https://jmlr.org/papers/v14/hoffman13a.html>`_, JMLR 2013.

    .. seealso:: :class:`probopt.optim.GradientModelOptimizer`; :func:`probopt.jax.vsgd`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import probopt.jax.models.vsgd as m
        >>> x = jnp.array([1.0, -2.0])
        >>> tx = gradient_model(0.1, m.model, m.guide, svi_steps=5, num_particles=8)
        >>> state = tx.init(x)
        >>> update = jax.jit(tx.update)
        >>> for _ in range(3):
        ...     u, state = update(jax.grad(lambda x: (x**2).sum())(x), state, x)
        ...     x = optax.apply_updates(x, u)
        >>> bool((jnp.abs(x) < jnp.array([1.0, 2.0])).all())
        True
    """
    if model is None or guide is None:
        raise TypeError("model and guide must be callables (NumPyro programs)")
    check_learning_rate(learning_rate)
    weight_decay = checked(check_positive, "weight_decay", weight_decay, allow_zero=True)
    decay = (
        optax.identity() if is_zero(weight_decay) else optax.add_decayed_weights(weight_decay, mask)
    )
    tx = optax.chain(
        scale_by_gradient_model(
            model, guide, local_params=local_params, site=site, rule=rule, svi_steps=svi_steps,
            svi_lr=svi_lr, num_particles=num_particles, kappa=kappa, eps=eps, seed=seed,
            model_kwargs=model_kwargs, nonfinite="ignore",
        ),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )  # fmt: skip
    return with_nonfinite_policy(tx, nonfinite)


for _f in (scale_by_gradient_model, gradient_model):
    _f.__doc__ = _f.__doc__.replace("{nonfinite}", _nonfinite_doc)
