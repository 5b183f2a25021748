r"""VSGD as optax gradient transformations (Chen, Kuzina, Esmaeili & Tomczak, 2024).

The JAX twin of :class:`probopt.optim.VSGD`: :func:`scale_by_vsgd` is the closed-form SVI step
of the VSGD model (:mod:`probopt.jax.models.vsgd`, :mod:`probopt.models.vsgd`) turned into a
direction, and :func:`vsgd` chains it with decoupled weight decay and the learning rate, as
``optax.adamw`` does. Same algorithm, same argument names, same numbers: the test suite runs the
torch reference and this transform on one gradient sequence and compares parameters and state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from probopt.jax._base import (
    _nonfinite_doc,
    check_learning_rate,
    check_real_leaves,
    checked,
    is_zero,
    with_nonfinite_policy,
    zeros_like,
)
from probopt.optim._base import check_interval, check_positive

__all__ = ["JITTER", "ScaleByVSGDState", "scale_by_vsgd", "vsgd"]

#: The official code's jitter δ in the doubled Gamma shape (Note [probopt: the hard-coded jitter
#: δ] in :mod:`probopt.optim.vsgd`); it sets the scale of the first steps.
JITTER = 1e-4


class ScaleByVSGDState(NamedTuple):
    """State of :func:`scale_by_vsgd`: the variational parameters of every coordinate."""

    count: jax.Array
    """Shape (), int32: the step t (torch's per-parameter ``step``; here shared by all leaves,
    which always step together)."""
    mu: optax.Updates
    """μ_t, the posterior mean of the true gradient (torch ``mu``)."""
    b_g: optax.Updates
    """b_{t,g}, the Gamma rate of q(w_g), the precision of the true gradient's change."""
    b_ghat: optax.Updates
    """b_{t,ĝ}, the Gamma rate of q(w_ĝ), the precision of the observation noise."""
    variance: optax.Updates | None = None
    """σ_t², the posterior variance of the true gradient (``track_posterior`` only)."""
    beta: optax.Updates | None = None
    """β_t = v_ĝ / (v_g + v_ĝ), the learned momentum (``track_posterior`` only)."""


def _first_step_variances(prior_strength: float, variance_ratio: float) -> tuple[float, float]:
    """1/E[w_g], 1/E[w_ĝ] under the prior Gamma(γ + δ/2, γ), Gamma(γ + δ/2, K_g γ)."""
    a0 = prior_strength + JITTER / 2
    return prior_strength / a0, variance_ratio * prior_strength / a0


def _shape(prior_strength: float) -> float:
    """The Gamma shape a_t = γ + 1/2 (+ δ/2) of q(w_g) and q(w_ĝ) for every t ≥ 1."""
    return (2 * prior_strength + 1 + JITTER) / 2


def _check_hyper(
    variance_ratio: float, prior_strength: float, kappa1: float, kappa2: float, eps: float
) -> tuple[Any, ...]:
    return (
        checked(check_positive, "variance_ratio", variance_ratio),
        checked(check_positive, "prior_strength", prior_strength),
        checked(check_interval, "kappa1", kappa1, 0.5, 1.0, closed="(]"),
        checked(check_interval, "kappa2", kappa2, 0.5, 1.0, closed="(]"),
        checked(check_positive, "eps", eps, allow_zero=True),
    )


#: The values of ``implementation`` (:func:`scale_by_vsgd`).
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "ffi")

_implementation_doc = r"""implementation: how each leaf's state update is computed.
            ``"xla"``: the jnp code of this module (the readable reference). ``"ffi"``: one
            fused C++ loop per leaf that updates μ, b_g and b_ĝ in place (an XLA FFI custom
            call; CPU backend, float32 and float64 leaves, not with ``track_posterior``;
            compiled on first use, see :mod:`probopt.jax._ffi_cpu`); a leaf it cannot handle
            raises. ``"auto"``: ``"ffi"`` where it applies (traced on the CPU backend, the
            kernel builds, the leaf and its gradient are float32 or float64,
            ``track_posterior=False``; ``PROBOPT_NO_CPU_KERNELS=1`` switches it off), else
            ``"xla"``. Why: XLA's CPU backend compiles the jnp code into one loop per output,
            materialises the gain and copies the donated state buffers, about three times the
            memory traffic of one fused pass; the ``jax-vsgd`` section of docs/benchmarks.md
            has the measured step times. The two agree to rounding (1e-12 relative in float64
            in the tests). (default: ``"auto"``)"""


