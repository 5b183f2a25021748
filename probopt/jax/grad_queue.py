r"""Grad Queue as an optax transformation, and the pure functions of its model in JAX.

The JAX twin of :mod:`probopt.models.grad_queue` (the maths, same function and argument names)
and of :class:`probopt.optim.GradQueue` (the wrapper): here the natural form is a gradient
transformation that rewrites the gradients, chained *before* any optax optimizer::

    tx = optax.chain(probopt.jax.grad_queue(q_min=4, q_max=32), optax.adam(1e-3))
    updates, state = tx.update(grads, state, params, loss=loss)   # loss drives q_t

The loss is an extra argument (``loss=``, or ``value=``, which is what
``numpyro.optim.optax_to_numpyro`` passes: inside ``numpyro.infer.SVI`` the ELBO loss drives the
queue length with no extra code). Without a loss the queue length stays where it is.

**The model** (see :mod:`probopt.models.grad_queue` for the full statement and for which parts
are the paper's and which are ours). For each gradient coordinate the last :math:`n \le q_t`
gradients are exchangeable draws from a local Normal; the incoming gradient :math:`g_t` is scored
under the posterior predictive :math:`t_{n-1}(\hat\mu_t, \hat\sigma_t\sqrt{1 + 1/n})` (or the
plug-in Normal); its *scarcity* :math:`\rho_t = 1 - P(|G - \hat\mu_t| \ge |g_t - \hat\mu_t|)`
sets a bounded weight :math:`\Delta(\rho) = a_{\min} + (a_{\max} - a_{\min})\rho^k`, and the
optimizer receives :math:`\Delta(\rho_t) \odot g_t`.

References:
    Al Hasib, I. M., `Grad Queue: A probabilistic framework to reinforce sparse gradients
    <https://arxiv.org/abs/2404.16917>`_, arXiv 2404.16917, 2024.

    Wallace, D. L., `Bounds on normal approximations to Student's and the chi-square
    distributions <https://doi.org/10.1214/aoms/1177706370>`_, Ann. Math. Statist. 30(4), 1959.

Example:
    >>> import jax.numpy as jnp
    >>> queue = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.0], [1.0, 0.0]])
    >>> shift = queue[0]
    >>> total, total_sq = queue_sums(queue, shift)
    >>> mean, scale = queue_moments(shift, total, total_sq, 4)
    >>> grad = jnp.array([1.0, 0.5])                  # coordinate 1 never moved before: rare
    >>> rho = scarcity(grad, mean, predictive_scale(scale, 4, "student"), dof=3)
    >>> rho
    Array([0., 1.], dtype=float32)
    >>> amplification_weight(rho, min_amplification=0.5, max_amplification=2.0, sharpness=2.0)
    Array([0.5, 2. ], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.scipy.special import erf, erfc

from probopt.jax._base import (
    _nonfinite_doc,
    check_real_leaves,
    with_nonfinite_policy,
    zeros_like,
)
from probopt.optim._base import check_interval, check_positive

__all__ = [
    "AMPLIFICATIONS",
    "LENGTH_RULES",
    "PREDICTIVES",
    "GradQueueState",
    "amplification_weight",
    "amplify",
    "calibrated_sharpness",
    "cluster_scale",
    "combine_cluster_gradients",
    "ema_decay",
    "ema_moments",
    "grad_queue",
    "loss_trend",
    "loss_trend_update",
    "model",
    "predictive_distribution",
    "predictive_scale",
    "queue_evict",
    "queue_length_from_trend",
    "queue_moments",
    "queue_push",
    "queue_sums",
    "scarcity",
    "tail_probability",
]

AMPLIFICATIONS: tuple[str, ...] = ("none", "power")
PREDICTIVES: tuple[str, ...] = ("student", "normal")
LENGTH_RULES: tuple[str, ...] = ("shorten_on_change", "lengthen_on_change", "fixed")
_STATISTICS = ("queue", "ema")
_SQRT2 = math.sqrt(2.0)

# ---------------------------------------------------------------------------------------------
# the queue's running sums (pure functions)


def queue_sums(queue: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact shifted sums :math:`\\sum_s (g_s - K)` and :math:`\\sum_s (g_s - K)^2` over axis 0."""
    d = queue - shift
    return d.sum(0), (d * d).sum(0)


