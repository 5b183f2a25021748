r"""Finite-population sampling designs: which training examples form a minibatch.

The training set is the finite population :math:`U = \{1, \dots, N\}`; a minibatch is a sample
:math:`s \subset U` drawn from a *design* :math:`p(s)`. A design is described by its first-order
inclusion probabilities :math:`\pi_k = P(k \in s)` and joint ones
:math:`\pi_{kl} = P(k \in s, l \in s)` (with :math:`\pi_{kk} = \pi_k`), which is all that the
Horvitz–Thompson family of estimators in :mod:`probopt.sampling.estimators` needs.

=========================  ==============================  =========================================
design                     minibatch                       estimator it goes with
=========================  ==============================  =========================================
:class:`SimpleRandom\      a shuffled minibatch of size n  plain mean (= Horvitz–Thompson, Hájek)
Sampling`                  (SRSWOR)
:class:`PoissonSampling`   independent Bernoulli(π_k)      Horvitz–Thompson or Hájek
                           draws; random size
:class:`PPSWithReplace\    n independent draws with        Hansen–Hurwitz (importance sampling)
ment`                      probabilities p_k ∝ size x_k
:class:`Stratified\        SRSWOR of n_h units inside      Horvitz–Thompson (stratum-weighted means)
Sampling`                  each stratum (e.g. each class)
=========================  ==============================  =========================================

Every design draws from an explicit :class:`torch.Generator` (reproducible), and plugs into
:class:`torch.utils.data.DataLoader` through :meth:`SamplingDesign.batch_sampler`.

References:
    Särndal, Swensson & Wretman, *Model Assisted Survey Sampling*, Springer, 1992, chapters 2–3.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = [
    "DesignBatchSampler",
    "EpochBatchSampler",
    "PPSWithReplacement",
    "PoissonSampling",
    "Sample",
    "SamplingDesign",
    "SimpleRandomSampling",
    "StratifiedSampling",
    "WithReplacementSample",
]

# N x N joint inclusion matrices above this population size would take gigabytes.
_MAX_FULL_JOINT = 1 << 14


class Sample(NamedTuple):
    """One sample of a without-replacement design (a minibatch of distinct units)."""

    indices: Tensor  # (n,) int64, the units of s
    inclusion_probabilities: Tensor  # (n,) float64, pi_k of those units


class WithReplacementSample(NamedTuple):
    """One sample of a with-replacement design: ``n`` ordered draws, repeats allowed."""

    indices: Tensor  # (n,) int64, the unit of each draw, in draw order
    draw_probabilities: Tensor  # (n,) float64, p_k of the unit of each draw
    units: Tensor  # (m,) int64, the distinct units drawn, sorted
    multiplicities: Tensor  # (m,) int64, how many draws hit each of ``units``


# --------------------------------------------------------------------------------------------
# validation: one check per argument, the offending value in the message


def _check_count(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")
    return value


def _check_probabilities(
    name: str,
    values: Sequence[float] | Tensor,
    population_size: int | None,
    *,
    at_most_one: bool,
) -> Tensor:
    """A float64 vector of strictly positive, finite probabilities (or sizes)."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"Invalid {name}: expected a non-empty 1-D vector, got shape {tuple(t.shape)}"
        )
    if population_size is not None and t.numel() != population_size:
        raise ValueError(
            f"Invalid {name}: length {t.numel()} does not match population_size {population_size}"
        )
    bad = torch.nonzero(~torch.isfinite(t))
    if bad.numel():
        k = int(bad[0])
        raise ValueError(f"Invalid {name}: unit {k} has non-finite value {float(t[k])}")
    bad = torch.nonzero(t <= 0)
    if bad.numel():
        k = int(bad[0])
        raise ValueError(
            f"Invalid {name}: unit {k} has value {float(t[k])}; every unit must be drawable "
            f"(value > 0), otherwise no unbiased estimator exists"
        )
    if at_most_one:
        bad = torch.nonzero(t > 1)
        if bad.numel():
            k = int(bad[0])
            raise ValueError(f"Invalid {name}: unit {k} has probability {float(t[k])} > 1")
    return t