def _check_implementation(implementation: str, track_posterior: bool) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Invalid implementation: {implementation!r} (choose one of "
            f"{', '.join(map(repr, IMPLEMENTATIONS))})"
        )
    if implementation == "ffi" and track_posterior:
        raise ValueError(
            "Invalid implementation: 'ffi' with track_posterior=True (the kernel does not "
            "write σ² and β; use 'auto' or 'xla')"
        )


def _kernel_for(implementation: str, g: jax.Array, mu: jax.Array, track_posterior: bool) -> Any:
    """The FFI kernel for this leaf, or None for the XLA path (decided at trace time)."""
    if implementation == "xla" or track_posterior:
        return None
    fits = mu.dtype in (jnp.float32, jnp.float64) and g.dtype == mu.dtype
    on_cpu = jax.default_backend() == "cpu"
    if implementation == "auto" and not (fits and on_cpu):
        return None
    from probopt.jax._ffi_cpu import vsgd_kernel

    kernel = vsgd_kernel()
    if implementation == "ffi":
        if not on_cpu:
            raise RuntimeError(
                f"implementation='ffi' runs on the CPU backend only (the default backend is "
                f"{jax.default_backend()!r}); use 'auto' or 'xla'"
            )
        if not fits:
            raise TypeError(
                f"implementation='ffi' takes float32 and float64 leaves only (got a leaf of "
                f"dtype {mu.dtype} with a gradient of dtype {g.dtype}); use 'auto' or 'xla'"
            )
        if kernel is None:
            raise RuntimeError(
                "implementation='ffi': the VSGD kernel could not be built (no C++ compiler, a "
                "failed build or PROBOPT_NO_CPU_KERNELS=1; the log of probopt.jax._ffi_cpu says "
                "which); use 'auto' or 'xla'"
            )
    return kernel


