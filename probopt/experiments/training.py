"""The training loop behind ``probopt compare`` and the benchmarks.

One *run* trains one network on one dataset with one optimizer and one seed, and records per
epoch the loss on the whole training set, the loss and accuracy on the test set, the mean
minibatch loss and the training time. Minibatches come from a
:class:`~probopt.sampling.gradient_estimator.GradientEstimator` (by default the
:class:`~probopt.sampling.gradient_estimator.UniformEstimator`: shuffled minibatches and their
plain mean), so the estimators of :mod:`probopt.sampling` plug in without touching the loop::

    estimator.setup(model, x_train, y_train)
    for epoch in 1..epochs:
        for index in estimator.epoch_batches(batch_size, generator):
            optimizer.zero_grad()
            estimator.backward(model, cross_entropy(reduction="none"), x[index], y[index], index)
            optimizer.step()
            estimator.after_step(model)
        evaluate on the whole training set and on the test set

Runs are deterministic given their seed: the seed initialises the network
(:func:`~probopt.experiments.networks.make_network`), seeds a ``torch.Generator`` that orders the
minibatches, and seeds torch's global generator for the duration of the run (for estimators that
draw from it); the caller's global random state is restored afterwards. Runs that share a seed
share the initial weights and the minibatch order, so optimizers are compared on paired runs.
The train/test split is the dataset's (``load_dataset(name, seed=0)`` unless a
:class:`~probopt.experiments.datasets.Dataset` is passed).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probopt.experiments.datasets import Dataset, load_dataset
from probopt.experiments.networks import make_network
from probopt.experiments.optimizers import default_lr, make_optimizer, warm_up
from probopt.sampling.gradient_estimator import GradientEstimator
from probopt.sampling.registry import ESTIMATOR_REGISTRIES, estimator_names, make_estimator

__all__ = [
    "ESTIMATOR_REGISTRIES",
    "RunResult",
    "compare",
    "estimator_names",
    "evaluate",
    "make_estimator",
    "train",
]


@dataclass
class RunResult:
    """What one run recorded. Index ``e`` of the per-epoch lists is the state after ``e`` epochs
    (index 0: at initialisation), except ``batch_loss`` and ``epoch_time``, whose index ``e`` is
    epoch ``e + 1``. A run whose training loss became NaN or infinite stops there
    (``diverged=True``) and the remaining entries are NaN.

    Attributes:
        dataset, network, optimizer, estimator: names.
        lr: the learning rate used.
        seed: the run's seed.
        epochs, batch_size: the budget.
        schedule: the learning-rate schedule (:data:`SCHEDULES`).
        train_loss: mean cross-entropy on the whole training set (evaluation mode).
        test_loss: mean cross-entropy on the test set.
        test_accuracy: share of the test set classified correctly.
        batch_loss: mean of the minibatch losses that the estimator returned during the epoch.
        epoch_time: seconds spent training in the epoch (evaluation excluded).
        diverged: whether training stopped on a non-finite loss.
    """

    dataset: str
    network: str
    optimizer: str
    estimator: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    schedule: str = "constant"
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    batch_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1]

    @property
    def best_test_accuracy(self) -> float:
        finite = [a for a in self.test_accuracy[1:] if math.isfinite(a)]
        return max(finite) if finite else math.nan

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1]

    @property
    def time_per_epoch(self) -> float:
        finite = [t for t in self.epoch_time if math.isfinite(t)]
        return sum(finite) / len(finite) if finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes ``None``)."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# the loop


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, chunk: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in evaluation mode.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> loss, acc = evaluate(model, torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
        >>> 0.0 <= acc <= 1.0
        True
    """
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return total / n, correct / n


#: Learning-rate schedules of :func:`train`, stepped every iteration: ``"constant"``; ``"step"``,
#: halved after each third of the iterations (the VSGD paper's StepLR(γ = 0.5) recipe, see
#: ``shared/notes/vsgd.md`` §5); ``"cosine"``, cosine annealing to 0 over the run.
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


