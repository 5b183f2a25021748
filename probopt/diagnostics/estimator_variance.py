r"""Design-based variance of a gradient estimator, estimated from each recorded minibatch.

An :class:`EstimatorRecorder` (made by :class:`~probopt.diagnostics.Recorder` with
``estimator=``) wraps one estimator instance's ``backward``. At a recorded step it computes the
per-example gradients :math:`y_k = g_k(\theta)`, :math:`k \in s`, of the chosen parameters (one
vmapped backward, :func:`~probopt.sampling.per_example_grads`, after the estimator's own
backward and with the same :math:`\theta`), and records the trace of two estimated design
variances on *the same batch*:

* ``uniform_variance``: the plain minibatch mean under simple random sampling without
  replacement, :math:`\frac{1-f}{n}\operatorname{tr} s_y^2`
  (:func:`~probopt.sampling.srs_variance`);
* ``variance``: the estimator's own, by an adapter per estimator class (:data:`ADAPTERS`):

  - uniform (:class:`~probopt.sampling.GradientEstimator` itself): ``uniform_variance``;
  - :class:`~probopt.sampling.GREGEstimator`: :func:`~probopt.sampling.greg_variance` with the
    batch's :math:`h_k`, :math:`\bar h_U` and ridge (g-weighted residuals; with ``clip`` set it
    ignores the clipping);
  - :class:`~probopt.sampling.DifferenceEstimator`: :math:`\frac{1-f}{n}\operatorname{tr}
    s_e^2` of the residuals :math:`e_k = y_k - \hat B^\top h_k` with the :math:`\hat B` the
    estimator used (before its refit); uncorrected parameters keep :math:`e_k = y_k`
    (:func:`~probopt.sampling.difference_variance` under SRS);
  - :class:`~probopt.sampling.CachedGradientEstimator`: the same with :math:`e_k = y_k -
    \beta_L \tilde g_k`, the cached last-visit gradients and the layer coefficients as they
    were before the backward;
  - :class:`~probopt.sampling.importance.ImportanceEstimator` (PPS with replacement):
    :func:`~probopt.sampling.hansen_hurwitz_variance`, and as the uniform baseline
    :func:`hansen_hurwitz_uniform_variance` (the plain mean's SRSWOR variance, estimated
    without bias from the PPS draws); batch and design importance-weight diagnostics;
  - :class:`~probopt.sampling.importance.PresampleImportanceEstimator` (a two-stage design):
    NaN for both variances; the weights are recorded;
  - any other class: NaN (register a :class:`VarianceAdapter` in :data:`ADAPTERS`).

Their ratio is the estimated variance gain of the estimator on that batch. The auxiliary rows
:math:`h_k`, :math:`\bar h_U` and :math:`\hat B` are read *before* the estimator's backward,
because cached auxiliary tables and the working model are updated by it. Per-example gradients are
computed with torch's random state forked, so recording does not change training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from probopt.diagnostics.recorder import _Buffer

__all__ = [
    "ADAPTERS",
    "EstimatorRecorder",
    "VarianceAdapter",
    "hansen_hurwitz_uniform_variance",
]


class VarianceAdapter:
    """How to estimate one estimator class's design variance from a batch.

    ``before`` reads what the estimator will use (before its backward changes it); ``variance``
    gets that context, the per-example gradients ``y`` ``(n, P)`` and the names and widths of
    their column blocks, and returns the trace of the estimated variance of the estimator's mean
    gradient (restricted to those columns). The base class is the plain mean under SRSWOR.
    """

    def before(
        self, est: Any, model: nn.Module, x: Tensor, y: Tensor, index: Tensor
    ) -> dict[str, Any]:
        return {}

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        return _srs(grads, est.population_size)

    def uniform_variance(self, est: Any, ctx: dict[str, Any], grads: Tensor) -> float:
        """The plain minibatch mean's variance (SRSWOR) estimated from this batch."""
        return _srs(grads, est.population_size)

    def importance(self, est: Any, step: int) -> dict[str, Any] | None:
        """Importance weights of the batch (``log_weights``) and design-level diagnostics, or
        None for estimators without weights."""
        return None


def _srs(grads: Tensor, population_size: int) -> float:
    from probopt.sampling import srs_variance

    if grads.shape[0] < 2:
        return math.nan
    return float(srs_variance(grads.double(), population_size, trace=True))


