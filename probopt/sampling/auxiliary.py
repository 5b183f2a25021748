r"""Auxiliary data :math:`h_k` and the online linear working model :math:`\hat y_k = B^\top h_k`.

In model-assisted estimation (Särndal, Swensson & Wretman 1992) the training set is a finite
population :math:`U = \{1, \dots, N\}`, the study variable is the per-example gradient
:math:`y_k = g_k(\theta) \in \mathbb{R}^p`, and :math:`h_k \in \mathbb{R}^q` is *auxiliary data
known for every* :math:`k \in U` *without a backward pass*, together with its population mean
:math:`\bar h_U`. The estimators of :mod:`probopt.sampling.model_assisted` need exactly two things
from this module: the batch rows :math:`h_k, k \in s`, and :math:`\bar h_U`.

Built-in auxiliary data (every choice contains the intercept :math:`1` as its first column):

=======================  ===================================================  ===============
class                    :math:`h_k`                                          :math:`q`
=======================  ===================================================  ===============
:class:`Intercept`       :math:`1` (no auxiliary information: gives uniform)  1
:class:`RawInputs`       :math:`[1, x_k]`                                     1 + d
:class:`PCAInputs`       :math:`[1, V_k^\top (x_k - \bar x)/s]`, k components  1 + k
:class:`ClassOneHot`     :math:`[1, e_{y_k}]` without the first class column  C
:class:`CachedLoss`      :math:`[1, \tilde\ell_k]`, loss at the last visit    2
:class:`CachedGradNorm`  :math:`[1, \|\tilde g_k\|]`, at the last visit       2
:class:`CachedResidual`  :math:`[1, \tilde\delta_k]`, softmax minus one-hot   C
                         of the logits at the last visit (drops class 0)
:class:`Product`         row-wise Kronecker product of two choices            q_a q_b
:class:`Concat`          columns of several choices (one intercept)           sum - (m-1)
=======================  ===================================================  ===============

"inputs ⊗ class" is ``Product(ClassOneHot(), PCAInputs(k))`` (or ``RawInputs()``): one linear
model per class. The cached tables are refreshed by :meth:`Auxiliary.observe` with the values
computed on the visited batch; unvisited rows hold a constant. :math:`\bar h_U` is updated
incrementally and is exact at all times, and the batch rows are read *before* the batch's own
values are written, so a difference estimator stays exactly unbiased given the past.

The working model is :class:`OnlineLinearModel`: ridge regression of the (flattened, possibly
restricted) per-example gradients on :math:`h_k`, refit online with exponential forgetting.

:class:`GradientFactorTable` is a different kind of auxiliary information: each example's own
gradient of some dense layers at its last visit, stored as factors (SAGA's table), used by
:class:`~probopt.sampling.model_assisted.CachedGradientEstimator`.

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992.
    Pohjankukka & Heikkonen, `Stochastic Gradient Optimization with Model-Assisted Sampling
    <https://arxiv.org/abs/2606.27171>`_, 2026.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AUXILIARY_NAMES",
    "Auxiliary",
    "CachedGradNorm",
    "CachedLoss",
    "CachedResidual",
    "ClassOneHot",
    "Concat",
    "GradientFactorTable",
    "Intercept",
    "OnlineLinearModel",
    "PCAInputs",
    "Product",
    "RawInputs",
    "make_auxiliary",
]


class Auxiliary:
    r"""Base class of auxiliary data: rows :math:`h_k` and their population mean :math:`\bar h_U`.

    Subclasses implement :meth:`_fit` (learn anything from the whole population, e.g. a PCA
    basis) and :meth:`_features`. Cached tables also set ``dynamic = True``, list what they need
    in ``needs`` (a subset of ``{"losses", "outputs", "grad_norms"}``) and implement
    :meth:`_write`.

    Attributes:
        name: short name used in estimator names (``"pca8"``, ``"onehot"``, ...).
        dim: :math:`q`, the number of columns, intercept included.
        population_mean: :math:`\bar h_U`, shape ``(q,)``, set by :meth:`fit`.
        dynamic: whether the rows change during training (cached tables).
        needs: per-example quantities :meth:`observe` must receive.
    """

    name: str = "aux"
    dynamic: bool = False
    needs: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.population_mean: Tensor | None = None
        self.population_size: int = 0
        self.dim: int = 0

    # ---- public API
    def fit(self, x: Tensor, y: Tensor, *, chunk_size: int = 4096) -> Auxiliary:
        r"""Learn from the whole population and compute :math:`\bar h_U` (chunked, O(N q)).

        Args:
            x: all inputs ``(N, ...)``.
            y: all labels ``(N,)``.
            chunk_size: rows per chunk when computing the mean.
        """
        n = int(x.shape[0])
        if n < 1:
            raise ValueError(f"the population is empty (x has shape {tuple(x.shape)})")
        self.population_size = n
        self._fit(x, y)
        total = None
        for start in range(0, n, chunk_size):
            idx = torch.arange(start, min(n, start + chunk_size), device=x.device)
            part = self._features(x[idx], y[idx], idx).sum(0, dtype=torch.float64)
            total = part if total is None else total + part
        self.population_mean = (total / n).to(x.dtype if x.is_floating_point() else torch.float32)
        self.dim = int(self.population_mean.shape[0])
        return self

    def __call__(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """Rows :math:`h_k` of the batch, shape ``(n, q)``."""
        if self.population_mean is None:
            raise RuntimeError(f"{type(self).__name__}.fit must be called first")
        return self._features(x, y, index)

    def observe(
        self,
        index: Tensor,
        x: Tensor,
        y: Tensor,
        *,
        losses: Tensor | None = None,
        outputs: Tensor | None = None,
        grad_norms: Tensor | None = None,
    ) -> None:
        r"""Write the batch's fresh values into the cached tables and update :math:`\bar h_U`.

        Call it *after* the batch's estimate has been formed. A no-op for static data. Cost
        :math:`O(nq)`. Arguments that the data does not need may be ``None``.
        """
        if not self.dynamic:
            return
        stats = {"losses": losses, "outputs": outputs, "grad_norms": grad_norms}
        if not self._can_write(stats):
            return
        old = self._features(x, y, index)
        self._write(index, y, stats)
        new = self._features(x, y, index)
        # rows repeated inside one batch would be double counted; designs here never repeat
        delta = (new - old).sum(0, dtype=torch.float64) / self.population_size
        self.population_mean += delta.to(self.population_mean.dtype)

    # ---- for subclasses
    def _fit(self, x: Tensor, y: Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        raise NotImplementedError

    def _can_write(self, stats: dict[str, Tensor | None]) -> bool:
        return all(stats[k] is not None for k in self.needs)

    def _write(self, index: Tensor, y: Tensor, stats: dict[str, Tensor | None]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(q={self.dim})"


def _ones(x: Tensor) -> Tensor:
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return torch.ones(x.shape[0], 1, dtype=dtype, device=x.device)


class Intercept(Auxiliary):
    """:math:`h_k = 1`: no auxiliary information; every estimator reduces to the plain mean.

    Example:
        >>> aux = Intercept().fit(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
        >>> aux(torch.randn(2, 2), None, torch.tensor([0, 1])), aux.population_mean
        (tensor([[1.], [1.]]), tensor([1.]))
    """

    name = "intercept"

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        return _ones(x)


class RawInputs(Auxiliary):
    """:math:`h_k = [1, x_k]` with the inputs flattened; :math:`q = 1 + d`.

    Example:
        >>> RawInputs().fit(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)).dim
        4
    """

    name = "inputs"

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return torch.cat([_ones(flat), flat], dim=1)


class PCAInputs(Auxiliary):
    r"""The first ``k`` principal-component scores of the inputs: :math:`h_k = [1, z_k]`.

    Fitted once on the population: :math:`\bar x`, the top right singular vectors :math:`V`
    (``torch.linalg.svd`` of the centred data, ``d`` at most a few thousand) and, with
    ``whiten``, the score standard deviations; :math:`z_k = V^\top(x_k - \bar x)/s`. Signs are
    fixed so that each component's largest loading is positive.

    Args:
        k: number of components (clipped to ``min(N, d)``).
        whiten: scale scores to unit variance (better conditioned normal equations).

    Example:
        >>> x = torch.randn(50, 6)
        >>> aux = PCAInputs(3).fit(x, torch.zeros(50, dtype=torch.long))
        >>> aux.dim, torch.allclose(aux.population_mean, torch.tensor([1.0, 0, 0, 0]), atol=1e-5)
        (4, True)
    """

    def __init__(self, k: int = 8, *, whiten: bool = True) -> None:
        super().__init__()
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Invalid k: {k!r} (must be an int >= 1)")
        self.k = k
        self.whiten = whiten
        self.name = f"pca{k}"

    def _fit(self, x: Tensor, y: Tensor) -> None:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        self.center = flat.mean(0)
        _, s, vh = torch.linalg.svd(flat - self.center, full_matrices=False)
        k = min(self.k, vh.shape[0])
        v = vh[:k].T
        sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
        v = v * sign
        scale = s[:k] / math.sqrt(max(flat.shape[0] - 1, 1)) if self.whiten else torch.ones(k)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.components = (v / scale).to(x.dtype)
        self.center = self.center.to(x.dtype)

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        z = (x.reshape(x.shape[0], -1) - self.center) @ self.components
        return torch.cat([_ones(z), z], dim=1)


class ClassOneHot(Auxiliary):
    r"""Class indicators :math:`h_k = [1, 1\{y_k = 1\}, \dots, 1\{y_k = C-1\}]`; :math:`q = C`.

    The intercept replaces the first class's column (same span, full rank). With GREG this is
    post-stratification by class.

    Args:
        num_classes: ``C``; default ``max(y) + 1`` of the population.

    Example:
        >>> y = torch.tensor([0, 1, 2, 2])
        >>> aux = ClassOneHot().fit(torch.zeros(4, 1), y)
        >>> aux(None, y[:2], None)
        tensor([[1., 0., 0.],
                [1., 1., 0.]])
    """

    name = "onehot"

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._dtype = torch.float32

    def _fit(self, x: Tensor, y: Tensor) -> None:
        if self.num_classes is None:
            self.num_classes = int(y.max()) + 1
        self._dtype = x.dtype if x.is_floating_point() else torch.float32

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        one = torch.nn.functional.one_hot(y, self.num_classes).to(self._dtype)
        one[:, 0] = 1.0
        return one


class _Table(Auxiliary):
    """A per-example table of ``width`` values, read at the batch rows, refreshed on visit."""

    dynamic = True
    width = 1

    def __init__(self, initial: float = 0.0) -> None:
        super().__init__()
        self.initial = initial

    def _fit(self, x: Tensor, y: Tensor) -> None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        self.table = torch.full(
            (x.shape[0], self.width), float(self.initial), dtype=dtype, device=x.device
        )

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        rows = self.table[index]
        return torch.cat([_ones(rows), rows], dim=1)


class CachedLoss(_Table):
    r""":math:`h_k = [1, \tilde\ell_k]`: the example's loss at its last visit (``initial`` before).

    Example:
        >>> aux = CachedLoss(initial=1.0).fit(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
        >>> idx = torch.tensor([0, 2])
        >>> aux.observe(idx, None, None, losses=torch.tensor([4.0, 7.0]))
        >>> aux(None, None, idx), aux.population_mean
        (tensor([[1., 4.], [1., 7.]]), tensor([1., 4.]))
    """

    name = "loss"
    needs = frozenset({"losses"})

    def _write(self, index: Tensor, y: Tensor, stats: dict[str, Tensor | None]) -> None:
        self.table[index, 0] = stats["losses"].detach().to(self.table.dtype)


class CachedGradNorm(_Table):
    r""":math:`h_k = [1, \|\tilde g_k\|]`: the (possibly restricted) per-example gradient norm at
    the example's last visit on which it was computed."""

    name = "gradnorm"
    needs = frozenset({"grad_norms"})

    def _write(self, index: Tensor, y: Tensor, stats: dict[str, Tensor | None]) -> None:
        self.table[index, 0] = stats["grad_norms"].detach().to(self.table.dtype)


class CachedResidual(_Table):
    r""":math:`h_k = [1, \tilde\delta_{k,1..C-1}]` with :math:`\tilde\delta_k =
    \operatorname{softmax}(z_k) - e_{y_k}` from the logits of the example's last visit.

    :math:`\tilde\delta_k` is the output-layer error signal of softmax cross-entropy, so the
    last layer's per-example gradient is exactly :math:`\delta_k \otimes [a_k, 1]`; the class-0
    entry is dropped because the entries sum to zero. Rows are zero before the first visit.

    Args:
        num_classes: ``C``; default ``max(y) + 1`` of the population.
    """

    name = "residual"
    needs = frozenset({"outputs"})

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__(0.0)
        self.num_classes = num_classes

    def _fit(self, x: Tensor, y: Tensor) -> None:
        if self.num_classes is None:
            self.num_classes = int(y.max()) + 1
        self.width = self.num_classes - 1
        super()._fit(x, y)

    def _write(self, index: Tensor, y: Tensor, stats: dict[str, Tensor | None]) -> None:
        logits = stats["outputs"].detach()
        delta = torch.softmax(logits.to(self.table.dtype), dim=1)
        delta[torch.arange(len(y), device=delta.device), y] -= 1.0
        self.table[index] = delta[:, 1:]


class _Composite(Auxiliary):
    def __init__(self, *parts: Auxiliary) -> None:
        super().__init__()
        if len(parts) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two parts, got {len(parts)}")
        self.parts = parts
        self.dynamic = any(p.dynamic for p in parts)
        self.needs = frozenset().union(*(p.needs for p in parts))

    def _fit(self, x: Tensor, y: Tensor) -> None:
        for p in self.parts:
            p.fit(x, y)

    def _can_write(self, stats: dict[str, Tensor | None]) -> bool:
        return all(p._can_write(stats) for p in self.parts if p.dynamic)

    def _write(self, index: Tensor, y: Tensor, stats: dict[str, Tensor | None]) -> None:
        for p in self.parts:
            if p.dynamic:  # the part's own mean is kept in step too
                p.observe(index, None, y, **stats)


class Concat(_Composite):
    """The columns of several auxiliary data side by side, with a single intercept.

    Example:
        >>> y = torch.tensor([0, 1, 2, 1])
        >>> aux = Concat(ClassOneHot(), PCAInputs(2)).fit(torch.randn(4, 3), y)
        >>> aux.name, aux.dim
        ('onehot+pca2', 5)
    """

    def __init__(self, *parts: Auxiliary) -> None:
        super().__init__(*parts)
        self.name = "+".join(p.name for p in parts)

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        cols = [self.parts[0]._features(x, y, index)]
        cols += [p._features(x, y, index)[:, 1:] for p in self.parts[1:]]
        return torch.cat(cols, dim=1)


class Product(_Composite):
    r"""Row-wise Kronecker product :math:`h_k = h^{(a)}_k \otimes h^{(b)}_k`.

    Both factors start with the intercept, so the product contains the intercept, both factors
    and all their interactions: ``Product(ClassOneHot(), PCAInputs(k))`` is one linear model
    per class in the PCA scores ("inputs ⊗ class", :math:`q = C(1+k)`).

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> aux = Product(ClassOneHot(), RawInputs()).fit(torch.randn(4, 3), y)
        >>> aux.name, aux.dim
        ('onehot*inputs', 8)
    """

    def __init__(self, a: Auxiliary, b: Auxiliary) -> None:
        super().__init__(a, b)
        self.name = f"{a.name}*{b.name}"

    def _features(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        ha = self.parts[0]._features(x, y, index)
        hb = self.parts[1]._features(x, y, index)
        return (ha.unsqueeze(2) * hb.unsqueeze(1)).reshape(ha.shape[0], -1)


AUXILIARY_NAMES: tuple[str, ...] = (
    "intercept",
    "inputs",
    "pca",
    "onehot",
    "inputs-class",
    "pca-class",
    "loss",
    "loss-class",
    "onehot+loss",
    "gradnorm",
    "residual",
    "residual-pca",
)


def make_auxiliary(name: str, *, k: int = 8, num_classes: int | None = None) -> Auxiliary:
    r"""Build a built-in auxiliary choice by name.

    ============  ===================================================================
    name          data
    ============  ===================================================================
    intercept     :class:`Intercept`
    inputs        :class:`RawInputs`
    pca           :class:`PCAInputs` ``(k)``
    onehot        :class:`ClassOneHot`
    inputs-class  ``Product(ClassOneHot(), RawInputs())``
    pca-class     ``Product(ClassOneHot(), PCAInputs(k))``
    loss          :class:`CachedLoss`
    loss-class    ``Product(ClassOneHot(), CachedLoss())``
    onehot+loss   ``Concat(ClassOneHot(), CachedLoss())``
    gradnorm      :class:`CachedGradNorm`
    residual      :class:`CachedResidual`
    residual-pca  ``Product(CachedResidual(), PCAInputs(k))``: the cached output error
                  times the input scores, a linear stand-in for the last-layer gradient
                  :math:`\delta_k \otimes a_k`
    ============  ===================================================================

    Example:
        >>> make_auxiliary("pca-class", k=4).name
        'onehot*pca4'
    """
    if name == "intercept":
        return Intercept()
    if name == "inputs":
        return RawInputs()
    if name == "pca":
        return PCAInputs(k)
    if name == "onehot":
        return ClassOneHot(num_classes)
    if name == "inputs-class":
        return Product(ClassOneHot(num_classes), RawInputs())
    if name == "pca-class":
        return Product(ClassOneHot(num_classes), PCAInputs(k))
    if name == "loss":
        return CachedLoss()
    if name == "loss-class":
        return Product(ClassOneHot(num_classes), CachedLoss())
    if name == "onehot+loss":
        return Concat(ClassOneHot(num_classes), CachedLoss())
    if name == "gradnorm":
        return CachedGradNorm()
    if name == "residual":
        return CachedResidual(num_classes)
    if name == "residual-pca":
        return Product(CachedResidual(num_classes), PCAInputs(k))
    raise ValueError(f"unknown auxiliary {name!r}; choose one of {', '.join(AUXILIARY_NAMES)}")


# --------------------------------------------------------------------------------------------
# the working model


class OnlineLinearModel:
    r"""Ridge regression of per-example gradients on :math:`h_k`, refit online with forgetting.

    Working model :math:`y_k = B^\top h_k + \varepsilon_k` with :math:`B \in \mathbb{R}^{q\times
    p}` (one column per gradient coordinate). Sufficient statistics with forgetting factor
    :math:`\lambda` (``forgetting``), updated once per observed batch :math:`s`:

    .. math::
        S_{hh} \leftarrow \lambda S_{hh} + \sum_{k\in s} h_k h_k^\top, \qquad
        S_{hg} \leftarrow \lambda S_{hg} + \sum_{k\in s} h_k y_k^\top,

    and the fit :math:`B = (S_{hh} + \rho\, \tfrac{\operatorname{tr} S_{hh}}{q} I)^{-1} S_{hg}`
    by a Cholesky solve (:math:`\rho` = ``ridge``, relative to the average diagonal so that it
    does not depend on the scale of :math:`h` or the amount of data). With :math:`\lambda = 1`
    and :math:`\rho \to 0` this is ordinary least squares on all batches seen; :math:`\lambda <
    1` is recursive least squares with exponential forgetting (memory about
    :math:`1/(1-\lambda)` batches), which tracks the drift of :math:`\theta`.

    Cost: :meth:`update` :math:`O(n q^2 + n q p)` (two matrix products), :meth:`solve`
    :math:`O(q^3 + q^2 p)`, :meth:`predict` of the batch mean correction :math:`O(qp)`; memory
    :math:`O(q^2 + qp)`. The :math:`q \times q` system is factored in float64; for float32
    gradients its inverse is then applied in float32.

    Args:
        q: number of auxiliary columns.
        p: number of gradient coordinates.
        ridge: :math:`\rho \geq 0`.
        forgetting: :math:`\lambda \in (0, 1]`.
        dtype: dtype of :math:`S_{hg}` and :math:`B` (that of the gradients).
        device: where the statistics live.

    Example:
        >>> h = torch.cat([torch.ones(20, 1), torch.randn(20, 2)], 1)
        >>> lm = OnlineLinearModel(3, 1, ridge=0.0)
        >>> lm.update(h, h @ torch.tensor([[1.0], [2.0], [-3.0]]))
        >>> lm.solve().squeeze(1)
        tensor([ 1.0000,  2.0000, -3.0000])
    """

    def __init__(
        self,
        q: int,
        p: int,
        *,
        ridge: float = 1e-3,
        forgetting: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not (isinstance(q, int) and q >= 1):
            raise ValueError(f"Invalid q: {q!r} (must be an int >= 1)")
        if not (isinstance(p, int) and p >= 1):
            raise ValueError(f"Invalid p: {p!r} (must be an int >= 1)")
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"Invalid ridge: {ridge!r} (must be a finite number >= 0)")
        if not (isinstance(forgetting, (int, float)) and 0.0 < forgetting <= 1.0):
            raise ValueError(f"Invalid forgetting: {forgetting!r} (must be in (0, 1])")
        self.q, self.p = q, p
        self.ridge = float(ridge)
        self.forgetting = float(forgetting)
        self.s_hh = torch.zeros(q, q, dtype=torch.float64, device=device)
        self.s_hg = torch.zeros(q, p, dtype=dtype, device=device)
        self.weight = 0.0
        """Effective number of observations, :math:`\\sum \\lambda^{age} n`."""
        self.coef: Tensor = torch.zeros(q, p, dtype=dtype, device=device)
        """The current fit :math:`B` (zeros until :meth:`solve`)."""

    def update(self, h: Tensor, y: Tensor) -> None:
        """Add one batch: ``h`` is ``(n, q)``, ``y`` is ``(n, p)``."""
        if h.dim() != 2 or h.shape[1] != self.q:
            raise ValueError(f"h must have shape (n, {self.q}), got {tuple(h.shape)}")
        if y.dim() != 2 or y.shape != (h.shape[0], self.p):
            raise ValueError(f"y must have shape ({h.shape[0]}, {self.p}), got {tuple(y.shape)}")
        lam = self.forgetting
        h64 = h.to(torch.float64)
        if lam < 1.0:
            self.s_hh.mul_(lam)
            self.s_hg.mul_(lam)
        self.s_hh.add_(h64.T @ h64)
        self.s_hg.add_(h.to(self.s_hg.dtype).T @ y.to(self.s_hg.dtype))
        self.weight = lam * self.weight + h.shape[0]

    def solve(self) -> Tensor:
        """Refit :math:`B` from the statistics (Cholesky; a jitter is added if it fails)."""
        if self.weight == 0.0:
            return self.coef
        a = self.s_hh.clone()
        mean_diag = float(a.diagonal().mean())
        a.diagonal().add_(self.ridge * mean_diag)
        jitter = 0.0
        for _ in range(8):
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                break
            jitter = max(jitter * 10.0, 1e-10 * max(mean_diag, 1e-300))
            a.diagonal().add_(jitter)
        else:  # pragma: no cover - only for wholly degenerate statistics
            raise RuntimeError("the normal equations are not positive definite")
        if self.s_hg.dtype == torch.float64:
            self.coef = torch.cholesky_solve(self.s_hg, chol)
        else:  # the q x q inverse in float64, the q x p product in the gradients' dtype
            self.coef = torch.cholesky_inverse(chol).to(self.s_hg.dtype) @ self.s_hg
        return self.coef

    def predict(self, h: Tensor) -> Tensor:
        """:math:`\\hat y = h B`, shape ``(n, p)`` (or ``(p,)`` for a ``(q,)`` row)."""
        return h.to(self.coef.dtype) @ self.coef

    def reset(self) -> None:
        """Forget everything (zero statistics and coefficients)."""
        self.s_hh.zero_()
        self.s_hg.zero_()
        self.coef.zero_()
        self.weight = 0.0


# --------------------------------------------------------------------------------------------
# last-visit gradients of dense layers, stored as factors


class GradientFactorTable:
    r"""Each example's last-visit gradient of some dense layers, stored as factors.

    For a dense layer the per-example gradient is :math:`\tilde g_k = \tilde\delta_k [\tilde a_k,
    1]^\top` (:class:`~probopt.sampling.per_example.LinearGradCapture`), so the table keeps
    :math:`\tilde a_k \in \mathbb{R}^{d_{in}}` and :math:`\tilde\delta_k \in
    \mathbb{R}^{d_{out}}` per example (memory :math:`N (d_{in} + d_{out})` per layer instead of
    :math:`N d_{in} d_{out}`) and the exact population sums :math:`T_W = \sum_U \tilde\delta_k
    \tilde a_k^\top`, :math:`T_b = \sum_U \tilde\delta_k`, updated as rows are overwritten.
    Rows never visited are zero (their prediction is 0). This is SAGA's gradient table
    (Defazio, Bach & Lacoste-Julien 2014) in the factored form that dense layers allow.

    Args:
        population_size: :math:`N`.
        layers: ``{layer name: (d_out, d_in)}``.
        dtype, device: of the tables.
        static_inputs: ``{layer: (N, d_in) tensor}`` for layers whose input is fixed data (the
            network input of a first dense layer): kept by reference instead of copied, and not
            written by :meth:`write`.

    Example:
        >>> tab = GradientFactorTable(4, {"fc": (2, 3)})
        >>> idx = torch.tensor([0, 3])
        >>> tab.write(idx, {"fc": (torch.ones(2, 3), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))})
        >>> tab.population_mean("fc")[1]
        tensor([0.2500, 0.5000])
        >>> tab.batch_mean("fc", idx)[0]
        tensor([[0.5000, 0.5000, 0.5000],
                [1.0000, 1.0000, 1.0000]])
    """

    def __init__(
        self,
        population_size: int,
        layers: dict[str, tuple[int, int]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        static_inputs: dict[str, Tensor] | None = None,
    ) -> None:
        if not (isinstance(population_size, int) and population_size >= 1):
            raise ValueError(f"Invalid population_size: {population_size!r} (must be an int >= 1)")
        self.population_size = population_size
        kw = {"dtype": dtype, "device": device}
        n = population_size
        static = dict(static_inputs or {})
        for k, a in static.items():
            if k not in layers or tuple(a.shape) != (n, layers[k][1]):
                raise ValueError(f"static input of layer {k!r} must have shape (N, d_in)")
        self.static = frozenset(static)
        """Layers whose input never changes (e.g. the network input): held by reference, never
        written."""
        self.inputs = {
            k: static[k] if k in static else torch.zeros(n, d_in, **kw)
            for k, (_, d_in) in layers.items()
        }
        self.deltas = {k: torch.zeros(n, d_out, **kw) for k, (d_out, _) in layers.items()}
        self.sum_w = {k: torch.zeros(d_out, d_in, **kw) for k, (d_out, d_in) in layers.items()}
        self.sum_b = {k: torch.zeros(d_out, **kw) for k, (d_out, _) in layers.items()}

    def resync(self) -> None:
        """Recompute the population sums from the tables (removes rounding drift)."""
        for layer in self.sum_w:
            self.sum_w[layer] = self.deltas[layer].T @ self.inputs[layer]
            self.sum_b[layer] = self.deltas[layer].sum(0)

    def rows(
        self, layer: str, index: Tensor, inputs: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The cached factors ``(a, delta)`` of the batch rows; for a static layer the caller may
        pass the batch's ``inputs`` (the same rows) to save the gather."""
        a = inputs if (inputs is not None and layer in self.static) else self.inputs[layer][index]
        return a, self.deltas[layer][index]

    def batch_mean(self, layer: str, index: Tensor) -> tuple[Tensor, Tensor]:
        """Mean cached gradient ``(W, b)`` over the batch rows, :math:`O(n d_{in} d_{out})`."""
        a, d = self.rows(layer, index)
        n = a.shape[0]
        return d.T @ a / n, d.mean(0)

    def population_mean(self, layer: str) -> tuple[Tensor, Tensor]:
        """Mean cached gradient ``(W, b)`` over the population (exact, :math:`O(1)`)."""
        n = self.population_size
        return self.sum_w[layer] / n, self.sum_b[layer] / n

    def write(
        self,
        index: Tensor,
        factors: dict[str, tuple[Tensor, Tensor]],
        *,
        old_batch_sums: dict[str, tuple[Tensor, Tensor]] | None = None,
        new_batch_sums: dict[str, tuple[Tensor, Tensor]] | None = None,
        new_scale: float = 1.0,
    ) -> None:
        """Overwrite the batch rows with fresh factors ``{layer: (a, delta)}``.

        Args:
            index: population indices of the batch (no repeats).
            factors: the new ``(a, delta)`` per layer.
            old_batch_sums: the old rows' sums ``(sum delta a^T, sum delta)`` if the caller has
                them already (saves one matrix product per layer).
            new_batch_sums: the same for the new rows, times ``1/new_scale`` (the weight
                gradient of a mean loss is the rows' sum over n: pass it with ``new_scale=n``).
            new_scale: the factor of the weight sums in ``new_batch_sums``.
        """
        for layer, (a, d) in factors.items():
            if old_batch_sums is not None and layer in old_batch_sums:
                old_w, old_b = old_batch_sums[layer]
            else:
                a_old, d_old = self.rows(layer, index)
                old_w, old_b = d_old.T @ a_old, d_old.sum(0)
            a = a.to(self.sum_w[layer].dtype)
            d = d.to(self.sum_w[layer].dtype)
            scale = 1.0
            if new_batch_sums is not None and layer in new_batch_sums:
                new_w, new_b = new_batch_sums[layer]
                scale = new_scale
            else:
                new_w, new_b = d.T @ a, d.sum(0)
            self.sum_w[layer].add_(new_w, alpha=scale).sub_(old_w)
            self.sum_b[layer].add_(new_b).sub_(old_b)
            if layer not in self.static:
                self.inputs[layer][index] = a
            self.deltas[layer][index] = d