def scale_by_vsgd(
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    kappa1: float = 0.81,
    kappa2: float = 0.9,
    eps: float = 1e-8,
    *,
    track_posterior: bool = False,
    nonfinite: str = "skip",
    implementation: str = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by VSGD's posterior of the true gradient.

    The model, per coordinate (:mod:`probopt.jax.models.vsgd`):

    .. math::
        w_g \sim \mathrm{Gamma}(\gamma, \gamma), \quad
        w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g \gamma), \quad
        g_t \sim \mathcal{N}(\mu_{t-1}, w_g^{-1}), \quad
        \hat g_t \sim \mathcal{N}(g_t, w_{\hat g}^{-1}),

    with the mean-field guide :math:`\mathcal{N}(\mu_t, \sigma_t^2)\,
    \mathrm{Gamma}(a, b_{t,g})\,\mathrm{Gamma}(a, b_{t,\hat g})`. Let :math:`K_g` be
    ``variance_ratio``, :math:`\gamma` ``prior_strength``, :math:`\kappa_1, \kappa_2`
    ``kappa1, kappa2``, :math:`\epsilon` ``eps`` and :math:`\delta = 10^{-4}` (:data:`JITTER`):

    .. math::
        \begin{aligned}
        &\textbf{initialize}: \mu_0, b_{0,g}, b_{0,\hat g} \leftarrow 0, \;
            a \leftarrow \gamma + \tfrac12 + \tfrac\delta2 \\
        &\textbf{for}\: t = 1, 2, \ldots \:\textbf{do} \\
        &\quad \textbf{if}\: t = 1: \; v_g \leftarrow \gamma / (\gamma + \delta/2), \;
            v_{\hat g} \leftarrow K_g\gamma / (\gamma + \delta/2) \\
        &\quad \textbf{else}: \; v_g \leftarrow b_{t-1,g} / a, \;
            v_{\hat g} \leftarrow b_{t-1,\hat g} / a \\
        &\quad \sigma_t^2 \leftarrow v_g v_{\hat g} / (v_g + v_{\hat g}), \quad
            \mu_t \leftarrow (v_{\hat g}\mu_{t-1} + v_g \hat g_t) / (v_g + v_{\hat g}) \\
        &\quad \rho_1 \leftarrow t^{-\kappa_1}, \; \rho_2 \leftarrow t^{-\kappa_2} \\
        &\quad b_{t,g} \leftarrow (1-\rho_1) b_{t-1,g}
            + \rho_1 \big(\gamma + \tfrac12(\sigma_t^2 + (\mu_t - \mu_{t-1})^2)\big) \\
        &\quad b_{t,\hat g} \leftarrow (1-\rho_2) b_{t-1,\hat g}
            + \rho_2 \big(K_g\gamma + \tfrac12(\sigma_t^2 + (\mu_t - \hat g_t)^2)\big) \\
        &\quad u_t \leftarrow \mu_t / (\sqrt{\mu_t^2 + \sigma_t^2} + \epsilon) \\
        &\textbf{return}\: u_t
        \end{aligned}

    The output is a direction (|u| < 1); chain a learning rate, or use :func:`vsgd`.

    Args:
        variance_ratio: K_g, the prior ratio Var(ĝ_t − g_t) / Var(g_t − g_{t−1}) (``ghattg``
            in the official code). (default: 30.0)
        prior_strength: γ > 0, the strength of the Gamma priors (``ps``). (default: 1e-8)
        kappa1: κ₁ in (0.5, 1], the decay of the SVI step for w_g (``tau1``). (default: 0.81)
        kappa2: κ₂ in (0.5, 1], the decay of the SVI step for w_ĝ (``tau2``). (default: 0.9)
        eps: ε, added outside the square root. (default: 1e-8)
        track_posterior: also keep σ_t² and β_t in the state. (default: False)
        {nonfinite}
        {implementation}

    Returns:
        A :class:`optax.GradientTransformationExtraArgs`; its state is
        :class:`ScaleByVSGDState` (inside a :class:`~probopt.jax.SkipNonFiniteState` with
        ``nonfinite="skip"``; ``optax.tree_utils.tree_get(state, "mu")`` reaches the fields).

    .. note::
        The implementation computes the same quantities in the gain form of torch's foreach
        path, :math:`k = b_{t-1,g}/(b_{t-1,g} + b_{t-1,\hat g})`,
        :math:`\mu_t = \mu_{t-1} + k(\hat g_t - \mu_{t-1})`,
        :math:`\sigma_t^2 = k\,b_{t-1,\hat g}/a` (equal in exact arithmetic; the tests compare
        it with the torch reference in float64).

    .. note::
        As in :class:`probopt.optim.VSGD` (all from the official code, github.com/
        generativeai-tue/vsgd): the jitter δ in the Gamma shape, ε outside the square root, the
        rate updates written as squared differences. One difference from torch: the step
        counter is shared by all leaves, since an optax transform always receives a gradient
        for every leaf (torch keeps one per parameter because a parameter may have no
        ``.grad``). Statistics of float16/bfloat16 leaves are kept in float32.

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep
        Neural Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (TMLR 2025).

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_vsgd(nonfinite="ignore")
        >>> state = tx.init(jnp.zeros(3))
        >>> u, state = tx.update(jnp.array([1.0, -2.0, 0.5]), state)
        >>> state.mu  # the first step shrinks the observation by 1 / (1 + K_g)
        Array([ 0.03225806, -0.06451613,  0.01612903], dtype=float32)
    """
    k_g, gamma, kappa1, kappa2, eps = _check_hyper(
        variance_ratio, prior_strength, kappa1, kappa2, eps
    )
    _check_implementation(implementation, track_posterior)
    a = _shape(gamma)
    v_g0, v_h0 = _first_step_variances(gamma, k_g)
    k0, sigma2_0 = v_g0 / (v_g0 + v_h0), v_g0 * v_h0 / (v_g0 + v_h0)

    def init_fn(params: optax.Params) -> ScaleByVSGDState:
        check_real_leaves("scale_by_vsgd", params)

        def fresh() -> optax.Updates:
            return zeros_like(params, half_in_float32=True)

        return ScaleByVSGDState(
            count=jnp.zeros([], jnp.int32),
            mu=fresh(),
            b_g=fresh(),
            b_ghat=fresh(),
            variance=fresh() if track_posterior else None,
            beta=fresh() if track_posterior else None,
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByVSGDState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByVSGDState]:
        del params, extra_args
        count = optax.safe_increment(state.count)
        first = count == 1
        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        b_gs = treedef.flatten_up_to(state.b_g)
        b_hs = treedef.flatten_up_to(state.b_ghat)
        outs = [[] for _ in range(6)]
        for g, mu, b_g, b_h in zip(grads, mus, b_gs, b_hs):
            dt = mu.dtype
            t = count.astype(dt)
            rho1, rho2 = t**-kappa1, t**-kappa2
            kernel = _kernel_for(implementation, g, mu, track_posterior)
            if kernel is not None:
                # Note [probopt: the VSGD FFI kernel] (probopt/_kernels/vsgd_xla_ffi.cc): the
                # lines below in one loop, in place on the state buffers.
                scalars = [rho1, rho2, first, k0, sigma2_0, 1 / a, gamma, k_g * gamma, eps]
                scalars = jnp.stack([jnp.asarray(x).astype(dt) for x in scalars])
                for out, x in zip(outs, (*kernel(g, mu, b_g, b_h, scalars), None, None)):
                    out.append(x)
                continue
            ghat = g.astype(dt)
            # Note [probopt: the gain form]: with v = b/a the posterior update reads
            # k = v_g/(v_g + v_ĝ) = b_g/(b_g + b_ĝ), μ_t = μ_{t-1} + k r (r = ĝ − μ_{t-1}) and
            # σ_t² = k b_ĝ / a: one division per element instead of five (the same algebra as
            # torch's foreach path). On CPU, XLA still materialises k and copies μ and b_ĝ
            # before the donated buffers are overwritten (measured in bench_jax_vsgd.py), which
            # is why "auto" takes the FFI kernel above there.
            k = jnp.where(first, jnp.asarray(k0, dt), b_g / (b_g + b_h))
            sigma2 = jnp.where(first, jnp.asarray(sigma2_0, dt), k * b_h * (1 / a))
            r = ghat - mu
            dmu = k * r
            mu_new = mu + dmu
            miss = ghat - mu_new
            b_g_new = b_g * (1 - rho1) + rho1 * (gamma + 0.5 * (sigma2 + dmu * dmu))
            b_h_new = b_h * (1 - rho2) + rho2 * (k_g * gamma + 0.5 * (sigma2 + miss * miss))
            u = mu_new / (jnp.sqrt(mu_new * mu_new + sigma2) + eps)
            for out, x in zip(outs, (u.astype(g.dtype), mu_new, b_g_new, b_h_new, sigma2, 1 - k)):
                out.append(x)
        u, mu, b_g, b_h, variance, beta = (treedef.unflatten(x) for x in outs)
        new_state = ScaleByVSGDState(
            count=count,
            mu=mu,
            b_g=b_g,
            b_ghat=b_h,
            variance=variance if track_posterior else None,
            beta=beta if track_posterior else None,
        )
        return u, new_state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return with_nonfinite_policy(tx, nonfinite)


def vsgd(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    variance_ratio: float = 30.0,
    prior_strength: float = 1e-8,
    kappa1: float = 0.81,
    kappa2: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    mask: Any = None,
    track_posterior: bool = False,
    nonfinite: str = "skip",
    implementation: str = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Variational stochastic gradient descent (VSGD), the optax optimizer.

    :func:`scale_by_vsgd` chained with decoupled weight decay and the learning rate η:

    .. math::
        \theta_t = \theta_{t-1} - \eta\,\big(u_t + \lambda\,\theta_{t-1}\big)
        = \theta_{t-1}(1 - \eta\lambda) - \eta\,\frac{\mu_t}{\sqrt{\mu_t^2 + \sigma_t^2}
        + \epsilon},

    which is :class:`probopt.optim.VSGD`'s step (decay first, with the current η). With
    ``nonfinite="skip"`` the whole chain is wrapped by :func:`~probopt.jax.skip_nonfinite`, so a
    bad step changes neither the parameters nor any state.

    Args:
        learning_rate: η, a number or an optax schedule. (default: 0.1)
        variance_ratio, prior_strength, kappa1, kappa2, eps, track_posterior,
            implementation: as in :func:`scale_by_vsgd`.
        weight_decay: λ, decoupled (AdamW-style) weight decay. (default: 0)
        mask: which leaves weight decay applies to, as in ``optax.adamw``. (default: all)
        {nonfinite}

    Returns:
        A :class:`optax.GradientTransformationExtraArgs`.

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep
        Neural Networks <https://arxiv.org/abs/2404.06549>`_, 2024 (TMLR 2025).

    .. seealso:: :func:`probopt.jax.constant_vsgd`; :class:`probopt.optim.VSGD`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> x = jnp.array([1.0, -2.0])
        >>> tx = vsgd(learning_rate=0.1)
        >>> state = tx.init(x)
        >>> for _ in range(5):
        ...     loss, g = jax.value_and_grad(lambda x: (x**2).sum())(x)
        ...     u, state = tx.update(g, state, x)
        ...     x = optax.apply_updates(x, u)
        ...     print(f"{loss:.4f}")
        5.0000
        4.4262
        4.0360
        3.6607
        3.3014
    """
    check_learning_rate(learning_rate)
    weight_decay = checked(check_positive, "weight_decay", weight_decay, allow_zero=True)
    decay = (
        optax.identity() if is_zero(weight_decay) else optax.add_decayed_weights(weight_decay, mask)
    )
    tx = optax.chain(
        scale_by_vsgd(
            variance_ratio, prior_strength, kappa1, kappa2, eps,
            track_posterior=track_posterior, nonfinite="ignore", implementation=implementation,
        ),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )  # fmt: skip
    return with_nonfinite_policy(tx, nonfinite)


for _f in (scale_by_vsgd, vsgd):
    _f.__doc__ = _f.__doc__.replace("{nonfinite}", _nonfinite_doc).replace(
        "{implementation}", _implementation_doc
    )