class _Unknown(VarianceAdapter):
    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        return math.nan


class _GREG(VarianceAdapter):
    def before(
        self, est: Any, model: nn.Module, x: Tensor, y: Tensor, index: Tensor
    ) -> dict[str, Any]:
        aux = est.auxiliary
        return {
            "h": aux(x, y, index).detach().clone(),
            "hbar": aux.population_mean.detach().clone(),
            "index": index.detach().cpu().clone(),
        }

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        from probopt.sampling import SimpleRandomSampling, greg_variance

        n, big_n = grads.shape[0], est.population_size
        if n < 2:
            return math.nan
        h = ctx["h"].double()
        if h.shape[1] == 1:  # intercept only: the plain mean
            return _srs(grads, big_n)
        design = SimpleRandomSampling(big_n, n)
        index = ctx["index"]
        pi = design.inclusion_probabilities()[index].double()
        pij = design.joint_inclusion_probabilities(index).double()
        v = greg_variance(
            grads.double(), h, ctx["hbar"].double(), pi, pij, big_n, ridge=est.ridge, trace=True
        )
        return float(v)


class _Difference(VarianceAdapter):
    def before(
        self, est: Any, model: nn.Module, x: Tensor, y: Tensor, index: Tensor
    ) -> dict[str, Any]:
        named = dict(model.named_parameters())
        return {
            "h": est.auxiliary(x, y, index).detach().clone(),
            "coef": est.linear_model.coef.detach().clone(),
            "widths": [(n, named[n].numel()) for n in est.params],  # the columns of coef
        }

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        pred = ctx["h"].double() @ ctx["coef"].double()  # (n, columns of the corrected params)
        cols, start = {}, 0
        for name, width in ctx["widths"]:
            cols[name] = (start, width)
            start += width
        resid, start = grads.double().clone(), 0
        for name, width in blocks:
            if name in cols:
                s, w = cols[name]
                resid[:, start : start + width] -= pred[:, s : s + w]
            start += width
        # HT on the residuals under SRSWOR (difference_variance) is (1 - f)/n s_e^2
        return _srs(resid, est.population_size)


class _Cached(VarianceAdapter):
    """:class:`~probopt.sampling.CachedGradientEstimator`: the difference estimator whose
    prediction is :math:`\beta_L \tilde g_k`, each example's cached last-visit gradient of a
    dense layer times the layer's coefficient (both read before the backward, which updates
    them)."""

    def before(
        self, est: Any, model: nn.Module, x: Tensor, y: Tensor, index: Tensor
    ) -> dict[str, Any]:
        modules = dict(model.named_modules())
        chosen = set(est.params)
        layers = {}
        for lname, coef in est.coef.items():
            a, d = est.table.rows(lname, index)
            prefix = f"{lname}." if lname else ""
            layers[lname] = {
                "a": a.detach().clone(),
                "d": d.detach().clone(),
                "coef": float(coef),
                "weight": f"{prefix}weight" if f"{prefix}weight" in chosen else None,
                "bias": (f"{prefix}bias" if modules[lname].bias is not None
                         and f"{prefix}bias" in chosen else None),
            }  # fmt: skip
        return {"layers": layers}

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        preds: dict[str, Tensor] = {}
        for layer in ctx["layers"].values():
            a, d, coef = layer["a"].double(), layer["d"].double(), layer["coef"]
            if layer["weight"] is not None:  # g~_k = delta~_k a~_k^T, row-major (out, in)
                preds[layer["weight"]] = coef * (d[:, :, None] * a[:, None, :]).flatten(1)
            if layer["bias"] is not None:
                preds[layer["bias"]] = coef * d
        resid, start = grads.double().clone(), 0
        for name, width in blocks:
            if name in preds:
                resid[:, start : start + width] -= preds[name]
            start += width
        return _srs(resid, est.population_size)