def _scheduler(
    opt: torch.optim.Optimizer, schedule: str, iterations: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule over ``iterations`` steps (the factor stays at its last value after them)."""
    if schedule == "constant" or iterations == 0:
        return None
    if schedule == "step":
        third = max(-(-iterations // 3), 1)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** min(t // third, 2))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t / iterations, 1.0)))
    )


def train(
    dataset: Dataset | str,
    optimizer: str = "sgdm",
    *,
    network: str = "mlp",
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float | None = None,
    schedule: str = "constant",
    estimator: GradientEstimator | str = "uniform",
    optimizer_kwargs: Mapping[str, Any] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[RunResult, int], None] | None = None,
    on_start: Callable[[nn.Module, torch.optim.Optimizer, GradientEstimator], Any] | None = None,
) -> RunResult:
    """Train one network with one optimizer and record its per-epoch curves.

    Args:
        dataset: a :class:`~probopt.experiments.datasets.Dataset` or a name for
            :func:`~probopt.experiments.datasets.load_dataset`.
        optimizer: a name of :data:`probopt.experiments.optimizers.OPTIMIZERS`.
        network: ``"logreg"``, ``"mlp"`` or ``"cnn"``
            (:func:`~probopt.experiments.networks.make_network`).
        seed: seeds the initial weights, the minibatch order and torch's global generator.
        epochs: passes over the training set (0 only evaluates the initial network).
        batch_size: minibatch size; the last incomplete minibatch of an epoch is dropped.
        lr: learning rate; ``None`` takes the optimizer's documented default.
        schedule: learning-rate schedule, one of :data:`SCHEDULES` (stepped every iteration).
        estimator: a gradient estimator or its name (:func:`make_estimator`). An instance is
            set up afresh by this run.
        optimizer_kwargs: further optimizer settings.
        network_kwargs: further :func:`~probopt.experiments.networks.make_network` settings
            (``hidden`` for the MLP, ``width`` for the CNN).
        device: where the network and the data live.
        callback: called as ``callback(result, epoch)`` after every evaluation (epoch 0 too).
        on_start: called once as ``on_start(model, optimizer, estimator)`` after set-up, before
            the first epoch (e.g. ``probopt.diagnostics.CompareDiagnostics.callback(label)``).

    Returns:
        The :class:`RunResult`.

    Example:
        >>> run = train("iris", "adamw", network="logreg", epochs=3, batch_size=16, lr=0.05)
        >>> len(run.test_accuracy), run.train_loss[-1] < run.train_loss[0]
        (4, True)
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    device = torch.device(device)
    est = make_estimator(estimator) if isinstance(estimator, str) else estimator
    lr = default_lr(optimizer) if lr is None else float(lr)
    est_name = estimator if isinstance(estimator, str) else getattr(est, "name", "custom")
    result = RunResult(
        dataset=data.name,
        network=network,
        optimizer=optimizer,
        estimator=est_name,
        lr=lr,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        schedule=schedule,
    )
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    model = make_network(
        network, data.input_shape, data.num_classes, seed=seed, **(network_kwargs or {})
    ).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, **(optimizer_kwargs or {}))
    step_takes_loss = "loss" in inspect.signature(opt.step).parameters  # GradQueue's trend
    sched = _scheduler(opt, schedule, epochs * (x_train.shape[0] // batch_size))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        est.setup(model, x_train, y_train)
        if on_start is not None:
            on_start(model, opt, est)
        _record(result, model, x_train, y_train, x_test, y_test)
        if callback is not None:
            callback(result, 0)
        for epoch in range(1, epochs + 1):
            start, losses = time.perf_counter(), []
            for index in est.epoch_batches(batch_size, generator):
                index = index.to(device)
                opt.zero_grad()
                loss = est.backward(model, _cross_entropy, x_train[index], y_train[index], index)
                if step_takes_loss:
                    opt.step(loss=loss)
                else:
                    opt.step()
                est.after_step(model)
                if sched is not None:
                    sched.step()
                losses.append(loss)
            result.epoch_time.append(time.perf_counter() - start)
            result.batch_loss.append(float(torch.stack(losses).mean()) if losses else math.nan)
            _record(result, model, x_train, y_train, x_test, y_test)
            if not math.isfinite(result.train_loss[-1]):
                result.diverged = True
                _pad(result, epochs - epoch)
            if callback is not None:
                callback(result, epoch)
            if result.diverged:
                break
    return result


def _record(result: RunResult, model: nn.Module, *data: Tensor) -> None:
    x_train, y_train, x_test, y_test = data
    train_loss, _ = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    result.train_loss.append(train_loss)
    result.test_loss.append(test_loss)
    result.test_accuracy.append(test_acc)


def _pad(result: RunResult, remaining: int) -> None:
    for series in (result.train_loss, result.test_loss, result.test_accuracy):
        series.extend([math.nan] * remaining)
    result.batch_loss.extend([math.nan] * remaining)
    result.epoch_time.extend([math.nan] * remaining)


def compare(
    dataset: Dataset | str,
    optimizers: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    lrs: Mapping[str, float] | None = None,
    callback: Callable[[RunResult, int], None] | None = None,
    **train_kwargs: Any,
) -> list[RunResult]:
    """Train every optimizer with every seed on the same data (paired runs).

    Args:
        dataset: a dataset or its name (loaded once).
        optimizers: optimizer names.
        seeds: the seeds; run ``k`` of every optimizer uses ``seeds[k]``.
        lrs: learning rate per optimizer name; missing names take their default.
        callback: passed to every :func:`train` call.
        **train_kwargs: the other :func:`train` arguments (``network``, ``epochs``, ...).

    Returns:
        The runs, optimizer by optimizer, seed by seed.

    Example:
        >>> runs = compare("iris", ["sgdm", "adamw"], seeds=[0], network="logreg", epochs=1)
        >>> [(r.optimizer, r.seed) for r in runs]
        [('sgdm', 0), ('adamw', 0)]
    """
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    lrs = dict(lrs or {})
    for name in optimizers:  # one-off costs out of the first run's timings
        warm_up(name, train_kwargs.get("device", "cpu"))
    return [
        train(data, name, seed=seed, lr=lrs.get(name), callback=callback, **train_kwargs)
        for name in optimizers
        for seed in seeds
    ]
