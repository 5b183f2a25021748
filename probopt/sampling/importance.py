r"""Importance-sampled SGD: draws proportional to (stale) gradient norms, Hansen–Hurwitz weights.

**The model.** The training set is a finite population :math:`U = \{1..N\}` with per-example
gradients :math:`g_k`, and the target is :math:`\mu = N^{-1}\sum_U g_k`. A minibatch is
:math:`b` independent draws :math:`k_1..k_b` with probabilities :math:`q_k` (a PPS design with
replacement, :class:`~probopt.sampling.designs.PPSWithReplacement`), and the Hansen–Hurwitz
estimate

.. math::
    \hat\mu = \frac{1}{b}\sum_{i=1}^{b} \frac{g_{k_i}}{N q_{k_i}}, \qquad
    \operatorname{tr}\operatorname{Cov}\hat\mu = \frac{1}{b}\Big(\sum_U
    \frac{\lVert g_k\rVert^2}{N^2 q_k} - \lVert\mu\rVert^2\Big)

is unbiased for :math:`\mu` *over the whole population* whenever every :math:`q_k > 0`; the
trace is smallest at :math:`q_k \propto \lVert g_k\rVert` (Alain et al.). The norms are not
known when drawing: they come from a table of *stale* scores :math:`s_k` (the norm at the last
visit, or from scoring workers, :mod:`probopt.distributed`), smoothed and mixed with uniform
into the draw probabilities :math:`q_k = (1 - \lambda)(s_k + c)/\sum_U (s_l + c) + \lambda/N`
(:mod:`probopt.sampling.importance_design`). Every :math:`q_k > 0`, so staleness and smoothing
only change the variance, never the mean.

**The algorithm** (:class:`ImportanceEstimator`, the loop of
:class:`~probopt.sampling.GradientEstimator`)::

    input: N examples, batch size b, smoothing c, mixing λ, sweep r, momentum a_τ
    s ← NaN (N,) ; version ← 0 ; τ ← 0 ; τ_th ← (2r + 3b)/(3b) ; cursor ← 0
    for each step:
        q ← (1 − λ)(s + c)/Σ(s + c) + λ/N        if τ > τ_th   else 1/N        # the design
        draw k_1..k_b ~ q with replacement
        w_i ← 1 / (b N q_{k_i})                                              # Hansen–Hurwitz
        backward of Σ_i w_i ℓ_{k_i}      → .grad = μ̂ ; the dense identity gives ‖g_{k_i}‖
        s_{k_i} ← ‖g_{k_i}‖ (version)                                         # in-batch refresh
        optimizer.step() ; version ← version + 1
        s ← freshest of s and the scores workers published (with their version)
        if τ > τ_th:                                                         # the sweep
            s_{cursor..cursor+r} ← ‖g‖ at the new θ (version) ; cursor ← cursor + r (mod N)
        τ ← a_τ τ + (1 − a_τ) τ_new(s, q)                                    # Katharopoulos–Fleuret

Why the sweep: under importance sampling an example whose stored score is small is rarely drawn,
so its score is rarely refreshed; if its gradient grows meanwhile, the weight
:math:`1/(Nq_k)` multiplies a large gradient. Measured mid-training on MNIST-5k, the in-batch
refresh alone gave a design 2–7 times *worse* than uniform from epoch 5 on (at epoch 5 one
example whose stored score was 2·10⁵ times too small carried 84 % of the variance); a round-robin
sweep of :math:`r = b/2` examples per step (a local scoring worker, what Alain et al.'s remote
workers do) kept it within 5–40 % of the ideal from epoch 5 on, on digits, MNIST-5k and mnist1d
(``benchmarks/bench_importance_variance.py``).

Importance sampling is switched on only while it pays: the Katharopoulos–Fleuret :math:`\tau`
criterion, averaged over steps, exceeds the cost model's threshold
(:mod:`probopt.sampling.importance_tau`).

:class:`PresampleImportanceEstimator` is Katharopoulos & Fleuret's own algorithm: a uniform
presample of :math:`B = 3b` examples scored by a forward pass (the last-layer bound
:math:`\lVert \mathrm{softmax}(z) - e_y\rVert`), :math:`b` of them drawn proportionally.

Reliability of the weights (Kish ESS, PSIS Pareto :math:`\hat k`) and Alain et al.'s variance
monitor: :mod:`probopt.sampling.importance_weights`. Every public name of the three modules is
re-exported here.

References:
    Alain, Lamb, Sankar, Courville & Bengio, `Variance Reduction in SGD by Distributed Importance
    Sampling <https://arxiv.org/abs/1511.06481>`_, 2015.
    Katharopoulos & Fleuret, `Not All Samples Are Created Equal: Deep Learning with Importance
    Sampling <https://arxiv.org/abs/1803.00942>`_, ICML 2018.
    Hansen & Hurwitz, On the theory of sampling from finite populations, Ann. Math. Statist. 14,
    1943.

.. note::
    The full text of Alain et al. was not available to us; what is theirs here (the design
    :math:`q \propto \lVert g\rVert + c`, Hansen–Hurwitz weights, the dense-layer identity,
    the variance monitor, scoring workers) comes from the abstract and their code as read in
    ``shared/notes/importance.md``. Departures from that code: they give
    examples whose score is older than a time window probability 0, so their estimator is
    unbiased only for the mean over the recently scored subset; here every example keeps
    :math:`q_k > 0` (stale scores are used as they are, missing ones get the mean score) and the
    estimator is unbiased for the whole population. Their trainer did not score its own
    batches; ours refreshes the drawn examples from the training backward by default (the
    dense-layer identity, :mod:`probopt.sampling.scores`; ``refresh=False`` restores theirs).
    The sweep is ours (a scoring worker inside the trainer). The τ switch comes from
    Katharopoulos & Fleuret (whose code starts τ at 0 and uses :math:`a_\tau = 0.9`); applying
    it to a table of stale scores is ours, as is its default threshold, KF's cost model
    :math:`(B + 3b)/(3b)` with the sweep counted as :math:`B = 2r` forward passes (a forward and
    a backward to the layer outputs); the in-batch dense identity is paid in both modes and not
    counted (``benchmarks/bench_importance_norm_overhead.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from probopt.sampling.designs import PPSWithReplacement
from probopt.sampling.estimators import hansen_hurwitz_weights
from probopt.sampling.gradient_estimator import GradientEstimator, LossFn
from probopt.sampling.importance_design import (
    ScoreTable,
    _check_nonneg,
    _check_unit,
    _fill,
    _mix,
    draw_probabilities,
)
from probopt.sampling.importance_tau import TauCondition, _tau, tau, tau_threshold
from probopt.sampling.importance_weights import (
    ImportanceWeightWarning,
    TraceVariances,
    WeightDiagnostics,
    diagnose_weights,
    kish_ess,
    pareto_khat,
    trace_variances,
)
from probopt.sampling.per_example import ParamSpec
from probopt.sampling.scores import (
    SCORE_METHODS,
    DenseNormCapture,
    exact_grad_norms,
    score_examples,
)

__all__ = [
    "ESTIMATOR_NAMES",
    "ImportanceEstimator",
    "ImportanceWeightWarning",
    "PresampleImportanceEstimator",
    "ScoreTable",
    "TauCondition",
    "TraceVariances",
    "WeightDiagnostics",
    "diagnose_weights",
    "draw_probabilities",
    "kish_ess",
    "make_estimator",
    "pareto_khat",
    "tau",
    "tau_threshold",
    "trace_variances",
]

# --------------------------------------------------------------------------------------------
# validation


def _check_method(score: str) -> str:
    if score not in SCORE_METHODS:
        raise ValueError(f"Invalid score: {score!r}; choose one of {', '.join(SCORE_METHODS)}")
    return score


# --------------------------------------------------------------------------------------------
# the estimators


class _Pending(NamedTuple):
    index: Tensor  # (b,) drawn examples, CPU
    weights: Tensor  # (b,) float64 Hansen-Hurwitz loss weights


def _check_batch_size(batch_size: int, n: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")


class ImportanceEstimator(GradientEstimator):
    r"""Importance-sampled minibatches from a table of stale gradient norms (Alain et al.).

    The model, the algorithm box and the departures from the papers are in the module
    docstring. Each "epoch" is ``N // batch_size`` steps of ``batch_size`` draws with
    replacement. :meth:`backward` returns the Hansen–Hurwitz estimate of the mean loss (unbiased
    for the training loss), not the plain mean of the drawn losses.

    Args:
        score: how the drawn examples' norms are refreshed (:data:`~probopt.sampling.scores.\
SCORE_METHODS`): ``"auto"``/``"dense"`` from the training backward through the dense-layer
            identity (exact ``torch.func`` norms for uncovered parameters under ``"auto"``), the
            other methods by an extra call on the batch.
        smoothing: additive constant :math:`c` on the scores.
        uniform_mix: :math:`\lambda`, the share of uniform in :math:`q`.
        tau_threshold: importance sampling is used while the averaged :math:`\tau` exceeds it;
            ``None``: the cost model :math:`(2r + 3b)/(3b)` (1.0 means whenever it helps).
        tau_momentum: :math:`a_\tau`.
        refresh: refresh the drawn examples' scores from the training pass (``False``: only
            the sweep and the workers score, as in Alain et al.).
        sweep: :math:`r`, examples re-scored round robin after each importance-sampled step
            (and after every step when ``refresh=False``); ``None``: ``batch_size // 2``
            without workers, 0 with workers.
        workers: number of scoring workers (:class:`probopt.distributed.ScoringPool`); 0: none.
        backend: ``"local"`` (in-process, no Ray) or ``"ray"`` for the workers.
        sync_every: publish the parameters to the workers every this many steps.
        block_size: examples per worker scoring block.
        pool: a :class:`~probopt.distributed.ScoringPool` (overrides ``workers``, ...); started
            at the first step unless it already is (then with this network at version 0).
        params: which parameters' gradient norms are the scores (default all trainable ones).

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> est = ImportanceEstimator(uniform_mix=0.2, tau_threshold=1.0)
        >>> est.setup(net, x, t)
        >>> for epoch in range(3):
        ...     for index in est.epoch_batches(16, torch.Generator().manual_seed(epoch)):
        ...         opt.zero_grad()
        ...         loss = est.backward(net, loss_fn, x[index], t[index], index)
        ...         opt.step()
        ...         est.after_step(net)
        >>> est.table.coverage() > 0.5, est.version
        (True, 12)
    """

    name = "importance"

    def __init__(
        self,
        *,
        score: str = "auto",
        smoothing: float = 0.0,
        uniform_mix: float = 0.1,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
        refresh: bool = True,
        sweep: int | None = None,
        workers: int = 0,
        backend: str = "local",
        sync_every: int = 16,
        block_size: int = 256,
        pool: Any = None,
        params: ParamSpec = None,
    ) -> None:
        self.score = _check_method(score)
        self.smoothing = _check_nonneg("smoothing", smoothing)
        self.uniform_mix = _check_unit("uniform_mix", uniform_mix)
        self.fixed_threshold = tau_threshold
        self.tau_condition = TauCondition(1.0 if tau_threshold is None else tau_threshold,
                                          tau_momentum)  # fmt: skip
        self.refresh = bool(refresh)
        if sweep is not None and (isinstance(sweep, bool) or not isinstance(sweep, int)
                                  or sweep < 0):  # fmt: skip
            raise ValueError(f"Invalid sweep: {sweep!r} (must be an integer >= 0 or None)")
        self.sweep = sweep
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"Invalid workers: {workers!r} (must be an integer >= 0)")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"Invalid sync_every: {sync_every!r} (must be an integer >= 1)")
        if backend not in ("local", "ray"):
            raise ValueError(f"Invalid backend: {backend!r}; choose 'local' or 'ray'")
        self.workers, self.backend, self.sync_every = workers, backend, sync_every
        self.block_size = block_size
        self.pool = pool
        self.params = params
        self._pending: _Pending | None = None

    # -- set-up and the design ---------------------------------------------------------------

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        super().setup(model, x, y)
        self.table = ScoreTable(self.population_size)
        self.version = 0
        self.tau_condition.value = 0.0
        self._data = (x, y)
        self._pending = None
        self._cache: tuple[int, Tensor, Tensor] | None = None
        self._sweep_capture: DenseNormCapture | None = None
        self._loss_fn: LossFn | None = None
        self._cursor = 0
        self.sweep_size = 0 if self.sweep is None else self.sweep
        if self.pool is None and self.workers > 0:
            from probopt.distributed import ScoringPool

            self.pool = ScoringPool(
                self.workers, backend=self.backend, method=self.score, block_size=self.block_size
            )
        self._pool_started = False
        self._hooks = self.refresh and self.score in ("auto", "dense")
        self._capture: DenseNormCapture | None = None
        if self._hooks and model is not None:
            self._capture = DenseNormCapture(model, self.params)

    def probabilities(self) -> Tensor:
        """The importance design :math:`q` from the current table (whether or not it is on)."""
        return self._design()[1].clone()

    def _design(self) -> tuple[Tensor, Tensor]:
        """(filled scores, q), recomputed only when the table changed."""
        cache = self._cache
        if cache is None or cache[0] != self.table.revision:
            s = _fill(self.table.scores)
            cache = self._cache = (
                self.table.revision,
                s,
                _mix(s, self.smoothing, self.uniform_mix),
            )
        return cache[1], cache[2]

    @property
    def active(self) -> bool:
        """Whether the next draw uses importance sampling (the τ criterion)."""
        return self.tau_condition.active

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        n = self.population_size
        _check_batch_size(batch_size, n)
        if self.sweep is None:
            self.sweep_size = batch_size // 2 if self.pool is None else 0
        if self.fixed_threshold is None:
            self.tau_condition.threshold = tau_threshold(2 * self.sweep_size, batch_size)
        uniform = PPSWithReplacement(torch.ones(n, dtype=torch.float64), batch_size)
        designs: dict[int, PPSWithReplacement] = {}  # by table revision
        for _ in range(n // batch_size):
            if self.active:
                rev = self.table.revision
                if rev not in designs:
                    designs.clear()
                    designs[rev] = PPSWithReplacement(self._design()[1], batch_size)
                design = designs[rev]
            else:
                design = uniform
            sample = design.sample(generator)
            weights = hansen_hurwitz_weights(sample.draw_probabilities, n)
            self._pending = _Pending(sample.indices, weights)
            yield sample.indices

    def _take_pending(self, index: Tensor) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is None or not torch.equal(pending.index, index.detach().cpu()):
            raise RuntimeError(
                f"{type(self).__name__}.backward() must get the index that epoch_batches() "
                f"just yielded (the Hansen-Hurwitz weights depend on it)"
            )
        return pending.weights

    # -- the estimator -------------------------------------------------------------------------

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        weights = self._take_pending(index)
        self._loss_fn = loss_fn
        self._start_pool(model, loss_fn)
        cap = self._capture
        if self._hooks and (cap is None or cap.model is not model):  # not the setup network
            cap = self._capture = DenseNormCapture(model, self.params)
        if cap is not None:
            with cap:
                losses = loss_fn(model(x), y)
                w = weights.to(device=losses.device, dtype=losses.dtype)
                loss = (w * losses).sum()
                loss.backward()
        else:
            losses = loss_fn(model(x), y)
            w = weights.to(device=losses.device, dtype=losses.dtype)
            loss = (w * losses).sum()
            loss.backward()
        if self.refresh:
            norms = self._batch_norms(model, loss_fn, x, y, cap, w)
            self.table.update(index, norms, self.version)
        self.last_weights = weights
        return loss.detach()

    def _batch_norms(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        x: Tensor,
        y: Tensor,
        cap: DenseNormCapture | None,
        w: Tensor,
    ) -> Tensor:
        if cap is None:
            return score_examples(model, loss_fn, x, y, self.score, params=self.params)
        if self.score == "dense":
            return cap.norms(w)
        sq, missing = cap.sq_norms(w)
        rest = [n for n in cap.names if n in set(cap.uncovered) | set(missing)]
        if rest:
            sq = sq + exact_grad_norms(model, loss_fn, x, y, params=rest).square()
        return sq.sqrt()

    def _start_pool(self, model: nn.Module, loss_fn: LossFn) -> None:
        if self.pool is not None and not self._pool_started:
            if not self.pool.started:  # a pool given already started is used as it is
                x, y = self._data
                self.pool.start(model, x, y, loss_fn=loss_fn, version=self.version)
            self._pool_started = True

    def after_step(self, model: nn.Module) -> None:
        self.version += 1
        if self.pool is not None and self._pool_started:
            if self.version % self.sync_every == 0:
                self.pool.publish(model, self.version)
            for batch in self.pool.poll():
                self.table.update(batch.indices, batch.scores, batch.version)
        if self.sweep_size and self._loss_fn is not None and (self.active or not self.refresh):
            self._sweep(model)
        s, q = self._design()
        self.tau_condition.update(_tau(s, q))

    def _sweep(self, model: nn.Module) -> None:
        n, lo = self.population_size, self._cursor
        block = torch.arange(lo, lo + min(self.sweep_size, n)) % n
        self._cursor = int(block[-1] + 1) % n
        x, y = self._data
        bd = block.to(x.device)
        cap = self._sweep_capture
        if self.score in ("auto", "dense") and (cap is None or cap.model is not model):
            cap = self._sweep_capture = DenseNormCapture(model, self.params, hooks=False)
        scores = score_examples(
            model, self._loss_fn, x[bd], y[bd], self.score, params=self.params, capture=cap
        )
        self.table.update(block, scores, self.version)

    def weight_diagnostics(
        self, num_draws: int = 4000, generator: torch.Generator | None = None, *, warn: bool = True
    ) -> WeightDiagnostics:
        """ESS and Pareto k-hat of the weights :math:`1/(Nq_k)` of ``num_draws`` draws from the
        current importance design."""
        q = self.probabilities()
        idx = torch.multinomial(q, num_draws, replacement=True, generator=generator)
        return diagnose_weights(1.0 / (self.population_size * q[idx]), warn=warn)

    def close(self) -> None:
        """Stop the scoring workers (if any)."""
        if self.pool is not None:
            self.pool.close()
            self._pool_started = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(score={self.score!r}, smoothing={self.smoothing}, "
            f"uniform_mix={self.uniform_mix}, sweep={self.sweep}, "
            f"workers={self.workers if self.pool is None else self.pool.num_workers})"
        )


class PresampleImportanceEstimator(GradientEstimator):
    r"""Katharopoulos & Fleuret's importance sampling: score a uniform presample, draw from it.

    ::

        B ← round(presample · b) ; τ_th ← (B + 3b)/(3b) unless given ; τ ← 0
        for each step:
            if τ > τ_th:
                U ← B indices uniform with replacement ; s ← scores of U (forward pass)
                q ← (1 − λ)(s + c)/Σ(s + c) + λ/B ; draw j_1..j_b ~ q ; batch ← U[j]
                w_i ← 1/(b B q_{j_i}) ; τ ← a τ + (1 − a) τ_new(s, q)
            else:
                batch ← b indices uniform with replacement ; w_i ← 1/b
            backward of Σ w_i ℓ_i
            if uniform: τ ← a τ + (1 − a) τ_new(scores of the batch from its own logits)

    Unbiased for the whole population: given U the draw is Hansen–Hurwitz for the mean over U,
    and U is a uniform sample.

    Args:
        presample: :math:`B/b` (KF's default 3).
        score: presample score (:data:`~probopt.sampling.scores.SCORE_METHODS`; default the
            last-layer bound ``"logits"``).
        smoothing: additive :math:`c` on the presample scores (KF's ``smooth``).
        uniform_mix: :math:`\lambda` inside the presample.
        tau_threshold: default the cost model :func:`tau_threshold`.
        tau_momentum: :math:`a_\tau`.

    Example:
        >>> torch.manual_seed(0) and None
        >>> x, t = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> net = nn.Linear(3, 2)
        >>> est = PresampleImportanceEstimator(tau_threshold=1.0, tau_momentum=0.5)
        >>> est.setup(net, x, t)
        >>> loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
        >>> for index in est.epoch_batches(8, torch.Generator().manual_seed(0)):
        ...     _ = est.backward(net, loss_fn, x[index], t[index], index)
        ...     est.after_step(net)
        >>> est.active
        True
    """

    name = "importance-lastlayer"

    def __init__(
        self,
        *,
        presample: float = 3.0,
        score: str = "logits",
        smoothing: float = 0.0,
        uniform_mix: float = 0.0,
        tau_threshold: float | None = None,
        tau_momentum: float = 0.9,
    ) -> None:
        if not (isinstance(presample, (int, float)) and presample >= 1):
            raise ValueError(f"Invalid presample: {presample!r} (must be >= 1)")
        self.presample = float(presample)
        self.score = _check_method(score)
        self.smoothing = _check_nonneg("smoothing", smoothing)
        self.uniform_mix = _check_unit("uniform_mix", uniform_mix)
        self.fixed_threshold = tau_threshold
        self.tau_condition = TauCondition(1.0 if tau_threshold is None else tau_threshold,
                                          tau_momentum)  # fmt: skip
        self._pending: _Pending | None = None

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        super().setup(model, x, y)
        self._model, self._data = model, (x, y)
        self._loss_fn: LossFn | None = None
        self.tau_condition.value = 0.0
        self._pending = None
        self._uniform = True

    @property
    def active(self) -> bool:
        return self.tau_condition.active

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        n = self.population_size
        _check_batch_size(batch_size, n)
        big_b = max(batch_size, round(self.presample * batch_size))
        if self.fixed_threshold is None:
            self.tau_condition.threshold = tau_threshold(big_b, batch_size)
        x, y = self._data
        for _ in range(n // batch_size):
            self._uniform = not self.active
            if self._uniform:
                index = torch.randint(n, (batch_size,), generator=generator)
                weights = torch.full((batch_size,), 1.0 / batch_size, dtype=torch.float64)
            else:
                u = torch.randint(n, (big_b,), generator=generator)
                ud = u.to(x.device)
                s = score_examples(self._model, self._loss_fn, x[ud], y[ud], self.score).detach()
                q = draw_probabilities(s, smoothing=self.smoothing, uniform_mix=self.uniform_mix)
                sample = PPSWithReplacement(q, batch_size).sample(generator)
                index = u[sample.indices]
                weights = hansen_hurwitz_weights(sample.draw_probabilities, big_b)
                self.tau_condition.update(tau(s, q))
            self._pending = _Pending(index, weights)
            yield index

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is None or not torch.equal(pending.index, index.detach().cpu()):
            raise RuntimeError(
                "PresampleImportanceEstimator.backward() must get the index that "
                "epoch_batches() just yielded"
            )
        self._loss_fn = loss_fn
        out = model(x)
        losses = loss_fn(out, y)
        w = pending.weights.to(device=losses.device, dtype=losses.dtype)
        loss = (w * losses).sum()
        loss.backward()
        if self._uniform:  # KF: update tau with the uniform batch's scores, from its own outputs
            if self.score == "logits":
                z = out.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(loss_fn(z, y).sum(), z)
                s = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
            else:
                s = score_examples(model, loss_fn, x, y, self.score)
            self.tau_condition.update(tau(s.detach()))
        self.last_weights = pending.weights
        return loss.detach()

    def __repr__(self) -> str:
        return (
            f"PresampleImportanceEstimator(presample={self.presample}, score={self.score!r}, "
            f"smoothing={self.smoothing}, uniform_mix={self.uniform_mix})"
        )


# --------------------------------------------------------------------------------------------
# the registry


_REGISTRY: dict[str, tuple[type[GradientEstimator], dict[str, Any]]] = {
    "importance": (ImportanceEstimator, {}),
    "importance-exact": (ImportanceEstimator, {"score": "exact"}),
    "importance-lastlayer": (PresampleImportanceEstimator, {}),
    "importance-distributed": (
        ImportanceEstimator,
        {"workers": 2, "backend": "local", "refresh": False, "block_size": 32, "sync_every": 4},
    ),
}

#: Names accepted by :func:`make_estimator` (the CLI's ``--estimator`` choices).
ESTIMATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_estimator(name: str, **kwargs: Any) -> GradientEstimator:
    r"""Build a registered importance-sampling estimator by name.

    ========================  ==================================================================
    name                      estimator
    ========================  ==================================================================
    importance                :class:`ImportanceEstimator`: stale dense-identity norms of the
                              drawn examples and a sweep of b/2 per step, 10 % uniform
                              mixing, τ switch at the cost model's 4/3
    importance-exact          the same with exact ``torch.func`` norms (any network)
    importance-lastlayer      :class:`PresampleImportanceEstimator`: Katharopoulos & Fleuret,
                              presample 3b scored by ‖softmax − onehot‖, τ_th = 2
    importance-distributed    :class:`ImportanceEstimator` fed only by 2 scoring workers
                              (:mod:`probopt.distributed`, local mode: blocks of 32 scored in
                              process at every step; ``backend="ray"`` for real workers)
    ========================  ==================================================================

    Args:
        name: one of :data:`ESTIMATOR_NAMES`.
        **kwargs: override the variant's constructor arguments.

    Example:
        >>> est = make_estimator("importance", uniform_mix=0.3)
        >>> est.name, est.uniform_mix
        ('importance', 0.3)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATOR_NAMES)}")
    cls, defaults = _REGISTRY[name]
    est = cls(**{**defaults, **kwargs})
    est.name = name
    return est
