r"""Grad Queue: a wrapper that reinforces sparse gradient components before any torch optimizer."""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from probopt.optim import _clustering
from probopt.optim._base import (
    _foreach_doc,
    _nonfinite_doc,
    check_finite_grads,
    check_interval,
    check_nonfinite,
    check_positive,
)

__all__ = ["GradQueue"]

_STATISTICS = ("queue", "ema")
_COMBINES = ("size", "normalized")
_CLUSTER_METHODS = ("auto", "per_cluster", "per_example")
_SQRT2 = math.sqrt(2.0)


def _gq() -> Any:
    """The pure functions of :mod:`probopt.models.grad_queue` (imported on first use).

    ``probopt.models`` is mapped onto the top-level ``models/`` folder, which may only be
    importable once ``probopt`` itself has finished importing (see probopt/__init__.py).
    """
    from probopt.models import grad_queue

    return grad_queue


def _check_int(name: str, value: Any, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


class GradQueue(Optimizer):
    r"""Grad Queue (GQ): rewrite each gradient by its scarcity under a queue of recent gradients.

    Wraps any torch optimizer (SGD, AdamW, :class:`~probopt.optim.VSGD`, ...). Before the inner
    step every gradient coordinate is scored against the queue's predictive distribution and
    multiplied by a bounded amplification weight: rare ("sparse") components are boosted,
    repeated ("monotonous") ones damped, so that rare information survives aggressive momentum.
    The model and its maths are in :mod:`probopt.models.grad_queue`. Let :math:`q_t` be the
    effective queue length (``queue_length`` at start, within ``[q_min, q_max]``),
    :math:`a_{\min}, a_{\max}` be ``min_amplification, max_amplification``, :math:`k` be
    ``sharpness``:

    .. code-block:: text

        input: inner optimizer, g_t (the .grad of every parameter), loss L_t
        for t = 1, 2, ...:
            q_t <- queue_length_from_trend(trend of L_1..L_t)      # loss-driven, in [q_min, q_max]
            evict oldest entries while |Q| > q_t
            if |Q| >= 2:
                mu, sigma <- mean, std of Q  (per coordinate; running sums)
                rho <- erf(|g_t - mu| / (sqrt(2) (sigma + eps)))      # scarcity = 1 - tail prob.
                G_t <- (a_min + (a_max - a_min) rho^k) * g_t
            else:
                G_t <- g_t                                            # warm-up
            push g_t into Q (evicting the oldest when |Q| = q_t)
            .grad <- G_t;  inner.step()

    With ``cluster_threshold`` set, :meth:`backward` clusters batches larger than the threshold
    in feature space and the step combines the per-cluster gradients
    :math:`G^* = \sum_c (n_c/B)\,\Delta_c \odot g_c` (each :math:`g_c` scored with scale
    :math:`\sigma\sqrt{B/n_c}`); the queue always receives the plain batch-mean gradient.

    A training loop::

        opt = GradQueue(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for x, y in batches:
            opt.zero_grad()
            loss = opt.backward(model, per_example_loss, x, y)   # or loss.backward() yourself
            opt.step()                                           # or opt.step(loss=loss)

    Args:
        optimizer: the inner optimizer; GQ shares its ``param_groups`` (lr schedulers work on
            either object).
        queue_length: initial effective queue length :math:`q_0`. (default: 16)
        q_min, q_max: bounds of the effective length; ``q_min == q_max`` fixes it. The exact
            queue stores ``q_max`` gradients. (defaults: 4, 32)
        amplification: ``"power"``: :math:`\Delta = a_{\min} + (a_{\max}-a_{\min})\rho^k`;
            ``"none"``: GQ off, every call goes straight to the inner optimizer (bit-identical).
            (default: ``"power"``)
        min_amplification, max_amplification: bounds :math:`a_{\min} \le \Delta \le a_{\max}`.
            (defaults: 0.5, 2.0)
        sharpness: exponent :math:`k > 0`; ``None`` calibrates it so that
            :math:`\mathbb E[\Delta] = 1` for a gradient drawn from the predictive distribution
            (:func:`~probopt.models.grad_queue.calibrated_sharpness`; 2 for the default bounds),
            and uses 1 when the bounds do not straddle 1. (default: None)
        eps: added to the predictive scale. (default: 1e-8)
        predictive: ``"student"``: the posterior predictive :math:`t_{n-1}(\hat\mu,
            \hat\sigma\sqrt{1+1/n})` of the queue's :math:`n` entries (with ``"ema"``
            statistics :math:`n = \min(\text{count}, q_t)`); ``"normal"``: the plug-in
            :math:`\mathcal N(\hat\mu, \hat\sigma^2)`, over-confident for short queues.
            (default: ``"student"``)
        statistics: ``"queue"``: exact moments of the last :math:`q_t` gradients from running
            sums with eviction, memory :math:`(q_{\max}+3)P`; ``"ema"``: exponentially
            weighted moments with decay :math:`1 - 2/(q_t+1)`, memory :math:`2P` (our
            approximation). (default: ``"queue"``)
        refresh_every: recompute the exact running sums from the stored queue every this many
            pushes (``"queue"`` statistics only; amortised cost :math:`q_{\max}P` / this);
            ``None``: ``4 * q_max``. (default: None)
        length_rule: ``"shorten_on_change"`` (a moving loss shortens the queue),
            ``"lengthen_on_change"`` or ``"fixed"`` (:math:`q_t = q_{\max}`).
        loss_betas: decays of the fast and slow loss EMAs of the trend (about 10 and 50 steps).
            (default: (0.9, 0.98))
        trend_scale: relative trend :math:`\tau_0` at which the length reaches its bound. For
            white noise of relative size :math:`s` in the minibatch loss, the trend's noise is
            about :math:`0.17 s` with the default betas. (default: 0.1)
        preserve_norm: rescale each rewritten gradient tensor to the norm of the plain one, so
            that GQ changes the direction of the step but not its length (ours; the per-coordinate
            bounds then hold before this rescale). Off, :math:`\|G\| / \|g\|` is typically 1.2
            to 1.7 on real networks, which also acts as a larger learning rate for SGD.
            (default: False)
        cluster_threshold: batches larger than this are clustered by :meth:`backward`;
            ``None``: never. (default: None)
        max_clusters: cap of :math:`k = \lceil B/\text{threshold}\rceil`. (default: 16)
        cluster_scaling: score cluster gradients with scale :math:`\sigma\sqrt{B/n_c}` (else
            :math:`\sigma`). (default: True)
        combine: ``"size"`` or ``"normalized"``
            (:func:`~probopt.models.grad_queue.combine_cluster_gradients`). (default: ``"size"``)
        cluster_method: ``"auto"``, ``"per_cluster"`` or ``"per_example"``
            (:func:`~probopt.optim._clustering.cluster_gradients`). (default: ``"auto"``)
        features: ``features(model, x) -> (B, d)`` clustering space; ``None``: the penultimate
            activations. (default: None)
        kmeans_iter: at most this many Lloyd iterations per clustering. (default: 10)
        seed: seed of the k-means++ generator (its state is part of ``state_dict``).
        {nonfinite}
        {foreach}

    .. note:: The paper's formulas were not available to us (see :mod:`probopt.models.grad_queue`
        for which parts are the paper's and which are ours). Everything that is ours is a switch
        above. Where :math:`\Delta` applies (to the raw gradient, before the inner optimizer's
        momentum or second moments see it) is our reading of "makes rare information
        indifferent to aggressive momentum".

    .. note:: ``step(closure)`` evaluates the closure once (its loss drives the queue length);
        optimizers that re-evaluate the closure (LBFGS) are not supported. The loss can also be
        passed as ``step(loss=...)`` or is taken from :meth:`backward`; without any loss the
        queue length stays where it is.

    References:
        Al Hasib, I. M., `Grad Queue: A probabilistic framework to reinforce sparse gradients
        <https://arxiv.org/abs/2404.16917>`_, arXiv 2404.16917, 2024.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = GradQueue(torch.optim.SGD([w], lr=0.1, momentum=0.9), q_min=2, queue_length=4,
        ...                 q_max=4)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     loss = (w**2).sum()
        ...     loss.backward()
        ...     opt.step(loss=loss)
        >>> opt.queue_length, len(opt.state[w]["queue"])
        (2, 4)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        queue_length: int = 16,
        q_min: int = 4,
        q_max: int = 32,
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
        cluster_threshold: int | None = None,
        max_clusters: int = 16,
        cluster_scaling: bool = True,
        combine: str = "size",
        cluster_method: str = "auto",
        features: Callable[[nn.Module, Tensor], Tensor] | None = None,
        kmeans_iter: int = 10,
        seed: int = 0,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        gq = _gq()
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"GradQueue wraps a torch.optim.Optimizer, got {type(optimizer)!r}")
        if isinstance(optimizer, GradQueue):
            raise TypeError("GradQueue cannot wrap another GradQueue; wrap the inner optimizer")
        _check_int("q_min", q_min, 2)
        _check_int("queue_length", queue_length, q_min)
        _check_int("q_max", q_max, queue_length)
        if amplification not in gq.AMPLIFICATIONS:
            raise ValueError(
                f"Invalid amplification: {amplification!r} (one of {', '.join(gq.AMPLIFICATIONS)})"
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
            k = gq.calibrated_sharpness(min_amplification, max_amplification) if calibrate else 1.0
        else:
            check_positive("sharpness", sharpness)
            k = float(sharpness)
        check_positive("eps", eps)
        if predictive not in gq.PREDICTIVES:
            raise ValueError(
                f"Invalid predictive: {predictive!r} (one of {', '.join(gq.PREDICTIVES)})"
            )
        if statistics not in _STATISTICS:
            raise ValueError(f"Invalid statistics: {statistics!r} (one of queue, ema)")
        if refresh_every is not None:
            _check_int("refresh_every", refresh_every, 1)
        if length_rule not in gq.LENGTH_RULES:
            raise ValueError(
                f"Invalid length_rule: {length_rule!r} (one of {', '.join(gq.LENGTH_RULES)})"
            )
        if not (isinstance(loss_betas, (tuple, list)) and len(loss_betas) == 2):
            raise ValueError(f"Invalid loss_betas: {loss_betas!r} (must be a pair (fast, slow))")
        for i, b in enumerate(loss_betas):
            check_interval(f"loss_betas[{i}]", b, 0.0, 1.0, closed="[)")
        check_positive("trend_scale", trend_scale)
        if not isinstance(preserve_norm, bool):
            raise ValueError(f"Invalid preserve_norm: {preserve_norm!r} (must be a bool)")
        if cluster_threshold is not None:
            _check_int("cluster_threshold", cluster_threshold, 1)
        _check_int("max_clusters", max_clusters, 1)
        if combine not in _COMBINES:
            raise ValueError(f"Invalid combine: {combine!r} (one of size, normalized)")
        if cluster_method not in _CLUSTER_METHODS:
            raise ValueError(
                f"Invalid cluster_method: {cluster_method!r} (one of {', '.join(_CLUSTER_METHODS)})"
            )
        _check_int("kmeans_iter", kmeans_iter, 1)
        if features is not None and not callable(features):
            raise TypeError(f"features must be callable(model, x), got {type(features)!r}")
        check_nonfinite(nonfinite)
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (None, True or False)")

        self.optimizer = optimizer
        self.defaults = dict(
            queue_length=queue_length, q_min=q_min, q_max=q_max, amplification=amplification,
            min_amplification=float(min_amplification), max_amplification=float(max_amplification),
            sharpness=k, eps=float(eps), predictive=predictive, statistics=statistics,
            refresh_every=refresh_every or 4 * q_max, length_rule=length_rule,
            loss_betas=tuple(float(b) for b in loss_betas), trend_scale=float(trend_scale),
            preserve_norm=preserve_norm,
            cluster_threshold=cluster_threshold, max_clusters=max_clusters,
            cluster_scaling=bool(cluster_scaling), combine=combine, cluster_method=cluster_method,
            kmeans_iter=kmeans_iter,
            nonfinite=nonfinite, foreach=foreach,
        )  # fmt: skip
        self.features = features
        # Optimizer.__init__ would build param_groups of its own; GQ shares the inner ones, so it
        # sets up only what torch's hook and profiling machinery reads.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        self._generator = torch.Generator().manual_seed(seed)
        self._clock: dict[str, Any] = {
            "step": 0, "queue_length": queue_length, "loss_fast": None, "loss_slow": None,
        }  # fmt: skip
        self._pending: tuple[list[Tensor], _clustering.ClusterGradients] | None = None
        self._pending_loss: Tensor | None = None
        self.num_skipped_steps = 0

    # -----------------------------------------------------------------------------------------
    # the Optimizer interface, delegated to the inner optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending = None

    @property
    def queue_length(self) -> int:
        """The current effective queue length :math:`q_t`."""
        return int(self._clock["queue_length"])

    def __repr__(self) -> str:
        d = self.defaults
        keys = ("queue_length", "q_min", "q_max", "amplification", "statistics")
        args = ", ".join(f"{k}={d[k]!r}" for k in keys)
        return f"GradQueue({args},\n  optimizer={self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -----------------------------------------------------------------------------------------
    # large batches

    def backward(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        *,
        features: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Backward pass for one batch; clusters it when it exceeds ``cluster_threshold``.

        Small batches (or GQ off): ``loss_fn(model(x), y).mean().backward()`` (accumulates into
        ``.grad`` as usual). Large batches: k-means on the features, one mean gradient per
        cluster (kept for the next :meth:`step`), and ``.grad`` *set* to their plain batch mean
        (the step replaces it by the weighted combination). ``loss_fn`` returns per-example
        losses.
        Returns the batch's mean loss (detached), which the next step also uses for the queue
        length.
        """
        d = self.defaults
        b = int(x.shape[0])
        threshold = d["cluster_threshold"]
        k = 1 if threshold is None else _clustering.num_clusters(b, threshold, d["max_clusters"])
        if d["amplification"] == "none" or k < 2:
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            self._pending_loss = loss.detach()
            return self._pending_loss
        feats = (features or self.features or _clustering.penultimate_features)(model, x)
        labels, _ = _clustering.kmeans(
            feats.detach(), k, generator=self._generator, max_iter=d["kmeans_iter"]
        )
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        cg = _clustering.cluster_gradients(
            model, loss_fn, x, y, labels, params, method=d["cluster_method"]
        )
        for p, g in zip(params, cg.mean_grads()):
            p.grad = g
        self._pending = (params, cg)
        self._pending_loss = cg.loss
        return cg.loss

    # -----------------------------------------------------------------------------------------
    # the step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Rewrite the gradients by their scarcity, then take the inner optimizer's step.

        Args:
            closure: re-evaluates the model and returns the loss (called once).
            loss: the batch loss, if not given by the closure or :meth:`backward`.
        """
        d = self.defaults
        if d["amplification"] == "none":
            self._pending, self._pending_loss = None, None
            return self.optimizer.step(closure)
        ret = None
        if closure is not None:
            with torch.enable_grad():
                ret = closure()
            loss = ret if loss is None else loss
        if loss is None:
            loss = self._pending_loss
        pending, self._pending, self._pending_loss = self._pending, None, None

        params, grads = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("GradQueue does not support sparse gradients")
                    params.append(p)
                    grads.append(p.grad)
        extra = [] if pending is None else list(pending[1].grads)
        if not check_finite_grads(self, grads + extra, d["nonfinite"]):
            return ret
        if loss is not None:
            self._update_queue_length(float(loss))
        for p in params:
            if not self.state[p]:
                self._init_state(p)

        q = self.queue_length
        if pending is not None:
            cluster_of = {id(p): i for i, p in enumerate(pending[0])}
            for p in params:
                i = cluster_of.get(id(p))
                cg = None if i is None else (pending[1].grads[i], pending[1].sizes)
                _single_tensor_grad_queue(p.grad, self.state[p], q, d, cg)
        else:
            foreach = d["foreach"]
            if foreach is None:
                foreach = len(params) > 1 and all(p.grad.layout == torch.strided for p in params)
            if foreach:
                _multi_tensor_grad_queue(grads, [self.state[p] for p in params], q, d)
            else:
                for p in params:
                    _single_tensor_grad_queue(p.grad, self.state[p], q, d, None)
        self.optimizer.step()
        self._clock["step"] += 1
        return ret

    def _update_queue_length(self, loss: float) -> None:
        gq, d, c = _gq(), self.defaults, self._clock
        if not math.isfinite(loss):
            return
        c["loss_fast"], c["loss_slow"] = gq.loss_trend_update(
            c["loss_fast"], c["loss_slow"], loss, d["loss_betas"]
        )
        if c["step"] == 0 and d["length_rule"] != "fixed":
            return  # one loss is no trend: keep queue_length
        trend = gq.loss_trend(c["loss_fast"], c["loss_slow"])
        c["queue_length"] = gq.queue_length_from_trend(
            trend, d["q_min"], d["q_max"], d["trend_scale"], d["length_rule"]
        )

    def _init_state(self, p: Tensor) -> None:
        st = self.state[p]
        z = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["count"] = 0
        if self.defaults["statistics"] == "ema":
            st["mean"], st["var"] = z, z.clone()
            return
        st["queue"] = torch.zeros(self.defaults["q_max"], *p.shape, dtype=p.dtype, device=p.device)
        st["shift"], st["total"], st["total_sq"] = z, z.clone(), z.clone()
        st["head"] = 0
        st["since_refresh"] = 0

    # -----------------------------------------------------------------------------------------
    # state_dict: the inner optimizer's and the queue's

    def _index(self) -> dict[int, int]:
        params = [p for g in self.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(params)}

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": inner.state_dict(), "grad_queue": {...}}``.

        Queue state tensors are returned by reference, as torch optimizers do (copy them, e.g.
        with ``copy.deepcopy``, to keep a snapshot while training goes on).
        """
        index = self._index()
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {
            "optimizer": self.optimizer.state_dict(),
            "grad_queue": {
                "state": state,
                "clock": dict(self._clock),
                "statistics": self.defaults["statistics"],
                "q_max": self.defaults["q_max"],
                "num_skipped_steps": self.num_skipped_steps,
                "generator": self._generator.get_state(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the inner optimizer and the queue (checked before anything changes)."""
        if not (isinstance(state_dict, dict) and {"optimizer", "grad_queue"} <= set(state_dict)):
            raise ValueError(
                "GradQueue.load_state_dict expects the dict of GradQueue.state_dict() with keys "
                "'optimizer' and 'grad_queue'"
            )
        gqs = state_dict["grad_queue"]
        d = self.defaults
        if gqs["statistics"] != d["statistics"] or gqs["q_max"] != d["q_max"]:
            raise ValueError(
                f"state was saved with statistics={gqs['statistics']!r}, q_max={gqs['q_max']!r}; "
                f"this GradQueue has statistics={d['statistics']!r}, q_max={d['q_max']!r}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in gqs["state"].items():
            if not (isinstance(i, int) and 0 <= i < len(params)):
                raise ValueError(
                    f"state_dict holds state for parameter {i!r}; there are {len(params)}"
                )
            p = params[i]
            for key, v in s.items():
                want = (d["q_max"], *p.shape) if key == "queue" else tuple(p.shape)
                if isinstance(v, Tensor) and tuple(v.shape) != want:
                    raise ValueError(
                        f"state {key!r} of parameter {i} has shape {tuple(v.shape)}, "
                        f"expected {want}"
                    )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.state = defaultdict(dict)
        for i, s in gqs["state"].items():
            p = params[i]
            self.state[p] = {
                k: v.detach().to(device=p.device, dtype=p.dtype).clone()
                if isinstance(v, Tensor)
                else v
                for k, v in s.items()
            }
        self._clock = dict(gqs["clock"])
        self.num_skipped_steps = int(gqs["num_skipped_steps"])
        self._generator.set_state(gqs["generator"])
        self._pending, self._pending_loss = None, None


GradQueue.__doc__ = GradQueue.__doc__.replace("{nonfinite}", _nonfinite_doc).replace(
    "{foreach}", _foreach_doc
)


# ---------------------------------------------------------------------------------------------
# the readable reference (one tensor at a time, the model's pure functions) and the foreach path


def _single_tensor_grad_queue(
    grad: Tensor,
    st: dict[str, Any],
    queue_length: int,
    d: dict[str, Any],
    clusters: tuple[Tensor, Tensor] | None,
) -> None:
    """Score ``grad`` (or the cluster gradients) against the queue, push, rewrite ``grad``."""
    gq = _gq()
    w = dict(
        min_amplification=d["min_amplification"],
        max_amplification=d["max_amplification"],
        sharpness=d["sharpness"],
    )
    ema = d["statistics"] == "ema"
    if not ema:
        while st["count"] > queue_length:
            _evict_oldest(st)
    raw = grad.detach().clone()
    new = None
    if st["count"] >= 2:
        if ema:
            n = min(st["count"], queue_length)
            mean, scale = st["mean"], st["var"].sqrt()
        else:
            n = st["count"]
            mean, scale = gq.queue_moments(st["shift"], st["total"], st["total_sq"], n)
        scale = gq.predictive_scale(scale, n, d["predictive"])
        dof = n - 1.0 if d["predictive"] == "student" else None
        if clusters is None:
            new = gq.amplify(raw, mean, scale, eps=d["eps"], dof=dof, **w)
        else:
            g_c, sizes = clusters
            if d["cluster_scaling"]:
                scale = gq.cluster_scale(scale, sizes, int(sizes.sum()))
            delta = gq.amplification_weight(gq.scarcity(g_c, mean, scale, d["eps"], dof), **w)
            new = gq.combine_cluster_gradients(g_c, sizes, delta, d["combine"])
    elif clusters is not None and d["combine"] == "normalized":
        new = gq.combine_cluster_gradients(clusters[0], clusters[1], None, "normalized")
    if ema:
        if st["count"] == 0:
            st["mean"].copy_(raw)
        else:
            m, v = gq.ema_moments(st["mean"], st["var"], raw, gq.ema_decay(queue_length))
            st["mean"].copy_(m)
            st["var"].copy_(v)
        st["count"] += 1
    else:
        if st["count"] >= queue_length:
            _evict_oldest(st)
        _push(st, raw, d["refresh_every"])
    if new is not None:
        if d["preserve_norm"]:  # keep the direction change, undo the change of length
            new = new * (raw.norm() / new.norm().clamp_min(torch.finfo(new.dtype).tiny))
        grad.copy_(new)


def _evict_oldest(st: dict[str, Any]) -> None:
    gq = _gq()
    cap = st["queue"].shape[0]
    old = st["queue"][(st["head"] - st["count"]) % cap]
    t, t2 = gq.queue_evict(st["shift"], st["total"], st["total_sq"], old)
    st["total"].copy_(t)
    st["total_sq"].copy_(t2)
    st["count"] -= 1


def _push(st: dict[str, Any], grad: Tensor, refresh_every: int) -> None:
    gq = _gq()
    cap = st["queue"].shape[0]
    if st["count"] == 0:
        st["shift"].copy_(grad)  # an exactly constant stream then has exactly zero deviation
    st["queue"][st["head"]].copy_(grad)
    t, t2 = gq.queue_push(st["shift"], st["total"], st["total_sq"], grad)
    st["total"].copy_(t)
    st["total_sq"].copy_(t2)
    st["head"] = (st["head"] + 1) % cap
    st["count"] += 1
    st["since_refresh"] += 1
    if st["since_refresh"] >= refresh_every:
        _refresh(st)


def _entries(st: dict[str, Any]) -> Tensor:
    cap = st["queue"].shape[0]
    idx = [(st["head"] - st["count"] + j) % cap for j in range(st["count"])]
    return st["queue"][idx]


def _refresh(st: dict[str, Any]) -> None:
    """Exact sums from the stored entries, shifted by their mean (kills accumulated rounding)."""
    entries = _entries(st)
    st["shift"].copy_(entries.mean(0))
    t, t2 = _gq().queue_sums(entries, st["shift"])
    st["total"].copy_(t)
    st["total_sq"].copy_(t2)
    st["since_refresh"] = 0


def _multi_tensor_grad_queue(
    grads: list[Tensor], states: list[dict[str, Any]], queue_length: int, d: dict[str, Any]
) -> None:
    """The foreach path of :func:`_single_tensor_grad_queue` (no clusters).

    Parameters are grouped by device, dtype and queue position (all equal unless some
    parameters missed steps); each group runs a fixed number of ``torch._foreach_*`` calls.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (g, st) in enumerate(zip(grads, states)):
        key = (g.device, g.dtype, st["count"], st.get("head", 0), st.get("since_refresh", 0))
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        gs = [grads[i] for i in idx]
        sts = [states[i] for i in idx]
        if d["statistics"] == "ema":
            _foreach_ema_group(gs, sts, queue_length, d)
        else:
            _foreach_queue_group(gs, sts, queue_length, d)


def _foreach_weights(
    gs: list[Tensor], means: list[Tensor], scales: list[Tensor], n: int, d: dict[str, Any]
) -> list[Tensor]:
    """Weights :math:`\\Delta` of the gradients ``gs`` given ``n`` entries (overwrites ``scales``).

    The same arithmetic as :func:`probopt.models.grad_queue.scarcity` and
    :func:`~probopt.models.grad_queue.amplification_weight`, one ``_foreach`` call per line.
    """
    student = d["predictive"] == "student"
    if student:
        torch._foreach_mul_(scales, math.sqrt(1.0 + 1.0 / n))
    torch._foreach_add_(scales, d["eps"])
    z = torch._foreach_sub(gs, means)
    torch._foreach_abs_(z)
    torch._foreach_div_(z, scales)
    if student:  # Wallace's transform of |t| with nu = n - 1 to a Normal deviate
        nu = n - 1.0
        torch._foreach_mul_(z, z)
        torch._foreach_div_(z, nu)
        torch._foreach_log1p_(z)
        torch._foreach_mul_(z, nu)
        torch._foreach_sqrt_(z)
        torch._foreach_mul_(z, (8.0 * nu + 1.0) / (8.0 * nu + 3.0))
    torch._foreach_div_(z, _SQRT2)
    torch._foreach_erf_(z)
    if d["sharpness"] != 1.0:
        torch._foreach_pow_(z, d["sharpness"])
    torch._foreach_mul_(z, d["max_amplification"] - d["min_amplification"])
    torch._foreach_add_(z, d["min_amplification"])
    return z


def _foreach_apply(gs: list[Tensor], weights: list[Tensor], d: dict[str, Any]) -> None:
    """``g <- weights * g`` in place, rescaled per tensor to the old norm with ``preserve_norm``."""
    if not d["preserve_norm"]:
        torch._foreach_mul_(gs, weights)
        return
    before = torch._foreach_norm(gs)
    torch._foreach_mul_(gs, weights)
    after = torch._foreach_norm(gs)
    for g, b, a in zip(gs, before, after):
        g.mul_(b / a.clamp_min(torch.finfo(a.dtype).tiny))


def _foreach_queue_group(
    gs: list[Tensor], sts: list[dict[str, Any]], queue_length: int, d: dict[str, Any]
) -> None:
    st0 = sts[0]
    shifts = [s["shift"] for s in sts]
    totals = [s["total"] for s in sts]
    totals_sq = [s["total_sq"] for s in sts]
    cap = st0["queue"].shape[0]

    def evict() -> None:
        slot = (st0["head"] - st0["count"]) % cap
        dev = torch._foreach_sub([s["queue"][slot] for s in sts], shifts)
        torch._foreach_sub_(totals, dev)
        torch._foreach_addcmul_(totals_sq, dev, dev, value=-1.0)
        for s in sts:
            s["count"] -= 1

    while st0["count"] > queue_length:
        evict()
    raw = [g.detach() for g in gs]
    weights = None
    n = st0["count"]
    if n >= 2:
        mean_d = torch._foreach_div(totals, float(n))
        var = torch._foreach_addcmul(totals_sq, totals, mean_d, value=-1.0)
        torch._foreach_clamp_min_(var, 0.0)
        torch._foreach_div_(var, float(n - 1))
        scales = torch._foreach_sqrt(var)
        torch._foreach_add_(mean_d, shifts)
        weights = _foreach_weights(raw, mean_d, scales, n, d)
    if st0["count"] >= queue_length:
        evict()
    if st0["count"] == 0:
        torch._foreach_copy_(shifts, raw)
    slot = st0["head"]
    torch._foreach_copy_([s["queue"][slot] for s in sts], raw)
    dev = torch._foreach_sub(raw, shifts)
    torch._foreach_add_(totals, dev)
    torch._foreach_addcmul_(totals_sq, dev, dev)
    for s in sts:
        s["head"] = (s["head"] + 1) % cap
        s["count"] += 1
        s["since_refresh"] += 1
        if s["since_refresh"] >= d["refresh_every"]:
            _refresh(s)
    if weights is not None:
        _foreach_apply(gs, weights, d)


def _foreach_ema_group(
    gs: list[Tensor], sts: list[dict[str, Any]], queue_length: int, d: dict[str, Any]
) -> None:
    means = [s["mean"] for s in sts]
    vars_ = [s["var"] for s in sts]
    raw = [g.detach() for g in gs]
    weights = None
    if sts[0]["count"] >= 2:
        n = min(sts[0]["count"], queue_length)
        weights = _foreach_weights(raw, means, torch._foreach_sqrt(vars_), n, d)
    if sts[0]["count"] == 0:
        torch._foreach_copy_(means, raw)
    else:
        decay = _gq().ema_decay(queue_length)
        delta = torch._foreach_sub(raw, means)
        torch._foreach_add_(means, delta, alpha=1.0 - decay)
        torch._foreach_mul_(delta, delta)
        torch._foreach_add_(vars_, delta, alpha=1.0 - decay)
        torch._foreach_mul_(vars_, decay)
    for s in sts:
        s["count"] += 1
    if weights is not None:
        _foreach_apply(gs, weights, d)
