r"""Constant VSGD as optax gradient transformations: VSGD's strong-prior limit.

The JAX twin of :class:`probopt.optim.ConstantVSGD` (same argument names, same numbers).
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
from probopt.optim._base import check_positive

__all__ = ["ScaleByConstantVSGDState", "constant_vsgd", "scale_by_constant_vsgd"]


class ScaleByConstantVSGDState(NamedTuple):
    """State of :func:`scale_by_constant_vsgd`."""

    count: jax.Array
    """Shape (), int32: the number of steps taken."""
    mu: optax.Updates
    """μ_t, the posterior mean of the true gradient (a momentum with constant β)."""


def scale_by_constant_vsgd(
    variance_ratio: float = 30.0,
    prior_variance: float = 1.0,
    eps: float = 1e-8,
    *,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by Constant VSGD: VSGD with the noise precisions frozen at their priors.

    In the VSGD model let the prior strength γ → ∞: q(w_g), q(w_ĝ) stay at their priors,
    E[w_g] = 1/s² and E[w_ĝ] = 1/(K_g s²), and the posterior of the true gradient has a constant
    gain and variance. Let :math:`K_g` be ``variance_ratio``, :math:`s^2` ``prior_variance``
    and :math:`\epsilon` ``eps``:

    .. math::
        \begin{aligned}
        &\beta \leftarrow K_g / (1 + K_g), \quad \sigma^2 \leftarrow \beta s^2, \quad
            \mu_0 \leftarrow 0 \\
        &\textbf{for}\: t = 1, 2, \ldots \:\textbf{do} \\
        &\quad \mu_t \leftarrow \beta\,\mu_{t-1} + (1-\beta)\,\hat g_t \\
        &\quad u_t \leftarrow \mu_t / (\sqrt{\mu_t^2 + \sigma^2} + \epsilon)
        \end{aligned}

    With :math:`|\mu_t| \ll \sigma` this is SGD with dampened momentum and learning rate
    η/σ; with :math:`|\mu_t| \gg \sigma` sign descent on a momentum (see
    :class:`probopt.optim.ConstantVSGD` for the relations, all tested there).

    Args:
        variance_ratio: K_g; sets β = K_g/(1+K_g). (default: 30.0, β ≈ 0.968)
        prior_variance: s², the prior variance of the true gradient's change. (default: 1.0)
        eps: ε outside the square root. (default: 1e-8)
        {nonfinite}

    .. note::
        The paper's own definition of "Constant VSGD" was not available to us; this is the
        strong-prior limit of its model. ``prior_variance`` is ours.

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep
        Neural Networks <https://arxiv.org/abs/2404.06549>`_, 2024.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_constant_vsgd(variance_ratio=9.0, nonfinite="ignore")
        >>> state = tx.init(jnp.zeros(2))
        >>> u, state = tx.update(jnp.array([10.0, 0.0]), state)
        >>> state.mu
        Array([1., 0.], dtype=float32)
    """
    variance_ratio = checked(check_positive, "variance_ratio", variance_ratio)
    prior_variance = checked(check_positive, "prior_variance", prior_variance)
    eps = checked(check_positive, "eps", eps, allow_zero=True)
    beta = variance_ratio / (1.0 + variance_ratio)
    sigma2 = beta * prior_variance

    def init_fn(params: optax.Params) -> ScaleByConstantVSGDState:
        check_real_leaves("scale_by_constant_vsgd", params)
        return ScaleByConstantVSGDState(count=jnp.zeros([], jnp.int32), mu=zeros_like(params))

    def update_fn(
        updates: optax.Updates,
        state: ScaleByConstantVSGDState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByConstantVSGDState]:
        del params, extra_args
        # torch.lerp(mu, g, w) with w = 1 - β < 1/2 computes mu + w (g - mu)
        mu = jax.tree.map(lambda m, g: m + (1 - beta) * (g - m), state.mu, updates)
        u = jax.tree.map(lambda m: m / (jnp.sqrt(m * m + sigma2) + eps), mu)
        return u, ScaleByConstantVSGDState(optax.safe_increment(state.count), mu)

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return with_nonfinite_policy(tx, nonfinite)


def constant_vsgd(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    variance_ratio: float = 30.0,
    prior_variance: float = 1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    mask: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Constant VSGD, the optax optimizer: :func:`scale_by_constant_vsgd`, decoupled weight
    decay and the learning rate, :math:`\theta_t = \theta_{t-1}(1-\eta\lambda) - \eta u_t`.

    Args:
        learning_rate: η, a number or an optax schedule. (default: 0.1)
        variance_ratio, prior_variance, eps: as in :func:`scale_by_constant_vsgd`.
        weight_decay: λ, decoupled weight decay. (default: 0)
        mask: which leaves weight decay applies to, as in ``optax.adamw``. (default: all)
        {nonfinite}

    References:
        Chen, Kuzina, Esmaeili & Tomczak, `Variational Stochastic Gradient Descent for Deep
        Neural Networks <https://arxiv.org/abs/2404.06549>`_, 2024.

    .. seealso:: :class:`probopt.optim.ConstantVSGD`, :func:`probopt.jax.vsgd`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> x = jnp.array([1.0, -2.0])
        >>> tx = constant_vsgd(learning_rate=0.5, variance_ratio=9.0)
        >>> state = tx.init(x)
        >>> for _ in range(3):
        ...     u, state = tx.update(jax.grad(lambda x: (x**2).sum())(x), state, x)
        ...     x = optax.apply_updates(x, u)
        >>> [round(float(v), 4) for v in x]
        [0.4988, -1.1494]
    """
    check_learning_rate(learning_rate)
    weight_decay = checked(check_positive, "weight_decay", weight_decay, allow_zero=True)
    decay = (
        optax.identity() if is_zero(weight_decay) else optax.add_decayed_weights(weight_decay, mask)
    )
    tx = optax.chain(
        scale_by_constant_vsgd(variance_ratio, prior_variance, eps, nonfinite="ignore"),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )
    return with_nonfinite_policy(tx, nonfinite)


for _f in (scale_by_constant_vsgd, constant_vsgd):
    _f.__doc__ = _f.__doc__.replace("{nonfinite}", _nonfinite_doc)
