r"""When importance sampling pays: the Katharopoulos–Fleuret :math:`\tau` criterion.

For scores :math:`s_k` and draw probabilities :math:`q_k`,

.. math::
    \tau = \sqrt{\frac{N^{-1}\sum_U s_k^2}{\sum_U s_k^2 / (N^2 q_k)}}

is the square root of the ratio of the uniform to the importance second moment (for :math:`q
\propto s` it is KF's :math:`1/\sqrt{1 - \lVert g - u\rVert^2/\lVert g\rVert^2}`) (:func:`tau`).
Importance sampling pays when a step costs less than :math:`\tau` uniform steps' worth of
variance reduction: :math:`\tau > \tau_{th} = (B + 3b)/(3b)` for :math:`B` extra forward passes
per step (:func:`tau_threshold`). :class:`TauCondition` keeps the exponential average of
:math:`\tau` (from 0, momentum :math:`a_\tau`) and says whether importance sampling is on.

The estimators that switch on this criterion are in :mod:`probopt.sampling.importance`.

References:
    Katharopoulos & Fleuret, `Not All Samples Are Created Equal: Deep Learning with Importance
    Sampling <https://arxiv.org/abs/1803.00942>`_, ICML 2018.

.. note::
    KF compute :math:`\tau` from a fresh presample; :class:`~probopt.sampling.importance.\
ImportanceEstimator` applies it to a table of stale scores (ours). KF's code starts :math:`\tau`
    at 0 and uses :math:`a_\tau = 0.9`, as :class:`TauCondition` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probopt.sampling.importance_design import _check_nonneg, _check_unit, _fill

__all__ = ["TauCondition", "tau", "tau_threshold"]


def tau(scores: Tensor, probabilities: Tensor | None = None) -> float:
    r"""Katharopoulos–Fleuret :math:`\tau`: uniform over importance second moment, square-rooted.

    .. math::
        \tau = \sqrt{\frac{N^{-1}\sum_U s_k^2}{\sum_U s_k^2 / (N^2 q_k)}},

    with :math:`q_k \propto s_k` by default, where it equals KF's
    :math:`1/\sqrt{1 - \lVert g - u\rVert^2 / \lVert g\rVert^2}`. :math:`\tau \ge 1` for
    :math:`q \propto s`; 1 for constant scores. NaN scores are filled as in
    :func:`~probopt.sampling.importance_design.draw_probabilities`.

    Example:
        >>> tau(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        1.0
        >>> round(tau(torch.tensor([1.0, 1.0, 1.0, 5.0])), 4)  # sqrt(28/4) / 2
        1.3229
    """
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if bool((torch.isinf(s) | (s < 0)).any()):
        raise ValueError("Invalid scores: every score must be finite and >= 0 (or NaN)")
    s = _fill(s)
    q = s / s.sum() if probabilities is None else torch.as_tensor(probabilities).double()
    return _tau(s, q)


def _tau(s: Tensor, q: Tensor) -> float:
    sq = s.square()
    m_uniform = float(sq.mean())
    m_is = float(torch.where(s > 0, sq / q, 0.0).sum()) / s.numel() ** 2
    return math.sqrt(m_uniform / m_is) if m_is > 0 else 1.0


def tau_threshold(presample: int, batch_size: int) -> float:
    r"""KF's switch-on threshold :math:`(B + 3b)/(3b)`: :math:`B` extra forward passes per step.

    A backward costs about two forwards, so a uniform step on :math:`b` examples costs
    :math:`3b`; importance sampling costs :math:`B + 3b` and is worth :math:`\tau b` uniform
    examples.

    Example:
        >>> tau_threshold(3 * 64, 64)
        2.0
    """
    if presample < 0 or batch_size < 1:
        raise ValueError(f"Invalid presample {presample!r} or batch_size {batch_size!r}")
    return (presample + 3 * batch_size) / (3 * batch_size)


class TauCondition:
    r"""Exponential average :math:`\tau \leftarrow a\tau + (1-a)\tau_{new}` from 0; on iff
    :math:`\tau > \tau_{th}`.

    Example:
        >>> cond = TauCondition(1.5, momentum=0.5)
        >>> [cond.update(2.0) for _ in range(3)]
        [False, False, True]
    """

    def __init__(self, threshold: float, momentum: float = 0.9) -> None:
        self.threshold = _check_nonneg("tau_threshold", threshold)
        self.momentum = _check_unit("tau_momentum", momentum, closed=False)
        self.value = 0.0

    @property
    def active(self) -> bool:
        return self.value > self.threshold

    def update(self, tau_new: float) -> bool:
        self.value = self.momentum * self.value + (1.0 - self.momentum) * float(tau_new)
        return self.active