def queue_push(
    shift: jax.Array, total: jax.Array, total_sq: jax.Array, grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Running sums after ``grad`` entered the queue."""
    d = grad - shift
    return total + d, total_sq + d * d


def queue_evict(
    shift: jax.Array, total: jax.Array, total_sq: jax.Array, grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Running sums after ``grad`` (an entry of the queue) left it."""
    d = grad - shift
    return total - d, total_sq - d * d


def queue_moments(
    shift: jax.Array, total: jax.Array, total_sq: jax.Array, count: int | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean and (unbiased, ``n - 1``) standard deviation of a queue of ``count >= 2`` entries.

    ``count`` may be traced. A variance made slightly negative by rounding is clamped to zero.
    """
    mean_d = total / count
    var = jnp.maximum(total_sq - total * mean_d, 0.0) / jnp.maximum(count - 1, 1)
    return shift + mean_d, jnp.sqrt(var)


def ema_decay(queue_length: float | jax.Array) -> float | jax.Array:
    """Decay :math:`\\beta = 1 - 2/(q + 1)`: the EMA whose centre of mass matches ``q`` entries."""
    return 1.0 - 2.0 / (queue_length + 1.0)


def ema_moments(
    mean: jax.Array, var: jax.Array, grad: jax.Array, decay: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Exponentially weighted mean and variance after observing ``grad`` (West 1979):
    :math:`\\delta = g - m`, :math:`m \\leftarrow m + (1-\\beta)\\delta`,
    :math:`v \\leftarrow \\beta\\,(v + (1-\\beta)\\delta^2)`."""
    delta = grad - mean
    return mean + (1.0 - decay) * delta, decay * (var + (1.0 - decay) * delta * delta)


# ---------------------------------------------------------------------------------------------
# predictive distribution, scarcity, amplification


def predictive_scale(scale: jax.Array, count: float | jax.Array, predictive: str) -> jax.Array:
    """Scale of the predictive distribution of the next gradient given ``count`` entries:
    :math:`\\hat\\sigma\\sqrt{1 + 1/n}` (``"student"``) or :math:`\\hat\\sigma` (``"normal"``)."""
    if predictive == "student":
        if isinstance(count, (int, float)):
            return scale * math.sqrt(1.0 + 1.0 / count)
        return scale * jnp.sqrt(1.0 + 1.0 / count)
    if predictive == "normal":
        return scale
    raise ValueError(f"Invalid predictive: {predictive!r} (one of {', '.join(PREDICTIVES)})")


def predictive_distribution(
    mean: jax.Array, scale: jax.Array, eps: float = 1e-8, dof: float | None = None
) -> Any:
    """The predictive distribution of the next gradient, a ``numpyro.distributions`` object:
    :math:`\\mathcal N(\\mu, (\\sigma + \\epsilon)^2)` for ``dof=None``, else
    :math:`t_\\nu(\\mu, \\sigma + \\epsilon)`."""
    from probopt._optional import require

    dist = require("numpyro.distributions", "Grad Queue's predictive distribution")
    if dof is None:
        return dist.Normal(mean, scale + eps)
    return dist.StudentT(jnp.asarray(dof, jnp.result_type(mean)), mean, scale + eps)


def _normal_deviate(z: jax.Array, dof: float | jax.Array | None) -> jax.Array:
    """Wallace's (1959) map of ``|t|`` (Student-t, ``dof``) to a Normal deviate,
    :math:`z = \\frac{8\\nu+1}{8\\nu+3}\\sqrt{\\nu \\log(1 + t^2/\\nu)}`."""
    if dof is None:
        return z
    c = (8.0 * dof + 1.0) / (8.0 * dof + 3.0)
    return c * jnp.sqrt(dof * jnp.log1p(z * z / dof))


def tail_probability(
    grad: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    eps: float = 1e-8,
    dof: float | jax.Array | None = None,
) -> jax.Array:
    """Two-sided tail probability :math:`P(|G - \\mu| \\ge |g - \\mu|)` under the predictive."""
    z = _normal_deviate(jnp.abs(grad - mean) / (scale + eps), dof)
    return erfc(z / _SQRT2)


def scarcity(
    grad: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    eps: float = 1e-8,
    dof: float | jax.Array | None = None,
) -> jax.Array:
    """Scarcity :math:`\\rho = 1 - p`, one minus the two-sided tail probability; :math:`U(0, 1)`
    for a draw from the predictive distribution itself."""
    z = _normal_deviate(jnp.abs(grad - mean) / (scale + eps), dof)
    return erf(z / _SQRT2)


def calibrated_sharpness(min_amplification: float, max_amplification: float) -> float:
    """The sharpness :math:`k = (a_{\\max} - a_{\\min})/(1 - a_{\\min}) - 1`, for which
    :math:`\\mathbb E[\\Delta(U)] = 1`, :math:`U \\sim U(0, 1)`.

    Example:
        >>> calibrated_sharpness(0.5, 2.0)
        2.0
    """
    if not min_amplification < 1.0 < max_amplification:
        raise ValueError(
            "calibrated sharpness needs min_amplification < 1 < max_amplification, got "
            f"{min_amplification!r} and {max_amplification!r}; pass sharpness explicitly"
        )
    return (max_amplification - min_amplification) / (1.0 - min_amplification) - 1.0


def amplification_weight(
    scarcity: jax.Array, min_amplification: float, max_amplification: float, sharpness: float
) -> jax.Array:
    """Bounded monotone weight :math:`\\Delta = a_{\\min} + (a_{\\max} - a_{\\min})\\rho^k`."""
    return min_amplification + (max_amplification - min_amplification) * scarcity**sharpness


def amplify(
    grad: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    *,
    min_amplification: float,
    max_amplification: float,
    sharpness: float,
    eps: float = 1e-8,
    dof: float | jax.Array | None = None,
) -> jax.Array:
    """:math:`\\Delta(\\rho(g)) \\odot g`: one gradient rewritten by its scarcity."""
    rho = scarcity(grad, mean, scale, eps, dof)
    return grad * amplification_weight(rho, min_amplification, max_amplification, sharpness)


# ---------------------------------------------------------------------------------------------
# the loss-driven queue length


def loss_trend_update(
    loss_fast: Any, loss_slow: Any, loss: Any, loss_betas: tuple[float, float]
) -> tuple[Any, Any]:
    """Fast and slow exponential moving averages of the loss; the first loss (``loss_fast``
    ``None``) starts both."""
    if loss_fast is None or loss_slow is None:
        return loss, loss
    b_fast, b_slow = loss_betas
    return b_fast * loss_fast + (1 - b_fast) * loss, b_slow * loss_slow + (1 - b_slow) * loss


def loss_trend(loss_fast: Any, loss_slow: Any) -> jax.Array:
    """Relative trend :math:`\\tau = (\\bar L^{fast} - \\bar L^{slow}) / |\\bar L^{slow}|`."""
    return (loss_fast - loss_slow) / jnp.maximum(jnp.abs(loss_slow), 1e-12)


def queue_length_from_trend(
    trend: Any, q_min: int, q_max: int, trend_scale: float, length_rule: str
) -> jax.Array:
    """Effective queue length (int32) for a loss trend: ``"shorten_on_change"`` gives
    :math:`q_{\\max} - (q_{\\max} - q_{\\min})\\min(1, |\\tau|/\\tau_0)`, ``"lengthen_on_change"``
    its mirror image, ``"fixed"`` :math:`q_{\\max}`; rounded half to even, as Python's ``round``.

    Example:
        >>> int(queue_length_from_trend(-0.2, 4, 32, 0.05, "shorten_on_change"))
        4
    """
    if length_rule == "fixed":
        return jnp.asarray(q_max, jnp.int32)
    frac = jnp.minimum(1.0, jnp.abs(trend) / trend_scale)
    if length_rule == "lengthen_on_change":
        frac = 1.0 - frac
    elif length_rule != "shorten_on_change":
        raise ValueError(f"Invalid length_rule: {length_rule!r} (one of {', '.join(LENGTH_RULES)})")
    return jnp.round(q_max - (q_max - q_min) * frac).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# clusters of a large batch


def cluster_scale(scale: jax.Array, cluster_sizes: jax.Array, batch_size: int) -> jax.Array:
    """Predictive scale of a cluster mean, :math:`\\sigma\\sqrt{B/n_c}` (ours); shape
    ``(k, *scale.shape)``."""
    ratio = jnp.sqrt(batch_size / jnp.asarray(cluster_sizes).astype(jnp.result_type(scale)))
    return scale[None] * ratio.reshape(-1, *([1] * jnp.ndim(scale)))


def combine_cluster_gradients(
    cluster_grads: jax.Array,
    cluster_sizes: jax.Array,
    weights: jax.Array | None,
    combine: str = "size",
) -> jax.Array:
    """Combine ``k`` cluster mean gradients (shape ``(k, ...)``) into :math:`G^*`:
    ``"size"``: :math:`\\sum_c (n_c/B) \\Delta_c g_c`; ``"normalized"``: :math:`\\sum_c n_c
    \\Delta_c g_c / \\sum_c n_c \\Delta_c`; ``weights=None`` means :math:`\\Delta \\equiv 1`."""
    shape = (-1, *([1] * (cluster_grads.ndim - 1)))
    n = jnp.asarray(cluster_sizes).astype(cluster_grads.dtype).reshape(shape)
    w = n if weights is None else n * weights
    if combine == "size":
        return (w * cluster_grads).sum(0) / n.sum()
    if combine == "normalized":
        return (w * cluster_grads).sum(0) / w.sum(0)
    raise ValueError(f"Invalid combine: {combine!r} (one of size, normalized)")


def model(
    queue: jax.Array, grad: jax.Array | None = None, eps: float = 1e-8, predictive: str = "student"
) -> jax.Array:
    """NumPyro model of the next gradient given the queue (axis 0 = entries, oldest first):
    site ``"grad"`` from the predictive distribution (Student-t with :math:`n-1` degrees of
    freedom and scale :math:`\\hat\\sigma\\sqrt{1+1/n}`, or the plug-in Normal).

    Example:
        >>> import jax.numpy as jnp, numpyro
        >>> q = jnp.array([[0.0], [1.0], [2.0]])
        >>> tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(q)
        >>> tr["grad"]["fn"].base_dist.loc
        Array([1.], dtype=float32)
    """
    from probopt._optional import require

    numpyro = require("numpyro", "the Grad Queue NumPyro model")
    n = queue.shape[0]
    if n < 2:
        raise ValueError(f"the predictive distribution needs >= 2 queue entries, got {n}")
    shift = queue[0]
    total, total_sq = queue_sums(queue, shift)
    mean, scale = queue_moments(shift, total, total_sq, n)
    dof = n - 1.0 if predictive == "student" else None
    scale = predictive_scale(scale, n, predictive)
    fn = predictive_distribution(mean, scale, eps, dof).to_event(mean.ndim)
    return numpyro.sample("grad", fn, obs=grad)


# ---------------------------------------------------------------------------------------------
# the transformation


class GradQueueState(NamedTuple):
    """State of :func:`grad_queue`. The counters are shared by all leaves (they step together)."""

    step: jax.Array
    """Shape (), int32: steps taken (torch ``GradQueue``'s clock)."""
    queue_length: jax.Array
    """Shape (), int32: the effective queue length :math:`q_t`."""
    loss_fast: jax.Array
    """Shape (), float: the fast loss EMA; NaN until the first finite loss."""
    loss_slow: jax.Array
    """Shape (), float: the slow loss EMA; NaN until the first finite loss."""
    count: jax.Array
    """Shape (), int32: entries in the queue (``"queue"``) or gradients seen (``"ema"``)."""
    head: jax.Array
    """Shape (), int32: the ring-buffer slot the next gradient goes to (``"queue"``)."""
    since_refresh: jax.Array
    """Shape (), int32: pushes since the running sums were last recomputed (``"queue"``)."""
    queue: optax.Updates | None
    """Per leaf ``(q_max, *shape)``: the last gradients, a ring buffer (``"queue"`` only)."""
    shift: optax.Updates | None
    """K, the shift of the running sums (``"queue"`` only)."""
    total: optax.Updates | None
    """:math:`S_1 = \\sum (g_s - K)` (``"queue"`` only)."""
    total_sq: optax.Updates | None
    """:math:`S_2 = \\sum (g_s - K)^2` (``"queue"`` only)."""
    mean: optax.Updates | None
    """The EMA mean (``"ema"`` only)."""
    var: optax.Updates | None
    """The EMA variance (``"ema"`` only)."""


def _check_int(name: str, value: Any, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


def grad_queue(
    queue_length: int = 16,
    q_min: int = 4,
    q_max: int = 32,
    *,
    amplification: str = "power",
    min_amplification: float = 0.5,
    max_amplification: float = 2.0,
    sharpness: float | None = None,
    eps: float = 1e-8,
    predictive: str = "student",
    statistics: str = "queue",
    refresh_every: int | None = None,
    length_rule: str = "shorten_on_change",
    loss_betas: tuple[float, float] = (0.9, 0.98),
    trend_scale: float = 0.1,
    preserve_norm: bool = False,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Grad Queue (GQ): rewrite each gradient by its scarcity under a queue of recent gradients.

    Let :math:`q_t` be the effective queue length, :math:`a_{\min}, a_{\max}` be
    ``min_amplification, max_amplification`` and :math:`k` ``sharpness``:

    .. code-block:: text

        input: g_t (the gradients), loss L_t (optional extra argument)
        for t = 1, 2, ...:
            q_t <- queue_length_from_trend(trend of L_1..L_t)      # loss-driven, in [q_min, q_max]
            evict oldest entries while |Q| > q_t
            if |Q| >= 2:
                mu, sigma <- mean, std of Q  (per coordinate; shifted running sums)
                rho <- scarcity(g_t | t_{n-1}(mu, sigma sqrt(1 + 1/n)))  # 1 - two-sided tail prob.
                G_t <- (a_min + (a_max - a_min) rho^k) * g_t
            else:
                G_t <- g_t                                            # warm-up
            push g_t into Q (evicting the oldest when |Q| = q_t)
            return G_t

    Args:
        queue_length: initial effective queue length :math:`q_0`. (default: 16)
        q_min, q_max: bounds of the effective length; the ring buffer holds ``q_max`` gradients
            per leaf. (defaults: 4, 32)
        amplification: ``"power"``, or ``"none"`` (GQ off: the identity). (default: ``"power"``)
        min_amplification, max_amplification: bounds of Δ. (defaults: 0.5, 2.0)
        sharpness: k > 0; ``None`` calibrates :math:`\mathbb E[\Delta] = 1` for an ordinary
            gradient (:func:`calibrated_sharpness`), or 1 when the bounds do not straddle 1.
        eps: added to the predictive scale. (default: 1e-8)
        predictive: ``"student"`` or ``"normal"`` (plug-in). (default: ``"student"``)
        statistics: ``"queue"`` (exact moments of the last :math:`q_t` gradients, memory
            :math:`(q_{\max}+3)P`) or ``"ema"`` (decay :math:`1 - 2/(q_t+1)`, memory :math:`2P`;
            ours). (default: ``"queue"``)
        refresh_every: recompute the running sums exactly every this many pushes; ``None``:
            ``4 * q_max``.
        length_rule: ``"shorten_on_change"``, ``"lengthen_on_change"`` or ``"fixed"``.
        loss_betas: decays of the fast and slow loss EMAs. (default: (0.9, 0.98))
        trend_scale: relative trend :math:`\tau_0` at which the length reaches its bound.
            (default: 0.1)
        preserve_norm: rescale each rewritten leaf to the norm of the plain gradient (ours).
        {nonfinite}

    Returns:
        A :class:`optax.GradientTransformationExtraArgs` (state :class:`GradQueueState`), whose
        ``update`` accepts ``loss=`` (or ``value=``, as NumPyro's SVI passes it).

    .. note:: As :class:`probopt.optim.GradQueue` (whose docstring lists the paper's parts and
        ours), without the large-batch clustering: it needs the per-example gradients of the
        model, which a gradient transformation never sees (:func:`cluster_scale` and
        :func:`combine_cluster_gradients` are here for a training loop that has them). With
        ``nonfinite="skip"`` a bad step leaves GQ's state unchanged and passes on zeros; wrap
        the whole chain in :func:`~probopt.jax.skip_nonfinite` so that the optimizer after it
        skips too (torch's GradQueue skips its inner optimizer's step).

    References:
        Al Hasib, I. M., `Grad Queue: A probabilistic framework to reinforce sparse gradients
        <https://arxiv.org/abs/2404.16917>`_, arXiv 2404.16917, 2024.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> tx = optax.chain(grad_queue(queue_length=4, q_min=2, q_max=4), optax.sgd(0.1))
        >>> w = jnp.array([1.0, -2.0])
        >>> state = tx.init(w)
        >>> for _ in range(5):
        ...     loss, g = jax.value_and_grad(lambda w: (w**2).sum())(w)
        ...     u, state = tx.update(g, state, w, loss=loss)
        ...     w = optax.apply_updates(w, u)
        >>> gq = state[0].inner_state
        >>> int(gq.queue_length), int(gq.count)
        (2, 2)
    """
    _check_int("q_min", q_min, 2)
    _check_int("queue_length", queue_length, q_min)
    _check_int("q_max", q_max, queue_length)
    if amplification not in AMPLIFICATIONS:
        raise ValueError(
            f"Invalid amplification: {amplification!r} (one of {', '.join(AMPLIFICATIONS)})"
        )
    check_positive("min_amplification", min_amplification, allow_zero=True)
    check_positive("max_amplification", max_amplification)
    if max_amplification < min_amplification:
        raise ValueError(
            f"Invalid max_amplification: {max_amplification!r} (must be >= "
            f"min_amplification = {min_amplification!r})"
        )
    if sharpness is None:
        calibrate = min_amplification < 1.0 < max_amplification
        k = calibrated_sharpness(min_amplification, max_amplification) if calibrate else 1.0
    else:
        check_positive("sharpness", sharpness)
        k = float(sharpness)
    check_positive("eps", eps)
    if predictive not in PREDICTIVES:
        raise ValueError(f"Invalid predictive: {predictive!r} (one of {', '.join(PREDICTIVES)})")
    if statistics not in _STATISTICS:
        raise ValueError(f"Invalid statistics: {statistics!r} (one of queue, ema)")
    if refresh_every is not None:
        _check_int("refresh_every", refresh_every, 1)
    refresh = refresh_every or 4 * q_max
    if length_rule not in LENGTH_RULES:
        raise ValueError(f"Invalid length_rule: {length_rule!r} (one of {', '.join(LENGTH_RULES)})")
    if not (isinstance(loss_betas, (tuple, list)) and len(loss_betas) == 2):
        raise ValueError(f"Invalid loss_betas: {loss_betas!r} (must be a pair (fast, slow))")
    for i, b in enumerate(loss_betas):
        check_interval(f"loss_betas[{i}]", b, 0.0, 1.0, closed="[)")
    b_fast, b_slow = (float(b) for b in loss_betas)
    check_positive("trend_scale", trend_scale)
    if not isinstance(preserve_norm, bool):
        raise ValueError(f"Invalid preserve_norm: {preserve_norm!r} (must be a bool)")
    if amplification == "none":
        return with_nonfinite_policy(optax.identity(), nonfinite)
    a_min, a_max, eps = float(min_amplification), float(max_amplification), float(eps)
    ema = statistics == "ema"
    student = predictive == "student"
    cap = q_max

    def init_fn(params: optax.Params) -> GradQueueState:
        check_real_leaves("grad_queue", params)
        zeros = zeros_like(params)
        loss_dtype = jnp.result_type(float)
        scalar = jnp.zeros([], jnp.int32)
        return GradQueueState(
            step=scalar,
            queue_length=jnp.asarray(queue_length, jnp.int32),
            loss_fast=jnp.full([], jnp.nan, loss_dtype),
            loss_slow=jnp.full([], jnp.nan, loss_dtype),
            count=scalar,
            head=scalar,
            since_refresh=scalar,
            queue=None
            if ema
            else jax.tree.map(lambda p: jnp.zeros((cap, *p.shape), p.dtype), zeros),
            shift=None if ema else zeros,
            total=None if ema else zeros,
            total_sq=None if ema else zeros,
            mean=zeros if ema else None,
            var=zeros if ema else None,
        )

    def new_queue_length(state: GradQueueState, loss: Any) -> tuple[jax.Array, ...]:
        q, lf, ls = state.queue_length, state.loss_fast, state.loss_slow
        if loss is None:
            return q, lf, ls
        loss = jnp.asarray(loss, lf.dtype)
        ok = jnp.isfinite(loss)
        first = jnp.isnan(lf)
        lf_new = jnp.where(first, loss, b_fast * lf + (1 - b_fast) * loss)
        ls_new = jnp.where(first, loss, b_slow * ls + (1 - b_slow) * loss)
        q_new = queue_length_from_trend(
            loss_trend(lf_new, ls_new), q_min, q_max, trend_scale, length_rule
        )
        set_q = ok if length_rule == "fixed" else ok & (state.step > 0)
        return (
            jnp.where(set_q, q_new, q),
            jnp.where(ok, lf_new, lf),
            jnp.where(ok, ls_new, ls),
        )

    def weights(g: jax.Array, mean: jax.Array, scale: jax.Array, n: jax.Array) -> jax.Array:
        n = n.astype(g.dtype)
        dof = n - 1.0 if student else None
        scale = predictive_scale(scale, n, predictive)
        return amplification_weight(scarcity(g, mean, scale, eps, dof), a_min, a_max, k)

    def rewrite(raw: jax.Array, w: jax.Array, use: jax.Array) -> jax.Array:
        new = raw * w
        if preserve_norm:
            norm_new = jnp.linalg.norm(new.ravel())
            tiny = jnp.finfo(new.dtype).tiny
            new = new * (jnp.linalg.norm(raw.ravel()) / jnp.maximum(norm_new, tiny))
        return jnp.where(use, new, raw)

    def update_queue(updates: optax.Updates, state: GradQueueState, q: jax.Array) -> tuple:
        grads, treedef = jax.tree.flatten(updates)
        queues = treedef.flatten_up_to(state.queue)
        shifts = treedef.flatten_up_to(state.shift)
        head = state.head

        def oldest(count: jax.Array) -> list[jax.Array]:
            slot = jnp.mod(head - count, cap)
            return [lax.dynamic_index_in_dim(x, slot, keepdims=False) for x in queues]

        def evict(carry: tuple) -> tuple:
            count, totals, totals_sq = carry
            sums = [
                queue_evict(s, t, t2, old)
                for s, t, t2, old in zip(shifts, totals, totals_sq, oldest(count))
            ]
            return count - 1, [x[0] for x in sums], [x[1] for x in sums]

        carry = (
            state.count,
            treedef.flatten_up_to(state.total),
            treedef.flatten_up_to(state.total_sq),
        )
        count, totals, totals_sq = lax.while_loop(lambda c: c[0] > q, evict, carry)
        use = count >= 2
        n = jnp.maximum(count, 2)
        out = []
        for g, s, t, t2 in zip(grads, shifts, totals, totals_sq):
            mean, scale = queue_moments(s, t, t2, n.astype(g.dtype))
            out.append(rewrite(g, weights(g, mean, scale, n), use))
        # make room for the new entry
        full = count >= q
        ev_count, ev_totals, ev_totals_sq = evict((count, totals, totals_sq))
        totals = [jnp.where(full, e, t) for e, t in zip(ev_totals, totals)]
        totals_sq = [jnp.where(full, e, t) for e, t in zip(ev_totals_sq, totals_sq)]
        count = jnp.where(full, ev_count, count)
        # push
        shifts = [jnp.where(count == 0, g, s) for g, s in zip(grads, shifts)]
        queues = [lax.dynamic_update_index_in_dim(x, g, head, 0) for x, g in zip(queues, grads)]
        sums = [queue_push(s, t, t2, g) for s, t, t2, g in zip(shifts, totals, totals_sq, grads)]
        totals, totals_sq = [x[0] for x in sums], [x[1] for x in sums]
        head = jnp.mod(head + 1, cap)
        count = count + 1
        since = state.since_refresh + 1

        def exact(args: tuple) -> tuple:
            del args  # recomputed from the stored entries
            rel = jnp.mod(jnp.arange(cap) - (head - count), cap)
            valid = rel < count
            new_s, new_t, new_t2 = [], [], []
            for x in queues:
                mask = valid.reshape(-1, *([1] * (x.ndim - 1)))
                s = jnp.where(mask, x, 0).sum(0) / count.astype(x.dtype)
                d = jnp.where(mask, x - s, 0)
                new_s.append(s)
                new_t.append(d.sum(0))
                new_t2.append((d * d).sum(0))
            return new_s, new_t, new_t2

        shifts, totals, totals_sq = lax.cond(
            since >= refresh, exact, lambda args: args, (shifts, totals, totals_sq)
        )
        since = jnp.where(since >= refresh, 0, since)
        unflat = treedef.unflatten
        return treedef.unflatten(out), state._replace(
            count=count,
            head=head,
            since_refresh=since,
            queue=unflat(queues),
            shift=unflat(shifts),
            total=unflat(totals),
            total_sq=unflat(totals_sq),
        )

    def update_ema(updates: optax.Updates, state: GradQueueState, q: jax.Array) -> tuple:
        count = state.count
        use = count >= 2
        n = jnp.maximum(jnp.minimum(count, q), 2)
        decay = ema_decay(q)

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple:
            new = rewrite(g, weights(g, m, jnp.sqrt(v), n), use)
            m2, v2 = ema_moments(m, v, g, decay.astype(g.dtype))
            return new, jnp.where(count == 0, g, m2), jnp.where(count == 0, v, v2)

        grads, treedef = jax.tree.flatten(updates)
        res = [
            leaf(g, m, v)
            for g, m, v in zip(
                grads, treedef.flatten_up_to(state.mean), treedef.flatten_up_to(state.var)
            )
        ]
        new, mean, var = (treedef.unflatten([r[i] for r in res]) for i in range(3))
        return new, state._replace(count=count + 1, mean=mean, var=var)

    def update_fn(
        updates: optax.Updates,
        state: GradQueueState,
        params: optax.Params | None = None,
        *,
        loss: Any = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GradQueueState]:
        del params, extra_args
        q, lf, ls = new_queue_length(state, loss if loss is not None else value)
        state = state._replace(queue_length=q, loss_fast=lf, loss_slow=ls)
        new, state = (update_ema if ema else update_queue)(updates, state, q)
        return new, state._replace(step=optax.safe_increment(state.step))

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return with_nonfinite_policy(tx, nonfinite)


grad_queue.__doc__ = grad_queue.__doc__.replace("{nonfinite}", _nonfinite_doc)
