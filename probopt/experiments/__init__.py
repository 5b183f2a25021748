"""Experiment building blocks shared by the ``probopt`` command, the benchmarks and the docs.

* :mod:`probopt.experiments.datasets`: offline datasets (bundled with PyPI packages or generated).
* :mod:`probopt.experiments.networks`: the small networks used in comparisons.
"""

from probopt.experiments.datasets import DATASETS, Dataset, load_dataset
from probopt.experiments.networks import make_network

__all__ = ["DATASETS", "Dataset", "load_dataset", "make_network"]