def _check_indices(indices: Tensor, population_size: int) -> Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"Invalid indices: expected a 1-D tensor, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= population_size):
        raise ValueError(
            f"Invalid indices: values must lie in [0, {population_size - 1}], got range "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )
    return idx


def _fresh_generator() -> torch.Generator:
    """A generator seeded from the global torch RNG (what ``RandomSampler`` does)."""
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# the designs


class SamplingDesign:
    """Base class of the sampling designs.

    Subclasses set ``fixed_size`` (whether every sample has the same size, which is what the
    Sen–Yates–Grundy variance needs) and implement :meth:`inclusion_probabilities`,
    :meth:`_joint` and :meth:`sample`.
    """

    fixed_size: bool = True

    @property
    def population_size(self) -> int:
        """N, the number of units in the population (the training set)."""
        return self._population_size

    def inclusion_probabilities(self) -> Tensor:
        r"""First-order inclusion probabilities :math:`\pi_k = P(k \in s)`, float64, shape (N,)."""
        raise NotImplementedError

    def joint_inclusion_probabilities(self, indices: Tensor | None = None) -> Tensor:
        r"""Joint inclusion probabilities :math:`\pi_{kl} = P(k \in s, l \in s)`, float64.

        Args:
            indices: units :math:`k_1, \dots, k_m` (repeats allowed). ``None`` means all of U.

        Returns:
            The (m, m) matrix :math:`[\pi_{k_i k_j}]` with :math:`\pi_{kk} = \pi_k` on
            coinciding units; (N, N) when ``indices`` is ``None``.

        Raises:
            ValueError: when the full (N, N) matrix is asked for a population above 16384 units
                (pass the sample's ``indices`` instead).
        """
        n = self.population_size
        if indices is None:
            if n > _MAX_FULL_JOINT:
                raise ValueError(
                    f"joint_inclusion_probabilities(): the full {n} x {n} matrix is too large; "
                    f"pass indices= (e.g. a sample's indices) to get the submatrix"
                )
            idx = torch.arange(n)
        else:
            idx = _check_indices(indices, n)
        joint = self._joint(idx)
        same = idx[:, None] == idx[None, :]
        pi = self.inclusion_probabilities()[idx]
        return torch.where(same, pi[:, None].expand_as(joint), joint)

    def _joint(self, idx: Tensor) -> Tensor:
        """Joint probabilities of distinct units (the diagonal is overwritten by the caller)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define joint inclusion probabilities"
        )

    def sample(self, generator: torch.Generator | None = None) -> Sample | WithReplacementSample:
        """Draw one sample (a minibatch) using ``generator`` (the global RNG when ``None``)."""
        raise NotImplementedError

    def batch_sampler(
        self, num_batches: int, generator: torch.Generator | None = None
    ) -> DesignBatchSampler:
        """A :class:`torch.utils.data.Sampler` of ``num_batches`` independent samples per pass.

        Use it as ``DataLoader(dataset, batch_sampler=design.batch_sampler(100, g))``.
        """
        return DesignBatchSampler(self, num_batches, generator)


class SimpleRandomSampling(SamplingDesign):
    r"""Simple random sampling without replacement (SRSWOR): the shuffled minibatch.

    Every subset of size n is equally likely, so

    .. math::
        \pi_k = \frac{n}{N}, \qquad \pi_{kl} = \frac{n (n - 1)}{N (N - 1)} \quad (k \neq l).

    Cutting one random permutation of U into batches (:meth:`epoch_sampler`, what every training
    loop does) gives batches that are each marginally SRSWOR, though not independent.

    Args:
        population_size: N.
        sample_size: n, the batch size, ``1 <= n <= N``.

    Example:
        >>> design = SimpleRandomSampling(10, 4)
        >>> design.inclusion_probabilities()[:3]
        tensor([0.4000, 0.4000, 0.4000], dtype=torch.float64)
        >>> design.sample(torch.Generator().manual_seed(0)).indices
        tensor([4, 1, 7, 5])
    """

    def __init__(self, population_size: int, sample_size: int) -> None:
        self._population_size = _check_count("population_size", population_size, 1)
        _check_count("sample_size", sample_size, 1)
        if sample_size > population_size:
            raise ValueError(
                f"Invalid sample_size: {sample_size} is larger than the population "
                f"({population_size} units); sampling is without replacement"
            )
        self.sample_size = sample_size

    def inclusion_probabilities(self) -> Tensor:
        n, big_n = self.sample_size, self.population_size
        return torch.full((big_n,), n / big_n, dtype=torch.float64)

    def _joint(self, idx: Tensor) -> Tensor:
        n, big_n = self.sample_size, self.population_size
        value = n * (n - 1) / (big_n * (big_n - 1)) if big_n > 1 else 1.0
        return torch.full((idx.numel(), idx.numel()), value, dtype=torch.float64)

    def sample(self, generator: torch.Generator | None = None) -> Sample:
        idx = torch.randperm(self.population_size, generator=generator)[: self.sample_size]
        pi = torch.full(
            (self.sample_size,), self.sample_size / self.population_size, dtype=torch.float64
        )
        return Sample(idx, pi)

    def epoch_sampler(
        self, generator: torch.Generator | None = None, *, drop_last: bool = True
    ) -> EpochBatchSampler:
        """Per-epoch batches: one random permutation of U cut into batches of ``sample_size``.

        With ``drop_last=False`` the last, smaller batch is kept (it is then not SRSWOR of size n).
        """
        return EpochBatchSampler(
            self.population_size, self.sample_size, generator, drop_last=drop_last
        )

    def __repr__(self) -> str:
        return (
            f"SimpleRandomSampling(population_size={self.population_size}, "
            f"sample_size={self.sample_size})"
        )


class PoissonSampling(SamplingDesign):
    r"""Poisson sampling: unit k enters the sample independently with probability :math:`\pi_k`.

    .. math::
        \pi_{kl} = \pi_k \pi_l \quad (k \neq l), \qquad
        E|s| = \sum_U \pi_k .

    The batch size is random (it can even be 0); for SGD this is the design of Clémençon et al.
    (2019), with :math:`\pi_k` chosen from a priori information.

    Args:
        inclusion_probabilities: :math:`\pi_k \in (0, 1]`, shape (N,).
        population_size: optional N, checked against the length of ``inclusion_probabilities``.

    References:
        Hájek, *Asymptotic theory of rejective sampling with varying probabilities from a finite
        population*, Ann. Math. Statist., 1964; Clémençon, Bertail, Chautru & Papa,
        `Optimal survey schemes for stochastic gradient descent with applications to
        M-estimation <https://arxiv.org/abs/1501.02218>`_, ESAIM: P&S, 2019.

    Example:
        >>> design = PoissonSampling([0.5, 0.5, 1.0, 0.2])
        >>> design.sample(torch.Generator().manual_seed(0)).indices
        tensor([2])
        >>> design.expected_sample_size
        2.2
    """

    fixed_size = False

    def __init__(
        self, inclusion_probabilities: Sequence[float] | Tensor, population_size: int | None = None
    ) -> None:
        if population_size is not None:
            _check_count("population_size", population_size, 1)
        self._pi = _check_probabilities(
            "inclusion_probabilities", inclusion_probabilities, population_size, at_most_one=True
        )
        self._population_size = self._pi.numel()

    @property
    def expected_sample_size(self) -> float:
        return float(self._pi.sum())

    def inclusion_probabilities(self) -> Tensor:
        return self._pi.clone()

    def _joint(self, idx: Tensor) -> Tensor:
        pi = self._pi[idx]
        return pi[:, None] * pi[None, :]

    def sample(self, generator: torch.Generator | None = None) -> Sample:
        u = torch.rand(self.population_size, generator=generator, dtype=torch.float64)
        idx = torch.nonzero(u < self._pi).flatten()
        return Sample(idx, self._pi[idx])

    def __repr__(self) -> str:
        return (
            f"PoissonSampling(population_size={self.population_size}, "
            f"expected_sample_size={self.expected_sample_size:.4g})"
        )


class PPSWithReplacement(SamplingDesign):
    r"""Probability-proportional-to-size sampling with replacement (PPSWR): importance sampling.

    ``num_draws`` = n independent draws, each picking unit k with probability
    :math:`p_k = x_k / \sum_U x_l` for positive sizes :math:`x_k`. The natural estimator is
    Hansen–Hurwitz (:func:`~probopt.sampling.estimators.hansen_hurwitz`); uniform :math:`p_k`
    is i.i.d. minibatch SGD, :math:`p_k \propto \lVert y_k \rVert` minimises its variance. The
    inclusion probabilities of the distinct units (for Horvitz–Thompson) are

    .. math::
        \pi_k = 1 - (1 - p_k)^n, \qquad
        \pi_{kl} = 1 - (1 - p_k)^n - (1 - p_l)^n + (1 - p_k - p_l)^n .

    Args:
        sizes: positive sizes :math:`x_k`, shape (N,); the draw probabilities are
            ``sizes / sizes.sum()`` (pass probabilities that sum to 1 to use them as they are).
        num_draws: n, the number of draws per sample (may exceed N).
        population_size: optional N, checked against the length of ``sizes``.

    References:
        Hansen & Hurwitz, *On the theory of sampling from finite populations*, Ann. Math.
        Statist. 14, 1943.

    Example:
        >>> design = PPSWithReplacement([1.0, 1.0, 2.0], num_draws=3)
        >>> design.draw_probabilities
        tensor([0.2500, 0.2500, 0.5000], dtype=torch.float64)
        >>> s = design.sample(torch.Generator().manual_seed(0))
        >>> s.indices, s.units, s.multiplicities
        (tensor([2, 2, 1]), tensor([1, 2]), tensor([1, 2]))
    """

    fixed_size = False  # the number of *distinct* units is random

    def __init__(
        self, sizes: Sequence[float] | Tensor, num_draws: int, population_size: int | None = None
    ) -> None:
        if population_size is not None:
            _check_count("population_size", population_size, 1)
        x = _check_probabilities("sizes", sizes, population_size, at_most_one=False)
        self.num_draws = _check_count("num_draws", num_draws, 1)
        self.draw_probabilities = x / x.sum()
        self._population_size = x.numel()

    def inclusion_probabilities(self) -> Tensor:
        p, n = self.draw_probabilities, self.num_draws
        return -torch.expm1(n * torch.log1p(-p))

    def _joint(self, idx: Tensor) -> Tensor:
        p, n = self.draw_probabilities[idx], self.num_draws
        none_k = (1 - p) ** n
        neither = (1 - p[:, None] - p[None, :]).clamp_min(0.0) ** n
        return 1 - none_k[:, None] - none_k[None, :] + neither

    def sample(self, generator: torch.Generator | None = None) -> WithReplacementSample:
        idx = torch.multinomial(
            self.draw_probabilities, self.num_draws, replacement=True, generator=generator
        )
        units, counts = torch.unique(idx, sorted=True, return_counts=True)
        return WithReplacementSample(idx, self.draw_probabilities[idx], units, counts)

    def __repr__(self) -> str:
        return (
            f"PPSWithReplacement(population_size={self.population_size}, "
            f"num_draws={self.num_draws})"
        )


class StratifiedSampling(SamplingDesign):
    r"""Stratified simple random sampling: SRSWOR of :math:`n_h` units inside each stratum h.

    With :math:`N_h` units in stratum h and :math:`k, l` in strata :math:`h, g`:

    .. math::
        \pi_k = \frac{n_h}{N_h}, \qquad
        \pi_{kl} = \begin{cases} \frac{n_h (n_h - 1)}{N_h (N_h - 1)} & h = g,\ k \neq l \\
        \pi_k \pi_l & h \neq g. \end{cases}

    Proportional allocation (:math:`n_h \approx n N_h / N`, largest-remainder rounding so that
    :math:`\sum_h n_h = n`) makes every :math:`\pi_k \approx n/N`; stratifying by class then
    removes the between-class part of the minibatch-gradient variance.

    Args:
        strata: integer stratum label of every unit, shape (N,), labels ``0 .. H-1``
            (e.g. class labels).
        sample_size: total n with proportional allocation. Give this or ``sample_sizes``.
        sample_sizes: the allocation :math:`n_h` of every stratum ``h = 0 .. H-1``.

    References:
        Särndal, Swensson & Wretman 1992, section 3.7; Cochran, *Sampling Techniques*, 1977,
        chapter 5.

    Example:
        >>> design = StratifiedSampling(torch.tensor([0, 0, 0, 0, 1, 1]), sample_size=3)
        >>> design.sample_sizes, design.inclusion_probabilities()
        ([2, 1], tensor([0.5000, 0.5000, 0.5000, 0.5000, 0.5000, 0.5000], dtype=torch.float64))
        >>> design.sample(torch.Generator().manual_seed(0)).indices
        tensor([0, 1, 4])
    """

    def __init__(
        self,
        strata: Sequence[int] | Tensor,
        sample_size: int | None = None,
        *,
        sample_sizes: Sequence[int] | None = None,
    ) -> None:
        labels = torch.as_tensor(strata)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(
                f"Invalid strata: expected a non-empty 1-D vector of labels, got "
                f"shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"Invalid strata: labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError(f"Invalid strata: labels must be >= 0, got {int(labels.min())}")
        if (sample_size is None) == (sample_sizes is None):
            raise ValueError(
                "StratifiedSampling: give exactly one of sample_size (proportional "
                "allocation) or sample_sizes"
            )
        num_strata = len(sample_sizes) if sample_sizes is not None else int(labels.max()) + 1
        if int(labels.max()) >= num_strata:
            raise ValueError(
                f"Invalid strata: label {int(labels.max())} has no entry in "
                f"sample_sizes (length {num_strata})"
            )
        counts = torch.bincount(labels, minlength=num_strata)
        for h, size in enumerate(counts.tolist()):
            if size == 0:
                raise ValueError(f"Invalid strata: stratum {h} is empty (no unit has label {h})")
        self.strata = labels
        self.stratum_sizes = counts.tolist()
        self._population_size = labels.numel()
        if sample_sizes is None:
            _check_count("sample_size", sample_size, 1)
            if sample_size > self._population_size:
                raise ValueError(
                    f"Invalid sample_size: {sample_size} is larger than the "
                    f"population ({self._population_size} units)"
                )
            sample_sizes = _proportional_allocation(self.stratum_sizes, sample_size)
        self.sample_sizes = [
            self._check_allocation(h, n_h) for h, n_h in enumerate(list(sample_sizes))
        ]
        self.sample_size = sum(self.sample_sizes)
        self._members = [torch.nonzero(labels == h).flatten() for h in range(num_strata)]

    def _check_allocation(self, h: int, n_h: int) -> int:
        if isinstance(n_h, bool) or not isinstance(n_h, int) or n_h < 1:
            raise ValueError(
                f"Invalid sample size of stratum {h}: {n_h!r} (must be an integer "
                f">= 1, otherwise its units can never be drawn)"
            )
        if n_h > self.stratum_sizes[h]:
            raise ValueError(
                f"Invalid sample size of stratum {h}: {n_h} is larger than the "
                f"stratum ({self.stratum_sizes[h]} units)"
            )
        return n_h

    @property
    def num_strata(self) -> int:
        return len(self.stratum_sizes)

    def inclusion_probabilities(self) -> Tensor:
        frac = torch.tensor(self.sample_sizes, dtype=torch.float64) / torch.tensor(
            self.stratum_sizes, dtype=torch.float64
        )
        return frac[self.strata]

    def _joint(self, idx: Tensor) -> Tensor:
        n_h = torch.tensor(self.sample_sizes, dtype=torch.float64)
        big = torch.tensor(self.stratum_sizes, dtype=torch.float64)
        within = torch.where(big > 1, n_h * (n_h - 1) / (big * (big - 1)).clamp_min(1), n_h / big)
        h = self.strata[idx]
        pi = (n_h / big)[h]
        same = h[:, None] == h[None, :]
        return torch.where(same, within[h][:, None].expand(len(h), len(h)), pi[:, None] * pi)

    def sample(self, generator: torch.Generator | None = None) -> Sample:
        parts = []
        for members, n_h in zip(self._members, self.sample_sizes):
            parts.append(members[torch.randperm(members.numel(), generator=generator)[:n_h]])
        idx = torch.cat(parts)
        return Sample(idx, self.inclusion_probabilities()[idx])

    def __repr__(self) -> str:
        return (
            f"StratifiedSampling(stratum_sizes={self.stratum_sizes}, "
            f"sample_sizes={self.sample_sizes})"
        )


def _proportional_allocation(stratum_sizes: list[int], sample_size: int) -> list[int]:
    """Largest-remainder (Hamilton) rounding of ``n N_h / N``; ties go to the lower label."""
    total = sum(stratum_sizes)
    exact = [sample_size * size / total for size in stratum_sizes]
    alloc = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda h: (-(exact[h] - alloc[h]), h))
    for h in order[: sample_size - sum(alloc)]:
        alloc[h] += 1
    for h, n_h in enumerate(alloc):
        if n_h == 0:
            raise ValueError(
                f"Invalid sample_size: proportional allocation of {sample_size} gives stratum {h} "
                f"({stratum_sizes[h]} of {total} units) no draw; increase sample_size or pass "
                f"sample_sizes"
            )
    return alloc


# --------------------------------------------------------------------------------------------
# torch.utils.data integration


class DesignBatchSampler(Sampler[list[int]]):
    r"""Yields ``num_batches`` independent samples of a design per pass, as lists of indices.

    For ``DataLoader(dataset, batch_sampler=...)``. Samples of with-replacement designs keep
    their repeats (one entry per draw). With ``generator=None`` each pass seeds a fresh
    generator from the global torch RNG (as :class:`torch.utils.data.RandomSampler` does), so
    ``torch.manual_seed`` makes the loader reproducible.

    .. note::
        A random-size design (:class:`PoissonSampling`) can draw an empty sample, yielded as
        ``[]``; the Horvitz–Thompson estimate is then 0, but the DataLoader's default
        ``collate_fn`` cannot batch an empty list. Give the loader a ``collate_fn`` that handles
        it, or choose :math:`\pi_k` with a negligible :math:`\prod_U (1 - \pi_k)`. Skipping
        empty samples would bias the estimator.

    Example:
        >>> sampler = SimpleRandomSampling(10, 3).batch_sampler(2, torch.Generator().manual_seed(0))
        >>> list(sampler)
        [[4, 1, 7], [3, 9, 4]]
    """

    def __init__(
        self, design: SamplingDesign, num_batches: int, generator: torch.Generator | None = None
    ) -> None:
        self.design = design
        self.num_batches = _check_count("num_batches", num_batches, 1)
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator if self.generator is not None else _fresh_generator()
        for _ in range(self.num_batches):
            yield self.design.sample(g).indices.tolist()

    def __len__(self) -> int:
        return self.num_batches


class EpochBatchSampler(Sampler[list[int]]):
    """One pass = one epoch: a random permutation of U cut into batches of ``batch_size``.

    The same batches as :meth:`probopt.sampling.gradient_estimator.GradientEstimator.epoch_batches`
    for the same generator state.

    Example:
        >>> list(EpochBatchSampler(10, 5, torch.Generator().manual_seed(0)))
        [[4, 1, 7, 5, 3], [9, 0, 8, 6, 2]]
    """

    def __init__(
        self,
        population_size: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        drop_last: bool = True,
    ) -> None:
        self.population_size = _check_count("population_size", population_size, 1)
        _check_count("batch_size", batch_size, 1)
        if batch_size > population_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size} is larger than the population "
                f"({population_size} units)"
            )
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator if self.generator is not None else _fresh_generator()
        perm = torch.randperm(self.population_size, generator=g).tolist()
        stop = len(self) * self.batch_size
        for start in range(0, stop, self.batch_size):
            yield perm[start : start + self.batch_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.population_size // self.batch_size
        return -(-self.population_size // self.batch_size)