def hansen_hurwitz_uniform_variance(grads: Tensor, weights: Tensor, population_size: int) -> float:
    r"""Unbiased estimate, from a with-replacement PPS sample, of the variance (trace) the plain
    minibatch mean would have under SRSWOR of the same size.

    With Hansen–Hurwitz weights :math:`w_i = 1/(b N q_{k_i})`, :math:`\hat\mu = \sum_i w_i g_i`
    and :math:`\hat V_{HH}` its variance estimator,
    :math:`\widehat{N^{-1}\sum_U \lVert g_k\rVert^2} = \sum_i w_i \lVert g_i\rVert^2` and
    :math:`\widehat{\lVert\mu\rVert^2} = \lVert\hat\mu\rVert^2 - \operatorname{tr}\hat
    V_{HH}` are unbiased, so

    .. math::
        \hat V_{unif} = \frac{N - b}{N - 1}\,\frac{1}{b}\Big(\sum_i w_i\lVert g_i\rVert^2
        - \lVert\hat\mu\rVert^2 + \operatorname{tr}\hat V_{HH}\Big)

    is unbiased for :math:`\frac{1-f}{b} S^2` (tested by enumeration).

    Example:
        >>> g = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # 2 draws, uniform q = 1/4
        >>> round(hansen_hurwitz_uniform_variance(g, torch.tensor([0.5, 0.5]), 4), 6)
        0.666667
    """
    from probopt.sampling import hansen_hurwitz_variance

    b, big_n = grads.shape[0], population_size
    if b < 2:
        return math.nan
    g = grads.double()
    w = weights.to(g)
    q = 1.0 / (b * big_n * w)
    v_hh = float(hansen_hurwitz_variance(g, q, big_n, trace=True))
    second = float((w * g.pow(2).sum(1)).sum())
    mu = (w[:, None] * g).sum(0)
    sigma2 = second - float(mu.pow(2).sum()) + v_hh
    return (big_n - b) / (big_n - 1) * sigma2 / b if big_n > 1 else math.nan


class _Importance(VarianceAdapter):
    """:class:`~probopt.sampling.importance.ImportanceEstimator`: PPS with replacement, HH."""

    def _q(self, est: Any, n: int) -> Tensor:
        return 1.0 / (n * est.population_size * est.last_weights.double())

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        from probopt.sampling import hansen_hurwitz_variance

        n = grads.shape[0]
        if n < 2:
            return math.nan
        q = self._q(est, n)
        return float(hansen_hurwitz_variance(grads.double(), q, est.population_size, trace=True))

    def uniform_variance(self, est: Any, ctx: dict[str, Any], grads: Tensor) -> float:
        return hansen_hurwitz_uniform_variance(grads, est.last_weights, est.population_size)

    def importance(self, est: Any, step: int) -> dict[str, Any] | None:
        out = _batch_weights(est)
        diag = est.weight_diagnostics(
            num_draws=4000, generator=torch.Generator().manual_seed(step), warn=False
        )
        out.update(design_ess=diag.ess_fraction, design_khat=diag.khat)
        return out


class _Presample(VarianceAdapter):
    """:class:`~probopt.sampling.importance.PresampleImportanceEstimator`: a two-stage design
    (a uniform presample, then PPS within it) whose variance estimator is not implemented: NaN;
    the weights are recorded."""

    def variance(
        self, est: Any, ctx: dict[str, Any], grads: Tensor, blocks: list[tuple[str, int]]
    ) -> float:
        return math.nan

    def uniform_variance(self, est: Any, ctx: dict[str, Any], grads: Tensor) -> float:
        return math.nan

    def importance(self, est: Any, step: int) -> dict[str, Any] | None:
        return _batch_weights(est)


def _batch_weights(est: Any) -> dict[str, Any]:
    w = est.last_weights.detach().double().cpu()
    return {"log_weights": w.log().numpy(), "active": int(bool(est.active))}


#: Estimator class -> adapter (looked up along the class's MRO).
ADAPTERS: dict[type, VarianceAdapter] = {}


def _adapter_for(est: Any) -> VarianceAdapter:
    if not ADAPTERS:
        from probopt.sampling import CachedGradientEstimator, DifferenceEstimator, GREGEstimator
        from probopt.sampling.gradient_estimator import GradientEstimator, UniformEstimator

        ADAPTERS.update(
            {
                GradientEstimator: VarianceAdapter(),
                UniformEstimator: VarianceAdapter(),
                GREGEstimator: _GREG(),
                DifferenceEstimator: _Difference(),
                CachedGradientEstimator: _Cached(),
            }
        )
        try:
            from probopt.sampling.importance import (
                ImportanceEstimator,
                PresampleImportanceEstimator,
            )
        except ImportError:  # pragma: no cover - the module is part of probopt.sampling
            pass
        else:
            ADAPTERS[ImportanceEstimator] = _Importance()
            ADAPTERS[PresampleImportanceEstimator] = _Presample()
    cls = type(est)
    if cls in ADAPTERS:
        return ADAPTERS[cls]
    for base in cls.__mro__[1:]:
        # a subclass that overrides backward is a different estimator: do not guess
        if base in ADAPTERS and "backward" not in cls.__dict__:
            return ADAPTERS[base]
    return _Unknown()


