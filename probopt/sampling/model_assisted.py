r"""Model-assisted gradient estimators for an unchanged optimizer (GREG and difference).

The training set is a finite population :math:`U` of size :math:`N`, the minibatch :math:`s` a
simple random sample without replacement of size :math:`n` (:math:`\pi_k = n/N`), the target
the full-data gradient :math:`\bar y_U = N^{-1}\sum_U g_k(\theta)`, and :math:`h_k \in
\mathbb{R}^q` auxiliary data known for every example (:mod:`probopt.sampling.auxiliary`). A
working model :math:`y_k \approx B^\top h_k` assists the estimator; the estimator stays (nearly)
design-unbiased whatever the model's quality, and its variance is that of the model's residuals.

Two ways to feed any torch optimizer, both :class:`~probopt.sampling.GradientEstimator`
subclasses:

* :class:`GREGEstimator` (Variant G): per-example loss weights :math:`w_k` computed from
  :math:`h` alone (the linear calibration weights of the GREG estimator); one ``backward`` of
  :math:`\sum_s w_k \ell_k` leaves :math:`\sum_s w_k g_k = \hat{\bar y}_{GREG}` in ``.grad``.
  No per-example gradient, one :math:`q \times q` solve per step.
* :class:`DifferenceEstimator` (Variant D): the ordinary minibatch mean gradient plus the
  correction :math:`\hat B^\top(\bar h_U - \bar h_s)` added into ``.grad`` of the chosen
  parameters (the last layer by default), :math:`\hat B` fitted on *past* batches only, so the
  estimate is exactly unbiased conditional on the past.

A training loop stays a few lines (:func:`train_epoch` is that loop)::

    est = make_estimator("difference-lastlayer")
    est.setup(model, x_train, y_train)
    for epoch in range(epochs):
        train_epoch(model, optimizer, est, loss_fn, x_train, y_train, batch_size)

:func:`make_estimator` builds the registered variants by name (:data:`ESTIMATOR_NAMES`).

References:
    Pohjankukka & Heikkonen, `Stochastic Gradient Optimization with Model-Assisted Sampling
    <https://arxiv.org/abs/2606.27171>`_, 2026.
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992 (§6.4–6.7 the
    difference and regression estimators).
    Deville & Särndal, `Calibration Estimators in Survey Sampling
    <https://doi.org/10.1080/01621459.1992.10475217>`_, JASA, 1992.

.. note::
    The paper's full text was not available to us (``shared/notes/model_assisted.md``). The
    abstract fixes the framework (finite population, design-based minibatch estimate, auxiliary
    gradient-prediction models, uniform sampling as the no-information special case, any
    optimizer). The design (SRSWOR), the two estimator forms, the auxiliary choices, the online
    ridge/forgetting fit, the refit period and the weight clipping are ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from probopt.sampling.auxiliary import (
    Auxiliary,
    GradientFactorTable,
    Intercept,
    OnlineLinearModel,
    make_auxiliary,
)
from probopt.sampling.estimators import greg_weights
from probopt.sampling.gradient_estimator import GradientEstimator, LossFn, UniformEstimator
from probopt.sampling.per_example import (
    LinearGradCapture,
    ParamSpec,
    flatten_grads,
    grad_norms,
    per_example_grads,
    select_parameters,
)

__all__ = [
    "ESTIMATOR_NAMES",
    "CachedGradientEstimator",
    "DifferenceEstimator",
    "GREGEstimator",
    "make_estimator",
    "train_epoch",
]


def _resolve_auxiliary(auxiliary: Auxiliary | str, k: int) -> tuple[Auxiliary, str]:
    if isinstance(auxiliary, Auxiliary):
        return auxiliary, auxiliary.name
    if isinstance(auxiliary, str):
        return make_auxiliary(auxiliary, k=k), auxiliary
    raise TypeError(f"auxiliary must be an Auxiliary or a name, got {type(auxiliary).__name__}")


def _check_ridge(ridge: float) -> None:
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"Invalid ridge: {ridge!r} (must be a finite number >= 0)")


class _NormCapture:
    """Capture per-example gradient norms of some Linear layers when the auxiliary needs them."""

    def __init__(self, model: nn.Module, params: ParamSpec, active: bool) -> None:
        self.cap = LinearGradCapture(model, params) if active else None

    def __enter__(self) -> _NormCapture:
        if self.cap is not None:
            self.cap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cap is not None:
            self.cap.__exit__(*exc)

    def norms(self, weights: float | Tensor) -> Tensor | None:
        return None if self.cap is None else grad_norms(self.cap.grads(weights))


class GREGEstimator(GradientEstimator):
    r"""Variant G: GREG (linear calibration) weights on the per-example losses.

    With :math:`d_k = N/n` and mean scale, let :math:`\bar h_s = n^{-1}\sum_s h_k`,
    :math:`M = n^{-1}\sum_s h_k h_k^\top + \rho I` and :math:`\lambda = M^{-1}(\bar h_U - \bar
    h_s)`. The calibration weights

    .. math::
        w_k = n^{-1}\,(1 + h_k^\top \lambda), \qquad \sum_s w_k h_k = \bar h_U,

    depend on :math:`h` only, and by linearity of the gradient

    .. math::
        \nabla_\theta \sum_s w_k \ell_k(\theta) = \sum_s w_k g_k
        = \bar y_s + \hat B^\top(\bar h_U - \bar h_s) = \hat{\bar y}_{GREG},

    the regression estimator with :math:`\hat B` fitted on the current batch for every gradient
    coordinate at once. With :math:`h_k = 1` all :math:`w_k = 1/n`: the plain mean.

    .. code-block:: text

        setup:   h̄_U ← mean_k h(z_k)                                  (auxiliary.fit)
        backward(s):
            H_s ← [h_k]_{k∈s};  w ← greg_weights(H_s, h̄_U, π = n/N, ridge = ρ)
            if clip: w ← clamp(w, a/n, b/n);  w ← w / Σ w
            (Σ_s w_k ℓ_k).backward()                                   # one backward
            auxiliary.observe(s, ...)                                  # cached tables

    Cost over a plain step: building :math:`H_s` (:math:`O(nq)`) and one :math:`q\times q`
    solve (:math:`O(nq^2 + q^3)`); no per-example gradient.

    Args:
        auxiliary: an :class:`~probopt.sampling.auxiliary.Auxiliary` or a name for
            :func:`~probopt.sampling.auxiliary.make_auxiliary` (default ``"onehot"``:
            post-stratification by class).
        k: PCA components for names that use PCA.
        ridge: :math:`\rho \ge 0` of :func:`~probopt.sampling.estimators.greg_weights`, added
            to the mean-scale moment matrix :math:`M`. The small default keeps :math:`M`
            invertible when a batch misses a class of a one-hot :math:`h` (the missing column
            then has no effect on the weights).
        clip: optional ``(a, b)``: clip :math:`n w_k` into :math:`[a, b]`, then renormalise to
            :math:`\sum w_k = 1` (so the bounds hold up to that one rescaling). Bounds the
            influence of one example when :math:`q` is not small against :math:`n`.
        norm_params: parameters whose per-example gradient norms feed a
            :class:`~probopt.sampling.auxiliary.CachedGradNorm` table (only then captured).

    .. note::
        Clipping is ours (the paper's text was not available). After clipping only the intercept
        constraint :math:`\sum w_k = 1` holds exactly; the other calibration equations hold
        approximately, and the estimator moves between GREG and the plain mean.

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> net = nn.Linear(3, 2)
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> est = GREGEstimator("onehot")
        >>> est.setup(net, x, t)
        >>> idx = next(est.epoch_batches(8, torch.Generator().manual_seed(0)))
        >>> loss = est.backward(net, loss_fn, x[idx], t[idx], idx)
        >>> round(est.last_weights.sum().item(), 4), net.weight.grad.shape
        (1.0, torch.Size([2, 3]))
    """

    def __init__(
        self,
        auxiliary: Auxiliary | str = "onehot",
        *,
        k: int = 8,
        ridge: float = 1e-6,
        clip: tuple[float, float] | None = None,
        norm_params: ParamSpec = "last",
    ) -> None:
        _check_ridge(ridge)
        if clip is not None:
            a, b = clip
            if not (math.isfinite(a) and math.isfinite(b) and a < 1.0 < b):
                raise ValueError(f"Invalid clip: {clip!r} (need finite a < 1 < b)")
        self.auxiliary, aux_name = _resolve_auxiliary(auxiliary, k)
        self.name = f"greg-{aux_name}"
        self.ridge = float(ridge)
        self.clip = clip
        self.norm_params = norm_params
        self.last_weights: Tensor | None = None

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        super().setup(model, x, y)
        self.auxiliary.fit(x, y)

    def weights(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """The (possibly clipped) calibration weights :math:`w_k` of a batch, mean scale."""
        h = self.auxiliary(x, y, index)
        n = h.shape[0]
        if isinstance(self.auxiliary, Intercept):
            return torch.full((n,), 1.0 / n, dtype=h.dtype, device=h.device)
        pi = torch.full((n,), n / self.population_size, dtype=h.dtype, device=h.device)
        w = greg_weights(
            h, self.auxiliary.population_mean, pi, self.population_size, ridge=self.ridge
        )
        if self.clip is not None:
            w = w.clamp(self.clip[0] / n, self.clip[1] / n)
            w = w / w.sum()
        return w

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        w = self.weights(x, y, index).detach()
        self.last_weights = w
        with _NormCapture(model, self.norm_params, "grad_norms" in self.auxiliary.needs) as cap:
            outputs = model(x)
            losses = loss_fn(outputs, y)
            if isinstance(self.auxiliary, Intercept):  # w_k = 1/n: the plain mean, bit for bit
                losses.mean().backward()
            else:
                (w.to(losses.dtype) * losses).sum().backward()
        self.auxiliary.observe(
            index, x, y, losses=losses.detach(), outputs=outputs.detach(),
            grad_norms=cap.norms(w),
        )  # fmt: skip
        return losses.mean().detach()

    def __repr__(self) -> str:
        return f"GREGEstimator({self.auxiliary!r}, ridge={self.ridge}, clip={self.clip})"


class DifferenceEstimator(GradientEstimator):
    r"""Variant D: minibatch mean plus an auxiliary model's correction, model fit on past batches.

    With a prediction :math:`\hat y_k = \hat B^\top h_k` that does not depend on the current
    batch, the difference estimator (mean scale, SRSWOR) is

    .. math::
        \hat{\bar y}_D = \bar h_U^\top \hat B + n^{-1}\sum_s (y_k - \hat B^\top h_k)
        = \bar y_s + \hat B^\top(\bar h_U - \bar h_s),

    design-unbiased for *any* such :math:`\hat B`, with variance
    :math:`\tfrac{1-f}{n} S_E^2`, :math:`S_E^2` the population covariance of the residuals
    :math:`y_k - \hat B^\top h_k`. Only the chosen parameters get the correction; the others keep
    the plain mean (also unbiased). :math:`\hat B` comes from
    :class:`~probopt.sampling.auxiliary.OnlineLinearModel` (ridge, exponential forgetting) on
    per-example gradients of earlier batches; with :math:`h_k = 1` the correction is exactly 0.

    .. code-block:: text

        setup:   h̄_U ← mean_k h(z_k);  B ← 0;  t ← 0
        backward(s):
            H_s ← [h_k]_{k∈s}
            mean_s ℓ_k .backward()                                    # ordinary step
            for chosen parameters: .grad += Bᵀ(h̄_U − mean(H_s))      # O(qp)
            if t mod K = 0:                                           # refit, after use
                G_s ← per-example gradients of the chosen parameters   (n × p)
                S_hh ← λ S_hh + H_sᵀH_s;  S_hg ← λ S_hg + H_sᵀG_s;  B ← solve
            auxiliary.observe(s, ...);  t ← t + 1

    Cost over a plain step: the correction :math:`O(qp)`; every ``refit_every`` steps the
    per-example gradients (free from the backward pass for ``nn.Linear`` parameters via
    :class:`~probopt.sampling.per_example.LinearGradCapture`, :math:`O(np)`; otherwise one
    vmapped backward), the statistics :math:`O(nq^2 + nqp)` and the solve
    :math:`O(q^3 + q^2p)`.

    Args:
        auxiliary: an :class:`~probopt.sampling.auxiliary.Auxiliary` or a name for
            :func:`~probopt.sampling.auxiliary.make_auxiliary` (default ``"residual-pca"``).
        k: PCA components for names that use PCA.
        params: which parameters get the correction (:data:`~probopt.sampling.per_example.
            ParamSpec`; default ``"last"``, the final ``nn.Linear``; ``None`` for all).
        ridge: relative ridge :math:`\rho` of the working model.
        forgetting: forgetting factor :math:`\lambda \in (0, 1]` per refit.
        refit_every: :math:`K`, steps between refits (per-example gradients are computed only
            then).
        per_example: ``"auto"`` (hooks when every chosen parameter is an ``nn.Linear`` one,
            ``torch.func`` otherwise), ``"hooks"`` or ``"func"``.

    Attributes:
        linear_model: the :class:`~probopt.sampling.auxiliary.OnlineLinearModel`.
        last_correction: the flat correction added at the last step.

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> est = DifferenceEstimator("pca", k=2)
        >>> est.setup(net, x, t)
        >>> for idx in est.epoch_batches(8, torch.Generator().manual_seed(0)):
        ...     net.zero_grad()
        ...     loss = est.backward(net, loss_fn, x[idx], t[idx], idx)
        >>> est.params, est.linear_model.coef.shape
        (['2.weight', '2.bias'], torch.Size([3, 10]))
    """

    def __init__(
        self,
        auxiliary: Auxiliary | str = "residual-pca",
        *,
        k: int = 8,
        params: ParamSpec = "last",
        ridge: float = 1e-3,
        forgetting: float = 0.9,
        refit_every: int = 1,
        per_example: str = "auto",
    ) -> None:
        _check_ridge(ridge)
        if not (isinstance(forgetting, (int, float)) and 0.0 < forgetting <= 1.0):
            raise ValueError(f"Invalid forgetting: {forgetting!r} (must be in (0, 1])")
        if not (isinstance(refit_every, int) and refit_every >= 1):
            raise ValueError(f"Invalid refit_every: {refit_every!r} (must be an int >= 1)")
        if per_example not in ("auto", "hooks", "func"):
            raise ValueError(f"Invalid per_example: {per_example!r} (auto, hooks or func)")
        self.auxiliary, aux_name = _resolve_auxiliary(auxiliary, k)
        self.name = f"difference-{aux_name}"
        self.param_spec = params
        self.ridge = float(ridge)
        self.forgetting = float(forgetting)
        self.refit_every = refit_every
        self.per_example = per_example
        self.steps = 0
        self.last_correction: Tensor | None = None

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        super().setup(model, x, y)
        self.auxiliary.fit(x, y)
        self.params = select_parameters(model, self.param_spec)
        named = dict(model.named_parameters())
        p = sum(named[n].numel() for n in self.params)
        ref = named[self.params[0]]
        self.linear_model = OnlineLinearModel(
            self.auxiliary.dim, p, ridge=self.ridge, forgetting=self.forgetting,
            dtype=ref.dtype, device=ref.device,
        )  # fmt: skip
        method = self.per_example
        if method in ("auto", "hooks"):
            try:
                LinearGradCapture(model, self.params)
                method = "hooks"
            except ValueError:
                if self.per_example == "hooks":
                    raise
                method = "func"
        self._method = method
        self.steps = 0

    def correction(self, h_batch_mean: Tensor) -> Tensor:
        r"""The flat correction :math:`\hat B^\top(\bar h_U - \bar h_s)`, shape ``(p,)``."""
        return self.linear_model.predict(self.auxiliary.population_mean - h_batch_mean)

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        h = self.auxiliary(x, y, index)
        refit = self.steps % self.refit_every == 0
        hooks = refit and self._method == "hooks"
        need_norms = "grad_norms" in self.auxiliary.needs
        cap = LinearGradCapture(model, self.params) if hooks else None
        if cap is not None:
            cap.__enter__()
        try:
            outputs = model(x)
            losses = loss_fn(outputs, y)
            losses.mean().backward()
        finally:
            if cap is not None:
                cap.__exit__(None, None, None)
        corr = self.correction(h.mean(0))
        named = dict(model.named_parameters())
        start = 0
        for name in self.params:
            param = named[name]
            part = corr[start : start + param.numel()].view_as(param).to(param.dtype)
            start += param.numel()
            if param.grad is None:
                param.grad = part.clone()
            else:
                param.grad.add_(part)
        self.last_correction = corr
        g = None
        if refit:
            if cap is not None:
                grads = cap.grads(1.0 / x.shape[0])
            else:
                grads = per_example_grads(model, loss_fn, x, y, params=self.params)
            g = flatten_grads(grads)
            self.linear_model.update(h, g)
            self.linear_model.solve()
        self.auxiliary.observe(
            index, x, y, losses=losses.detach(), outputs=outputs.detach(),
            grad_norms=grad_norms(g) if (need_norms and g is not None) else None,
        )  # fmt: skip
        self.steps += 1
        return losses.mean().detach()

    def __repr__(self) -> str:
        return (
            f"DifferenceEstimator({self.auxiliary!r}, params={self.param_spec!r}, "
            f"ridge={self.ridge}, forgetting={self.forgetting}, refit_every={self.refit_every})"
        )


class CachedGradientEstimator(GradientEstimator):
    r"""Difference estimator whose prediction is each example's own last-visit gradient.

    The auxiliary "data" of example :math:`k` is its gradient :math:`\tilde g_k` from the last
    time it was in a batch (a table; SAGA's control variate), for the dense layers chosen, kept in
    factored form by :class:`~probopt.sampling.auxiliary.GradientFactorTable`. The working
    model is :math:`\hat y_k = \beta_L \tilde g_k` with one coefficient :math:`\beta_L` per
    layer, fitted on past batches by least squares with forgetting:

    .. math::
        \hat{\bar y}_D = \bar y_s + \beta_L\,(\bar{\tilde g}_U - \bar{\tilde g}_s), \qquad
        \beta_L = \frac{\sum_t \lambda^{age}\sum_{k\in s_t}\langle g_k - \bar g_{s_t},\,
        \tilde g_k - \bar{\tilde g}_{s_t}\rangle}{\sum_t \lambda^{age}\sum_{k\in s_t}
        \|\tilde g_k - \bar{\tilde g}_{s_t}\|^2}\ \text{clipped to } [0, 1].

    :math:`\bar{\tilde g}_U` is exact (maintained as rows change), the batch rows are read before
    they are overwritten, and :math:`\beta_L` uses earlier batches only, so the estimate is
    exactly unbiased conditional on the past. With ``coef=1.0`` it is SAGA's estimator with
    minibatches; :math:`\beta_L \to 0` gives the plain mean. The inner products come from the
    factors: :math:`\langle \delta a^\top, \tilde\delta \tilde a^\top\rangle = (\delta\cdot
    \tilde\delta)(a\cdot\tilde a)`.

    .. code-block:: text

        setup:   tables ã_k ← 0, δ̃_k ← 0;  T_W ← 0;  β_L ← 0
        backward(s):
            (mean_s ℓ_k).backward(), recording a_k, δ_k of each chosen layer   # hooks
            for each layer L:
                Ḡ_s ← mean_s δ̃_k ã_kᵀ;  .grad += β_L (T_W/N − Ḡ_s)           # correction
                update β_L's statistics with (a, δ) and (ã, δ̃);  β_L ← ratio
                T_W += Σ_s δ_k a_kᵀ − n Ḡ_s;  (ã, δ̃)_s ← (a, δ)_s               # table
        epoch_batches: T_W ← Σ_U δ̃_k ã_kᵀ recomputed once per epoch (rounding drift)

    Cost over a plain step: one :math:`n d_{in} d_{out}` product per layer (the cached rows'
    sum; the new rows' sum is the weight gradient itself when ``.grad`` was ``None`` before the
    call, as after ``zero_grad()``), :math:`O(n(d_{in}+d_{out}) + d_{in}d_{out})` for
    :math:`\beta` and the table; memory :math:`N(d_{in}+d_{out})` per layer.

    Args:
        params: dense parameters to correct (:data:`~probopt.sampling.per_example.ParamSpec`,
            every selected parameter must belong to an ``nn.Linear`` on 2-D inputs; default
            ``"linear"``, all of them).
        forgetting: forgetting factor of :math:`\beta`'s statistics (per statistics update).
        coef: ``None`` to fit :math:`\beta_L`, or a fixed number (``1.0``: SAGA's estimator).
        coef_every: steps between updates of :math:`\beta`'s statistics (each costs
            :math:`O(n(d_{in}+d_{out}) + d_{in}d_{out})` per layer).

    .. note::
        This auxiliary choice is ours, not from the notes' list of :math:`h` (the paper's text was
        not available); it is the difference estimator of §4.3 of
        ``shared/notes/model_assisted.md`` with the SAGA prediction of its §7 and a fitted
        coefficient. Only dense layers are covered; other parameters keep the plain mean.

    References:
        Defazio, Bach & Lacoste-Julien, `SAGA: A Fast Incremental Gradient Method With Support
        for Non-Strongly Convex Composite Objectives <https://arxiv.org/abs/1407.0202>`_, 2014.

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> est = CachedGradientEstimator()
        >>> est.setup(net, x, t)
        >>> for epoch in range(2):
        ...     for idx in est.epoch_batches(8, torch.Generator().manual_seed(epoch)):
        ...         net.zero_grad()
        ...         loss = est.backward(net, loss_fn, x[idx], t[idx], idx)
        >>> sorted(est.coef), all(0 <= b <= 1 for b in est.coef.values())
        (['0', '2'], True)
    """

    name = "difference-cached"

    def __init__(
        self,
        *,
        params: ParamSpec = "linear",
        forgetting: float = 0.9,
        coef: float | None = None,
        coef_every: int = 4,
    ) -> None:
        if not (isinstance(forgetting, (int, float)) and 0.0 < forgetting <= 1.0):
            raise ValueError(f"Invalid forgetting: {forgetting!r} (must be in (0, 1])")
        if not (isinstance(coef_every, int) and coef_every >= 1):
            raise ValueError(f"Invalid coef_every: {coef_every!r} (must be an int >= 1)")
        self.coef_every = coef_every
        self.steps = 0
        if coef is not None and not (isinstance(coef, (int, float)) and math.isfinite(coef)):
            raise ValueError(f"Invalid coef: {coef!r} (must be None or a finite number)")
        self.param_spec = params
        self.forgetting = float(forgetting)
        self.fixed_coef = coef

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        super().setup(model, x, y)
        self.params = select_parameters(model, self.param_spec)
        layers = LinearGradCapture(model, self.params).layers  # raises for non-dense params
        self._layers = list(layers)  # names only: the estimator holds no module reference
        ref = next(iter(layers.values())).weight
        self._static = self._layers_fed_by_input(model, layers, x)
        flat = x.reshape(x.shape[0], -1).to(ref.dtype)
        self.table = GradientFactorTable(
            self.population_size,
            {k: (m.out_features, m.in_features) for k, m in layers.items()},
            dtype=ref.dtype, device=ref.device,
            static_inputs={k: flat for k in self._static},
        )  # fmt: skip
        chosen = set(self.params)
        self._has = {k: (f"{k}.weight" if k else "weight") in chosen for k in layers}
        self._bias = {
            k: m.bias is not None and (f"{k}.bias" if k else "bias") in chosen
            for k, m in layers.items()
        }
        kw = {"dtype": ref.dtype, "device": ref.device}
        self._stats = {k: [torch.zeros((), **kw), torch.zeros((), **kw)] for k in self._layers}
        self.steps = 0
        start = 0.0 if self.fixed_coef is None else float(self.fixed_coef)
        self.coef: dict[str, Tensor] = {k: torch.tensor(start, **kw) for k in self._layers}
        """:math:`\beta_L` per layer name (0-dim tensors: no host synchronisation)."""

    def _capture(self, model: nn.Module) -> LinearGradCapture:
        """The hooks object for ``model``, built once (not copied with the estimator)."""
        cached = self.__dict__.get("_capture_cache")
        if cached is None or cached[0] is not model:
            cached = (model, LinearGradCapture(model, self.params))
            self.__dict__["_capture_cache"] = cached
        return cached[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_capture_cache", None)  # holds the model: never copy or pickle it
        return state

    @staticmethod
    def _layers_fed_by_input(model: nn.Module, layers: dict[str, nn.Linear], x: Tensor) -> set:
        """Layers that receive the network input itself (their ``a_k = x_k`` never changes)."""
        probe = x[:2]
        hit: set[str] = set()

        def hook(k: str) -> Callable[..., None]:
            return lambda _m, inp, _o: hit.add(k) if inp[0] is probe else None

        handles = [m.register_forward_hook(hook(k)) for k, m in layers.items()]
        try:
            with torch.no_grad():
                model(probe)
        finally:
            for h in handles:
                h.remove()
        return hit

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """SRSWOR batches as in the base class; the table's sums are recomputed exactly first
        (one :math:`N d_{in} d_{out}` product per layer per epoch, against rounding drift)."""
        self.table.resync()
        yield from super().epoch_batches(batch_size, generator)

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        n = x.shape[0]
        big_n = self.population_size
        cap = self._capture(model)
        layers = cap.layers
        # a weight whose .grad is None before the backward holds exactly the batch mean after
        # it, which saves recomputing sum_s delta_k a_k^T
        fresh_grad = {k: layers[k].weight.grad is None for k in self._layers}
        with cap:
            loss = loss_fn(model(x), y).mean()
            loss.backward()
        fit = self.fixed_coef is None and self.steps % self.coef_every == 0
        table = self.table
        for lname in self._layers:
            layer = layers[lname]
            a, gz = cap.factors[lname]
            d = gz * n  # per-example output gradients of the mean loss
            # a layer fed by the network input: the batch's own rows are the cached ones (the
            # GradientEstimator contract: x is x_train[index])
            a_old, d_old = table.rows(lname, index, a if lname in self._static else None)
            old_w, old_b = d_old.T @ a_old, d_old.sum(0)
            new_b = d.sum(0)
            # correction beta (T/N - old/n) = (beta/N) (T - (N/n) old), with the table and beta
            # as they were before this batch (taken before the table and beta are updated)
            scale = self.coef[lname] / big_n
            t_w, t_b, shift = table.sum_w[lname], table.sum_b[lname], -big_n / n
            corr_w = torch.add(t_w, old_w, alpha=shift) if self._has[lname] else None
            corr_b = torch.add(t_b, old_b, alpha=shift) if self._bias[lname] else None
            # the batch's own sum of delta a^T: the weight gradient times n when .grad was None
            # before the backward (and has no correction yet), else one product
            from_grad = fresh_grad[lname] and layer.weight.grad is not None
            new_w, new_scale = (layer.weight.grad, float(n)) if from_grad else (d.T @ a, 1.0)
            if fit:  # after the correction was taken: beta never sees the batch it corrects
                self._update_coef(lname, n, (a, d, new_w * new_scale, new_b),
                                  (a_old, d_old, old_w, old_b))  # fmt: skip
            table.write(index, {lname: (a, d)}, old_batch_sums={lname: (old_w, old_b)},
                        new_batch_sums={lname: (new_w, new_b)}, new_scale=new_scale)  # fmt: skip
            if corr_w is not None:
                layer.weight.grad.addcmul_(corr_w, scale)
            if corr_b is not None:
                layer.bias.grad.addcmul_(corr_b, scale)
        self.steps += 1
        return loss.detach()

    def _update_coef(
        self, lname: str, n: int, new: tuple[Tensor, ...], old: tuple[Tensor, ...]
    ) -> None:
        r"""Add the batch's centred cross and cached sums of squares to :math:`\beta_L`'s
        statistics, from the factors: :math:`O(n(d_{in}+d_{out}) + d_{in}d_{out})`."""
        a, d, new_w, new_b = new
        a_old, d_old, old_w, old_b = old
        wt = 1.0 if self._has[lname] else 0.0
        bias = 1.0 if self._bias[lname] else 0.0
        # sum_k <g_k, g~_k> = sum_k (d_k . d~_k)(a_k . a~_k + 1), and n <g_bar, g~_bar>
        cross = ((d * d_old).sum(1) * (wt * (a * a_old).sum(1) + bias)).sum()
        cross = cross - (wt * (new_w * old_w).sum() + bias * (new_b * old_b).sum()) / n
        own = ((d_old * d_old).sum(1) * (wt * (a_old * a_old).sum(1) + bias)).sum()
        own = own - (wt * old_w.pow(2).sum() + bias * old_b.pow(2).sum()) / n
        lam = self.forgetting
        s = self._stats[lname]
        s[0] = lam * s[0] + cross
        s[1] = lam * s[1] + own
        ratio = torch.where(s[1] > 0, s[0] / s[1].clamp_min(torch.finfo(s[1].dtype).tiny), 0.0)
        self.coef[lname] = ratio.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"CachedGradientEstimator(params={self.param_spec!r}, coef={self.fixed_coef})"


# --------------------------------------------------------------------------------------------
# the training helper and the registry


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    estimator: GradientEstimator,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """One epoch of the :class:`~probopt.sampling.GradientEstimator` loop; mean training loss.

    ``estimator.setup(model, x, y)`` must have been called once before the first epoch.

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> net = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> est = make_estimator("greg-onehot")
        >>> est.setup(net, x, t)
        >>> losses = [train_epoch(net, opt, est, loss_fn, x, t, 16) for _ in range(3)]
        >>> losses[-1] < losses[0]
        True
    """
    total, count = 0.0, 0
    for index in estimator.epoch_batches(batch_size, generator):
        optimizer.zero_grad()
        loss = estimator.backward(model, loss_fn, x[index], y[index], index)
        optimizer.step()
        estimator.after_step(model)
        total += float(loss)
        count += 1
    return total / max(count, 1)


_REGISTRY: dict[str, tuple[Callable[..., GradientEstimator], dict[str, Any]]] = {
    "uniform": (UniformEstimator, {}),
    "greg-onehot": (GREGEstimator, {"auxiliary": "onehot"}),
    "greg-pca": (GREGEstimator, {"auxiliary": "pca", "k": 4}),
    "greg-loss": (GREGEstimator, {"auxiliary": "onehot+loss"}),
    "difference-onehot": (DifferenceEstimator, {"auxiliary": "onehot", "refit_every": 4}),
    "difference-pca-class": (
        DifferenceEstimator,
        {"auxiliary": "pca-class", "k": 8, "refit_every": 4},
    ),
    "difference-lastlayer": (
        DifferenceEstimator,
        {"auxiliary": "residual-pca", "k": 8, "refit_every": 4},
    ),
    "difference-cached": (CachedGradientEstimator, {}),
}

#: Names accepted by :func:`make_estimator` (the CLI's ``--estimator`` choices).
ESTIMATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_estimator(name: str, **kwargs: Any) -> GradientEstimator:
    r"""Build a registered gradient estimator by name.

    =====================  =====================================================================
    name                   estimator
    =====================  =====================================================================
    uniform                plain minibatch mean (:class:`~probopt.sampling.UniformEstimator`)
    greg-onehot            :class:`GREGEstimator`, :math:`h` = class one-hot
                           (post-stratification by class)
    greg-pca               :class:`GREGEstimator`, :math:`h` = 4 PCA scores of the inputs
    greg-loss              :class:`GREGEstimator`, :math:`h` = class one-hot and cached loss
    difference-onehot      :class:`DifferenceEstimator` on the last layer, :math:`h` = class
                           one-hot, refit every 4 steps
    difference-pca-class   :class:`DifferenceEstimator` on the last layer, :math:`h` = class
                           one-hot ⊗ 8 PCA scores, refit every 4 steps
    difference-lastlayer   :class:`DifferenceEstimator` on the last layer, :math:`h` = cached
                           output error ⊗ 8 PCA scores, refit every 4 steps
    difference-cached      :class:`CachedGradientEstimator` on every dense layer: each
                           example's last-visit gradient with a fitted coefficient per layer
    =====================  =====================================================================

    Args:
        name: one of :data:`ESTIMATOR_NAMES`.
        **kwargs: override the variant's constructor arguments (e.g. ``ridge=1e-2``).

    Returns:
        the estimator, with ``estimator.name == name``.

    Example:
        >>> est = make_estimator("difference-lastlayer", refit_every=2)
        >>> est.name, est.refit_every
        ('difference-lastlayer', 2)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")
    cls, defaults = _REGISTRY[name]
    est = cls(**{**defaults, **kwargs})
    est.name = name
    return est
