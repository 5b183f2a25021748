"""The interface between a training loop and a gradient estimator.

A gradient estimator decides which examples form each minibatch (the *sampling design*) and how
their losses are combined so that one ``backward()`` leaves the estimate of the full-data
gradient in ``.grad`` (the *estimator*). The optimizer is never changed: any torch optimizer,
probopt's or not, then calls ``step()``.

The training loop does::

    estimator.setup(model, x_train, y_train)           # once: auxiliary totals, scores, ...
    for epoch in range(epochs):
        for index in estimator.epoch_batches(batch_size, generator):
            optimizer.zero_grad()
            loss = estimator.backward(model, loss_fn, x_train[index], y_train[index], index)
            optimizer.step()
            estimator.after_step(model)                # refresh auxiliary models, scores, ...

``loss_fn(outputs, targets)`` must return per-example losses (``reduction="none"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["GradientEstimator", "LossFn", "UniformEstimator"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class GradientEstimator:
    """Base class: simple random sampling without replacement and the plain minibatch mean.

    Subclasses override :meth:`backward` (the estimator), :meth:`epoch_batches` (the design),
    :meth:`setup` and :meth:`after_step` as needed.
    """

    name: str = "uniform"

    def setup(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """Called once before training with the whole training set (the finite population)."""
        self.population_size = int(x.shape[0])

    def epoch_batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """Index tensors of one epoch: a random permutation cut into batches (SRSWOR per batch)."""
        n = self.population_size
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):  # drop_last
            yield perm[start : start + batch_size]

    def backward(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, index: Tensor
    ) -> Tensor:
        """Leave the gradient estimate in ``.grad``; return the plain mean loss (detached)."""
        losses = loss_fn(model(x), y)
        loss = losses.mean()
        loss.backward()
        return loss.detach()

    def after_step(self, model: nn.Module) -> None:
        """Called after ``optimizer.step()``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class UniformEstimator(GradientEstimator):
    """The plain minibatch mean under shuffled minibatches: what every training loop does.

    Example:
        >>> est = UniformEstimator()
        >>> est.setup(None, torch.zeros(10, 2), torch.zeros(10))
        >>> [b.tolist() for b in est.epoch_batches(5, torch.Generator().manual_seed(0))]
        [[4, 1, 7, 5, 3], [9, 0, 8, 6, 2]]
    """