class EstimatorRecorder:
    """Wraps ``estimator.backward`` on the instance and records, at its own stride, the batch
    loss, the two design variances and importance weights (see the module docstring).

    Made by :class:`~probopt.diagnostics.Recorder`; ``step`` numbers are those of the optimizer
    step that follows the backward.
    """

    def __init__(
        self,
        recorder: Any,
        estimator: Any,
        *,
        every: int,
        capacity: int,
        buffer: str,
        params: Any = None,
    ) -> None:
        if not callable(getattr(estimator, "backward", None)):
            raise TypeError(f"estimator has no backward method: {type(estimator).__name__}")
        self.recorder = recorder
        self.estimator = estimator
        self.params = params
        self.adapter = _adapter_for(estimator)
        self._buf = _Buffer(every, capacity, buffer)
        self._orig: Callable[..., Any] | None = None
        self._had_instance_attr = False
        self._names: list[str] | None = None

    def attach(self) -> None:
        if self._orig is not None:
            return
        est = self.estimator
        self._had_instance_attr = "backward" in est.__dict__
        self._orig = est.backward
        est.backward = self._backward

    def detach(self) -> None:
        if self._orig is None:
            return
        est = self.estimator
        if self._had_instance_attr:
            est.backward = self._orig
        else:
            del est.backward
        self._orig = None

    @property
    def every(self) -> int:
        return self._buf.every

    def _resolve(self, model: nn.Module) -> list[str]:
        from probopt.sampling.per_example import select_parameters

        if self._names is None:
            if self.params is None:
                ids = {id(t.param) for t in self.recorder._tracked}
                names = [n for n, p in model.named_parameters() if id(p) in ids and p.requires_grad]
                self._names = names or select_parameters(model, None)
            else:
                self._names = select_parameters(model, self.params)
        return self._names

    def _backward(
        self, model: nn.Module, loss_fn: Callable[..., Tensor], x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        assert self._orig is not None
        step = self.recorder.step + 1
        if not self._buf.wants(step):
            return self._orig(model, loss_fn, x, y, index)
        est = self.estimator
        ctx = self.adapter.before(est, model, x, y, index)
        loss = self._orig(model, loss_fn, x, y, index)
        names = self._resolve(model)
        named = dict(model.named_parameters())
        blocks = [(n, named[n].numel()) for n in names]
        from probopt.sampling import per_example_grads

        with torch.random.fork_rng(devices=[]):
            grads = per_example_grads(model, loss_fn, x, y, params=names, flat=True).detach()
        record = {
            "loss": float(loss),
            "uniform_variance": float(self.adapter.uniform_variance(est, ctx, grads)),
            "variance": float(self.adapter.variance(est, ctx, grads, blocks)),
            "batch_size": int(x.shape[0]),
            "importance": self.adapter.importance(est, step),
        }
        self._buf.add(step, record)
        return loss

    # read-out
    def steps(self) -> list[int]:
        return [s for s, _ in self._buf.records]

    def array(self, key: str) -> np.ndarray:
        return np.array([r[key] for _, r in self._buf.records], dtype=float)

    def importance(self) -> dict[str, np.ndarray] | None:
        """``log_weights`` ``(steps, draws)`` (NaN-padded) and the per-step design diagnostics
        the adapter gave (``active``, ``design_ess``, ``design_khat``); None when the estimator
        has no weights."""
        rows = [r["importance"] for _, r in self._buf.records]
        if not any(r is not None for r in rows):
            return None
        width = max(len(r["log_weights"]) for r in rows if r is not None)
        out = {"log_weights": np.full((len(rows), width), np.nan)}
        keys = sorted({k for r in rows if r is not None for k in r} - {"log_weights"})
        for k in keys:
            out[k] = np.full(len(rows), np.nan)
        for i, r in enumerate(rows):
            if r is None:
                continue
            out["log_weights"][i, : len(r["log_weights"])] = r["log_weights"]
            for k in keys:
                out[k][i] = r.get(k, np.nan)
        return out
